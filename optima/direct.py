"""Exact row solutions by batched Cholesky: the reference path, and the fast one for small sets.

For a row with kept set K and pruned set P the optimum moves the kept weights by
``delta_K = H_KK^-1 H_KP w_P``. Equivalently (OBS form) ``delta = -Hinv[:, P] z`` with
``Hinv_PP z = w_P``. Both are one small SPD system per row; we solve the smaller one.
Rows whose sets differ in size are padded with identity rows, so any mask batches.
"""

from __future__ import annotations

import torch

from optima.hessian import Damping, cholesky_escalating


def batch_rows(rows: int, bytes_per_row: int, memory_budget: int) -> int:
    """How many rows fit in ``memory_budget`` bytes (at least one)."""
    return max(1, min(rows, memory_budget // max(1, bytes_per_row)))


def solve_subsystems(matrix: torch.Tensor, members: torch.Tensor, rhs: torch.Tensor,
                     memory_budget: int) -> tuple[torch.Tensor, int]:
    """Solve ``matrix[S_r, S_r] x = rhs[r, S_r]`` for every row r, S_r = members[r].

    Returns the solutions scattered into a (rows, d) tensor (zero outside S_r) and the
    number of rows whose submatrix needed extra damping to factor.
    """
    rows, d = members.shape
    size = int(members.sum(1).max())
    out = torch.zeros_like(rhs)
    if size == 0:
        return out, 0
    per_row = 3 * size * size * matrix.element_size()
    step = batch_rows(rows, per_row, memory_budget)
    order = torch.arange(d, device=members.device)
    escalated = 0
    for start in range(0, rows, step):
        sl = slice(start, start + step)
        m = members[sl]
        # indices of each row's members first, padding slots after them
        idx = torch.argsort((~m).long() * d + order, dim=1)[:, :size]
        valid = torch.gather(m, 1, idx)
        sub = matrix[idx[:, :, None], idx[:, None, :]]
        both = valid[:, :, None] & valid[:, None, :]
        eye = torch.eye(size, dtype=matrix.dtype, device=matrix.device)
        sub = torch.where(both, sub, eye * (~valid[:, :, None]))
        b = torch.gather(rhs[sl], 1, idx) * valid
        chol, info = torch.linalg.cholesky_ex(sub)
        bad = info > 0
        if bad.any():  # factor those rows again with more damping, never silently
            escalated += int(bad.sum())
            scale = sub[bad].diagonal(dim1=-2, dim2=-1).mean(-1)
            for boost in (1e-6, 1e-4, 1e-2, 1.0):
                fixed = sub[bad] + boost * scale[:, None, None] * eye
                c, inf = torch.linalg.cholesky_ex(fixed)
                if not (inf > 0).any():
                    chol[bad] = c
                    break
            else:
                raise torch.linalg.LinAlgError("row subsystem is not positive definite at any damping")
        x = torch.cholesky_solve(b.unsqueeze(-1), chol).squeeze(-1) * valid
        out[sl].scatter_(1, idx, x)
    return out, escalated


@torch.no_grad()
def solve_pinned_direct(hessian: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor, damping: Damping,
                        memory_budget: int) -> tuple[torch.Tensor, Damping, int]:
    """Exact update ``delta`` (rows, d) for damped ``hessian`` with pruned entries pinned to ``-w``.

    Chooses the kept-set or the OBS (pruned-set) form, whichever system is smaller.
    Returns (delta, damping actually used, rows that needed extra damping).
    """
    pruned = ~keep
    pinned = -weight * pruned
    if int(pruned.sum(1).max()) < int(keep.sum(1).max()):
        hessian, chol, damping = cholesky_escalating(hessian, damping)
        hinv = torch.cholesky_inverse(chol)
        z, escalated = solve_subsystems(hinv, pruned, -pinned, memory_budget)
        return -(z @ hinv), damping, escalated
    rhs = -(pinned @ hessian)
    free, escalated = solve_subsystems(hessian, keep, rhs, memory_budget)
    return pinned + free, damping, escalated
