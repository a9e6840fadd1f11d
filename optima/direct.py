"""Exact row solutions by batched Cholesky: the reference path, and the fast one for small sets.

For a row with kept set K and pruned set P the optimum moves the kept weights by
``delta_K = H_KK^-1 H_KP w_P``. Equivalently (OBS form) ``delta = -Hinv[:, P] z`` with
``Hinv_PP z = w_P``. Both are one small SPD system per row (``linalg.solve_rows``); we solve the
smaller one.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from optima.linalg import Damping, cholesky_escalating, solve_rows


@torch.no_grad()
def solve_pinned_direct(hessian: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor, damping: Damping,
                        memory_budget: int) -> tuple[torch.Tensor, Damping]:
    """Exact update ``delta`` (rows, d) for damped ``hessian`` with pruned entries pinned to ``-w``.

    Chooses the kept-set or the OBS (pruned-set) form, whichever system is smaller.
    Returns (delta, damping actually used, with the rows whose system needed damping of its own).
    """
    pruned = ~keep
    pinned = -weight * pruned
    if int(pruned.sum(1).max()) < int(keep.sum(1).max()):
        hessian, chol, damping = cholesky_escalating(hessian, damping)
        hinv = torch.cholesky_inverse(chol)
        z, escalated = solve_rows(hinv, pruned, -pinned, memory_budget)
        return -(z @ hinv), replace(damping, escalated_rows=escalated)
    rhs = -(pinned @ hessian)
    free, escalated = solve_rows(hessian, keep, rhs, memory_budget)
    return pinned + free, replace(damping, escalated_rows=escalated)
