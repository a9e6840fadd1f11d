"""Thanos (Ilin & Richtarik 2025, arXiv 2504.05346): block-wise pruning, Wanda metric, joint block update.

Columns are visited left to right in blocks of ``mask_block``. At each block:

1. Score the weights as they are now (already moved by earlier blocks) with Wanda's
   metric ``|w_ij| * ||X_j||`` (``||X_j||^2`` = undamped ``H_jj``).
   Unstructured: one budget for the whole layer, ``int(rows * d_in * sparsity)`` weights.
   The block prunes those of its own weights that are among the ``budget - pruned so far``
   lowest scores of *all rows and all remaining columns* (block included), so rows end up
   unevenly pruned and the layer meets its count exactly. N:M: in every group of M inputs
   of the block, the ``M - N`` lowest scores of each row are pruned.
2. Remove every pruned weight of the block at once, per row, with the multi-weight OBS
   update over all columns not yet frozen (this block and everything to its right):
   ``w <- w - Hinv[:, S] (Hinv[S, S])^-1 w_S`` with ``Hinv`` the inverse of the damped
   ``H`` restricted to those columns; columns left of the block stay as they are.
   It is the exact least-squares optimum given the frozen columns, so with one block
   (``mask_block >= d_in``) it equals OPTIMA's update for the same mask.

Differences from the reference code (github vectozavr/thanos, ``lib/thanos.py``) and why:

- The columns of each trailing inverse ``inv(H[i1:, i1:])`` that a block needs are read off
  the upper Cholesky factor ``U`` of ``H^-1`` (``inv(H[i1:, i1:]) = U[i1:, i1:]^T U[i1:, i1:]``)
  instead of inverting the trailing submatrix again for every block: same numbers,
  ``O(b^2 d)`` per block instead of ``O(d^3)``.
- Outlier rows: the reference's default run ("Thanos", outlier fraction 0) is meant to keep
  no rows dense, but for N:M its slice ``W[:-(num_outliers + 1)]`` leaves one row (the largest
  ``sum_j w_ij^2 x_j^2``) unpruned, which breaks the N:M pattern for that row; here no row is kept
  dense. Its 10%-outlier-rows variant is not implemented (not the default).
- Damping and dead inputs: ``damp_hessian`` (relative damping, dead inputs decoupled) and
  escalation (``optima.linalg``) when ``H`` or a row's ``Hinv[S, S]`` does not factor, instead of a
  plain inverse; weights on dead inputs are not zeroed up front (they score 0, so they are
  pruned first anyway; a kept one changes no calibration output).
- N:M prunes ``M - N`` per group (the reference prunes its ``prune_n`` per group and assumes
  half of each block pruned: the same for 2:4 and 4:8). The reference's block size 1 switches
  to a different, SparseGPT-like routine; here block size 1 is the same rule with 1-column blocks.
- The reference's default block size is 512 (``main.py``); here it is the caller's ``mask_block``.
- The budget: the reference evaluates ``sparsity * rows * cols`` left to right, which in rare float
  cases floors one lower (0.15 * 3 * 100 -> 44); ``rows * d_in * sparsity`` gives 45, the count the
  other layer-wide selectors here use.
"""

from __future__ import annotations

import torch

from dataclasses import replace

from optima.hessian import damp_hessian
from optima.linalg import Damping, escalating, inverse_upper_factor, solve_rows
from optima.masks import Pattern, column_norms, prune_nm

_ROW_SYSTEMS_BUDGET = 1 << 26  # bytes of per-row systems Hinv[S, S] factored at once


@torch.no_grad()
def thanos(weight: torch.Tensor, hessian: torch.Tensor, pattern: Pattern, *, mask_block: int = 128,
           damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor, Damping]:
    """Prune ``weight`` (rows, d_in) with Thanos; return (updated weight, keep-mask, damping used).

    ``hessian`` is the undamped mean ``X^T X``; the work and the returned weight are in its dtype,
    pruned entries exactly 0.
    """
    d_in = weight.shape[1]
    pattern.check(d_in)
    if mask_block < 1:
        raise ValueError(f"mask_block must be positive, got {mask_block}")
    if pattern.structured:
        mask_block = max(pattern.m, mask_block // pattern.m * pattern.m)
    norms = column_norms(hessian)
    upper, h, damping = escalating(inverse_upper_factor, *damp_hessian(hessian, damp))
    w, keep, escalated = _prune(weight.to(h.dtype), norms, upper, pattern, mask_block)
    return w, keep, replace(damping, escalated_rows=escalated)


def _prune(weight: torch.Tensor, norms: torch.Tensor, upper: torch.Tensor, pattern: Pattern,
           mask_block: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The block loop: (weight, keep, rows whose ``Hinv[S, S]`` needed damping of its own, summed over blocks)."""
    rows, d_in = weight.shape
    w = weight.clone()
    keep = torch.ones(rows, d_in, dtype=torch.bool, device=w.device)
    remaining = int(rows * d_in * pattern.sparsity)  # unstructured: the layer's budget still to prune
    escalated = 0
    for i1 in range(0, d_in, mask_block):
        i2 = min(i1 + mask_block, d_in)
        scores = w[:, i1:].abs() * norms[i1:]
        if pattern.structured:
            prune = ~prune_nm(scores[:, :i2 - i1], pattern)
        else:
            prune = _lowest_in_block(scores, remaining, i2 - i1)
            remaining -= int(prune.sum())
        keep[:, i1:i2] = ~prune
        # columns i1..i2-1 of inv(H[i1:, i1:]), as (d_in - i1, block) from rows i1..i2-1 of U
        hinv_cols = upper[i1:i2, i1:].T @ upper[i1:i2, i1:i2]
        # per row, lambda_S = (Hinv[S, S])^-1 w_S, 0 off S
        lam, raised = solve_rows(hinv_cols[:i2 - i1], prune, w[:, i1:i2], _ROW_SYSTEMS_BUDGET)
        escalated += raised
        w[:, i1:] -= lam @ hinv_cols.T
        w[:, i1:i2].masked_fill_(prune, 0.0)
    return w, keep, escalated


def _lowest_in_block(scores: torch.Tensor, count: int, width: int) -> torch.Tensor:
    """True for the block's (first ``width`` columns') entries among the ``count`` lowest of ``scores``."""
    rows, span = scores.shape
    prune = torch.zeros(rows, width, dtype=torch.bool, device=scores.device)
    if count <= 0:
        return prune
    low = scores.reshape(-1).topk(count, largest=False).indices
    row, col = low // span, low % span
    inside = col < width
    prune[row[inside], col[inside]] = True
    return prune
