"""SparseGPT: OBS saliency mask chosen block-wise, with its greedy weight update.

Columns are visited left to right. A pruned column's error is compensated only into
the columns to its right (through the upper Cholesky factor of H^-1), which is why
the result is not the per-row optimum that OPTIMA computes for the same mask.
Masks are chosen per block of ``mask_block`` columns from the weights as already
updated by earlier blocks (the paper's lazy-batch scheme), on the OBS saliency
w^2 / [chol(H^-1)]_jj^2: for unstructured sparsity with one threshold over all rows
of the block, as the reference code does (``sparsegpt``; rows end up unevenly
pruned), or the same count in every row (``sparsegpt_rowwise``); for N:M per group
of M inputs of each row, chosen when the group is reached.
"""

from __future__ import annotations

from typing import Literal

import torch

from optima.hessian import damp_hessian
from optima.linalg import Damping, escalating, inverse_upper_factor
from optima.masks import Pattern, prune_lowest, prune_nm


def _saliency(weights: torch.Tensor, u_diag: torch.Tensor) -> torch.Tensor:
    """OBS saliency w^2 / [chol(H^-1)]_jj^2 of each weight."""
    return weights.pow(2) / u_diag.pow(2)


def _prune_block(block: torch.Tensor, u_block: torch.Tensor, keep_block: torch.Tensor, pattern: Pattern,
                 drop: int, scope: Literal["block", "row"]) -> torch.Tensor:
    """Choose the block's mask into ``keep_block`` and prune ``block`` column by column, compensating
    each column's error into the block's later columns (both in place); return the per-column errors."""
    if not pattern.structured:
        saliency = _saliency(block, u_block.diagonal())
        scores = saliency.reshape(-1) if scope == "block" else saliency
        keep_block[:] = prune_lowest(scores, drop).reshape(saliency.shape)
    errors = torch.zeros_like(block)
    for j in range(block.shape[1]):
        if pattern.structured and j % pattern.m == 0:
            group = _saliency(block[:, j:j + pattern.m], u_block.diagonal()[j:j + pattern.m])
            keep_block[:, j:j + pattern.m] = prune_nm(group, pattern)
        w_col = block[:, j]
        q_col = w_col * keep_block[:, j]
        err = (w_col - q_col) / u_block[j, j]
        block[:, j:] -= err[:, None] * u_block[j, j:][None, :]
        block[:, j] = q_col
        errors[:, j] = err
    return errors


@torch.no_grad()
def sparsegpt(weight: torch.Tensor, hessian: torch.Tensor, pattern: Pattern, *, mask_block: int = 128,
              damp: float = 0.01, scope: Literal["block", "row"] = "block"
              ) -> tuple[torch.Tensor, torch.Tensor, Damping]:
    """Prune ``weight`` with SparseGPT; return (updated weight, keep-mask, damping used).

    Works in the Hessian's dtype; the returned weight has that dtype too.
    Unstructured, ``scope="block"`` (the reference rule): each block of columns prunes
    its lowest-saliency weights over all rows together, ``pattern.pruned_per_block``
    of them, so the layer loses exactly int(numel * sparsity); the reference prunes
    ``saliency <= sorted[int(block numel * sparsity)]``, one weight more per block (ties aside).
    ``scope="row"``: every row loses ``pattern.pruned_per_row(d_in)``, spread over the
    blocks in proportion to their width.
    """
    if scope not in ("block", "row"):
        raise ValueError(f"unknown SparseGPT scope {scope!r}; use 'block' or 'row'")
    rows, d_in = weight.shape
    pattern.check(d_in)
    if pattern.structured:
        mask_block = max(pattern.m, mask_block // pattern.m * pattern.m)
    upper, _, damping = escalating(inverse_upper_factor, *damp_hessian(hessian, damp))

    w = weight.to(upper.dtype).clone()
    keep = torch.ones(rows, d_in, dtype=torch.bool, device=w.device)
    # weights each block loses: over all its rows together, or in each row (rows=1 gives the per-row share)
    drops = pattern.pruned_per_block(rows if scope == "block" else 1, d_in, mask_block)
    for i1, drop in zip(range(0, d_in, mask_block), drops):
        i2 = min(i1 + mask_block, d_in)
        block = w[:, i1:i2].clone()
        errors = _prune_block(block, upper[i1:i2, i1:i2], keep[:, i1:i2], pattern, drop, scope)
        w[:, i1:i2] = block
        w[:, i2:] -= errors @ upper[i1:i2, i2:]
    w[~keep] = 0
    return w, keep, damping


def sparsegpt_rowwise(weight: torch.Tensor, hessian: torch.Tensor, pattern: Pattern, *, mask_block: int = 128,
                      damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor, Damping]:
    """SparseGPT with the same number of weights pruned in every row (not the reference rule)."""
    return sparsegpt(weight, hessian, pattern, mask_block=mask_block, damp=damp, scope="row")
