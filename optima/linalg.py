"""Linear algebra shared by the masks, the updates and the solver.

- the reconstruction objective (``quadratic_form``, ``reconstruction_error``);
- damping escalation, one policy for every factorization: a matrix that does not factor gets ten
  times its damping (at least 1e-8 of its mean diagonal) and is tried again, up to ``TRIES`` times,
  and what was finally added is reported as a ``Damping`` (with ``escalated_rows`` where per-row
  systems were escalated one by one);
- the upper factor ``U`` of ``H^-1 = U^T U`` without forming ``H^-1`` (``inverse_upper_factor``);
- the batched per-row SPD solve ``A[S_r, S_r] x_r = b_r[S_r]`` (``solve_rows``), rows grouped by
  ``|S_r|`` so that no system is padded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

TRIES = 6   # damping escalations (x10 each) before a factorization gives up

T = TypeVar("T")


def quadratic_form(x: torch.Tensor, hessian: torch.Tensor, per_row: bool = True) -> torch.Tensor:
    """x^T H x of each row of ``x`` (``per_row``), else summed over all of its entries; in x's dtype."""
    terms = x * (x @ hessian)
    return terms.sum(1) if per_row else terms.sum()


def reconstruction_error(new: torch.Tensor, weight: torch.Tensor, hessian: torch.Tensor,
                         per_row: bool = True) -> torch.Tensor:
    """(w' - w)^T H (w' - w) in float64: the output error of replacing ``weight`` by ``new`` on the
    calibration inputs (H = X^T X), per row or for the whole layer."""
    return quadratic_form(new.double() - weight.double(), hessian.double(), per_row)


@dataclass
class Damping:
    """What was done to make a Hessian safely positive definite."""

    frac: float              # requested damping, relative to mean(diag H)
    value: float             # absolute amount added to the diagonal
    dead_inputs: int         # inputs with zero diagonal (never active in calibration)
    escalated_rows: int = 0  # per-row systems that needed damping of their own to factor


def add_damping(hessian: torch.Tensor, damping: Damping) -> tuple[torch.Tensor, Damping]:
    """Ten times the damping (at least 1e-8 of mean diag): the escalation step after a failed factorization."""
    extra = max(damping.value, 1e-8 * hessian.diagonal().mean().item()) * 9.0
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    return hessian + extra * eye, Damping(frac=damping.frac, value=damping.value + extra,
                                          dead_inputs=damping.dead_inputs, escalated_rows=damping.escalated_rows)


def escalating(factor: Callable[[torch.Tensor], T | None], hessian: torch.Tensor, damping: Damping,
               tries: int = TRIES) -> tuple[T, torch.Tensor, Damping]:
    """``factor(H)``, adding damping x10 (``add_damping``) each time it returns None.

    Returns ``(factor(H'), H', damping)`` with ``H'`` the matrix finally factored; never falls back
    silently: the returned ``Damping`` says how much was finally used.
    """
    h = hessian
    for _ in range(tries):
        out = factor(h)
        if out is not None:
            return out, h, damping
        h, damping = add_damping(h, damping)
    raise torch.linalg.LinAlgError(f"matrix is not positive definite even with damping {damping.value:.3g}")


def cholesky(h: torch.Tensor) -> torch.Tensor | None:
    """The lower Cholesky factor of ``h``, or None if it does not factor to finite numbers."""
    factor, info = torch.linalg.cholesky_ex(h)
    return factor if info.item() == 0 and torch.isfinite(factor).all() else None


def cholesky_escalating(hessian: torch.Tensor, damping: Damping,
                        tries: int = TRIES) -> tuple[torch.Tensor, torch.Tensor, Damping]:
    """Cholesky factor of a damped Hessian under the escalation policy: ``(H, L, damping)``, ``H = L L^T``."""
    factor, h, damping = escalating(cholesky, hessian, damping, tries)
    return h, factor, damping


def inverse_upper_factor(h: torch.Tensor) -> torch.Tensor | None:
    """Upper ``U`` with ``H^-1 = U^T U``, or None if ``H`` does not factor.

    With ``J`` the index reversal, ``J H J = L L^T`` gives ``H = (J L J)(J L J)^T`` with ``J L J``
    upper, so ``U = J L^-1 J``: one Cholesky and one triangular inverse, ``H^-1`` never formed
    (``torch.cholesky_inverse`` is much slower multi-threaded on a busy CPU).
    """
    lower = cholesky(h.flip(0, 1))
    if lower is None:
        return None
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    upper = torch.linalg.solve_triangular(lower, eye, upper=False).flip(0, 1)
    return upper if torch.isfinite(upper).all() else None


def batch_rows(rows: int, bytes_per_row: int, memory_budget: int) -> int:
    """How many rows fit in ``memory_budget`` bytes (at least one)."""
    return max(1, min(rows, memory_budget // max(1, bytes_per_row)))


def _cholesky_rows(systems: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Lower Cholesky factors of a batch of SPD systems; a system that does not factor is escalated on
    its own (``escalating``). Returns the factors and how many systems were escalated."""
    factors, info = torch.linalg.cholesky_ex(systems)
    bad = ((info != 0) | ~torch.isfinite(factors).flatten(1).all(1)).nonzero().squeeze(1).tolist()
    for i in bad:
        factors[i] = escalating(cholesky, systems[i], Damping(0.0, 0.0, 0))[0]
    return factors, len(bad)


def solve_rows(matrix: torch.Tensor, members: torch.Tensor, rhs: torch.Tensor,
               memory_budget: int) -> tuple[torch.Tensor, int]:
    """Solve ``matrix[S_r, S_r] x_r = rhs[r, S_r]`` for every row r, ``S_r = members[r]`` (SPD systems).

    Rows are grouped by ``|S_r|`` (no padding) and factored in batches of at most ``memory_budget``
    bytes. Returns the solutions scattered into a tensor shaped like ``rhs`` (zero off ``S_r``) and
    the number of rows whose system needed damping of its own to factor.
    """
    counts = members.sum(1)
    first = torch.argsort((~members).to(torch.uint8), dim=1, stable=True)  # each row's members first, in order
    out = torch.zeros_like(rhs)
    escalated = 0
    for k in counts.unique().tolist():
        if k == 0:
            continue
        group = (counts == k).nonzero().squeeze(1)
        for batch in group.split(batch_rows(len(group), 3 * k * k * matrix.element_size(), memory_budget)):
            idx = first[batch, :k]
            factors, raised = _cholesky_rows(matrix[idx[:, :, None], idx[:, None, :]])
            escalated += raised
            b = rhs[batch[:, None], idx]
            out[batch[:, None], idx] = torch.cholesky_solve(b[:, :, None], factors)[:, :, 0]
    return out, escalated
