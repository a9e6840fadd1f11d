"""ADMM pruning (Boza 2024, arXiv 2401.02938): the mask re-chosen while ADMM moves the weights.

The layer problem min ||(W' - W) X||^2 subject to W' having the pattern is split ADMM-style into a
dense least-squares variable ``V`` and a sparse copy ``Z`` tied by a scaled dual ``U``:

    Z <- (V + U) * mask,    U <- U + V - Z,    V <- (H + rho I)^-1 (H W + rho (Z - U))

all in the Jacobi-scaled space of the reference code (``lib/admm.py``, ``AdmmPruner.fasterprune``,
github fmfi-compbio/admm-pruning): inputs divided by ``sqrt(diag H) + 1e-8``, so ``H`` has a unit
diagonal and ``|V + U|`` is Wanda's score of the current weights. ``H`` gets the reference's damping
``damp * mean(diag H)`` (0.1 there) on top of ``rho = 1``. During the first ``mask_iterations``
steps the mask is chosen again from ``|V + U|``; after them it stays. The result is ``Z``, pruned
entries exactly 0.

As the reference code does (and where it departs from the paper's description):

- Unstructured: one threshold over the whole layer, at the full sparsity from the first step (the
  reference computes the cubic schedule but its layer-wide branch does not use it).
- N:M: the N largest of every group of M are always kept; of the others, the lowest fraction
  ``s (1 - (1 - (t + 1) / mask_iterations)^3)`` of the layer is pruned at step t, reaching the
  pattern at the last mask step. The reference hard-codes groups of 4 keeping 2; here any N:M.
"""

from __future__ import annotations

import torch

from optima.linalg import Damping
from optima.masks import Pattern, prune_lowest, prune_nm

ITERATIONS = 20        # the reference's ``iters``
MASK_ITERATIONS = 15   # the reference's ``iterative_prune``
RHO = 1.0              # the reference's ADMM penalty, in the unit-diagonal space
DAMP = 0.1             # the reference's ``percdamp`` for ADMM (SparseGPT's is 0.01)


def _mask(score: torch.Tensor, pattern: Pattern, step: int, mask_iterations: int) -> torch.Tensor:
    """The keep-mask of step ``step`` from ``score`` = |V + U| (rows, d_in)."""
    if not pattern.structured:
        return prune_lowest(score.reshape(-1), pattern.pruned_count(score.numel())).reshape(score.shape)
    fraction = pattern.sparsity * (1 - (1 - (step + 1) / mask_iterations) ** 3)
    protected = score.masked_fill(prune_nm(score, pattern), float("inf"))  # each group's N largest stay
    return prune_lowest(protected.reshape(-1), int(score.numel() * fraction)).reshape(score.shape)


@torch.no_grad()
def admm(weight: torch.Tensor, hessian: torch.Tensor, pattern: Pattern, *, damp: float = DAMP,
         iterations: int = ITERATIONS, mask_iterations: int = MASK_ITERATIONS,
         rho: float = RHO) -> tuple[torch.Tensor, torch.Tensor, Damping]:
    """Prune ``weight`` (rows, d_in) with ADMM; return (updated weight, keep-mask, damping used).

    ``hessian`` is the undamped ``X^T X`` (any positive scale); the work and the result are in its dtype.
    The damping reported is the mean amount added to the diagonal of ``hessian`` itself.
    """
    rows, d_in = weight.shape
    pattern.check(d_in)
    if iterations < 1 or not 1 <= mask_iterations <= iterations:
        raise ValueError(f"need 1 <= mask_iterations <= iterations, got {mask_iterations} and {iterations}")
    if damp < 0 or rho <= 0:
        raise ValueError(f"need damp >= 0 and rho > 0, got {damp} and {rho}")
    norm = hessian.diagonal().clamp_min(0).sqrt() + 1e-8
    h = hessian / norm[:, None] / norm[None, :]
    w = weight.to(h.dtype) * norm
    added = damp * h.diagonal().mean()
    h.diagonal().add_(added)
    target = w @ h                                    # (H + damping) W, rows as vectors
    h.diagonal().add_(rho)
    solve = torch.cholesky_inverse(torch.linalg.cholesky(h))  # unit diagonal + 1.1 I: well conditioned
    v, u = w, torch.zeros_like(w)
    for step in range(iterations):
        if step < mask_iterations:
            keep = _mask((v + u).abs(), pattern, step, mask_iterations)
        z = (v + u) * keep
        u = u + v - z
        v = (target + rho * (z - u)) @ solve
    z = (v + u) * keep / norm
    dead = int((hessian.diagonal() <= 0).sum())
    return z, keep, Damping(frac=damp, value=float(added) * float(hessian.diagonal().mean()), dead_inputs=dead)
