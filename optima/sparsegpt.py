"""SparseGPT: OBS saliency mask chosen block-wise, with its greedy weight update.

Columns are visited left to right. A pruned column's error is compensated only into
the columns to its right (through the upper Cholesky factor of H^-1), which is why
the result is not the per-row optimum that OPTIMA computes for the same mask.
Masks are chosen per block of ``blocksize`` columns from the weights as already
updated by earlier blocks (the paper's lazy-batch scheme).
"""

from __future__ import annotations

import torch

from optima.hessian import Damping, add_damping, cholesky_escalating, damp_hessian
from optima.masks import Pattern


@torch.no_grad()
def sparsegpt(weight: torch.Tensor, hessian: torch.Tensor, pattern: Pattern, *, blocksize: int = 128,
              damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor, Damping]:
    """Prune ``weight`` with SparseGPT; return (updated weight, keep-mask, damping used).

    Works in the Hessian's dtype; the returned weight has that dtype too.
    Unstructured: every row loses exactly ``pattern.pruned_per_row(d_in)`` weights,
    spread over blocks in proportion to their width.
    """
    rows, d_in = weight.shape
    pattern.check(d_in)
    if pattern.structured:
        blocksize = max(pattern.m, blocksize // pattern.m * pattern.m)
    h, damping = damp_hessian(hessian, damp)
    for _ in range(6):  # both H and its inverse must factor; near-singular H can fail the second
        h, chol, damping = cholesky_escalating(h, damping)
        upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
        if info.item() == 0 and torch.isfinite(upper).all():
            break
        h, damping = add_damping(h, damping)
    else:
        raise torch.linalg.LinAlgError(f"inverse Hessian does not factor even with damping {damping.value:.3g}")

    w = weight.to(h.dtype).clone()
    keep = torch.ones(rows, d_in, dtype=torch.bool, device=w.device)
    for i1 in range(0, d_in, blocksize):
        i2 = min(i1 + blocksize, d_in)
        u_block = upper[i1:i2, i1:i2]
        block = w[:, i1:i2].clone()
        errors = torch.zeros_like(block)
        saliency = block.pow(2) / u_block.diagonal().pow(2)
        if not pattern.structured:
            drop = round(pattern.sparsity * i2) - round(pattern.sparsity * i1)
            if drop:
                idx = saliency.topk(drop, dim=1, largest=False).indices
                keep[:, i1:i2].scatter_(1, idx, False)
        for j in range(i2 - i1):
            col = i1 + j
            if pattern.structured and j % pattern.m == 0:
                group = (block[:, j:j + pattern.m].pow(2)
                         / u_block.diagonal()[j:j + pattern.m].pow(2))
                idx = group.topk(pattern.m - pattern.n, dim=1, largest=False).indices
                keep[:, col:col + pattern.m].scatter_(1, idx, False)
            w_col = block[:, j]
            q_col = w_col * keep[:, col]
            err = (w_col - q_col) / u_block[j, j]
            block[:, j:] -= err[:, None] * u_block[j, j:][None, :]
            block[:, j] = q_col
            errors[:, j] = err
        w[:, i1:i2] = block
        w[:, i2:] -= errors @ upper[i1:i2, i2:]
    w[~keep] = 0
    return w, keep, damping


sparsegpt_rowwise = sparsegpt  # placeholder until the reference rule lands
