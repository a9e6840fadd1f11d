"""Batched projected-Newton solver for box-constrained QPs that share one Hessian.

    minimize 1/2 d^T H d   subject to   lower <= d <= upper      (one problem per row)

A pruned weight is a pinned entry (lower = upper = -w_i). Each projected-Newton
iteration fixes the active set, then solves the Newton system on the free set
matrix-free with preconditioned conjugate gradients for all rows at once: the only
heavy operation is the batched matmul (rows x d) @ H. With pins only, the active set
is known in advance and one Newton step is the exact optimum (up to the CG tolerance).

Preconditioners (applied after symmetric Jacobi scaling of H, which is always done):
- ``"jacobi"``: the scaling alone, i.e. diagonal preconditioning.
- ``"hinv"``: the free-set block of the inverse of the damped, scaled H, shared by all
  rows. By the Schur identity ``(H_FF)^-1 = Hinv_FF - Hinv_FP (Hinv_PP)^-1 Hinv_PF``, so
  ``Hinv_FF`` is an approximate inverse whose error is a positive semidefinite
  correction; it costs one d x d factorization per layer and one more matmul per
  iteration, and cuts CG iterations several-fold on real Hessians (see bench/).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from optima.direct import batch_rows, solve_pinned_direct
from optima.hessian import Damping, cholesky_escalating

PRECONDITIONERS = ("hinv", "jacobi")
METHODS = ("auto", "pcg", "direct")


@dataclass
class SolverOptions:
    """Options of the OPTIMA QP solver; the defaults are exact to float32 precision.

    Args:
        method: "pcg" (matrix-free preconditioned CG), "direct" (batched Cholesky of each row's
            system) or "auto" (direct for small systems, PCG otherwise).
        preconditioner: "hinv" (free-set block of the scaled inverse Hessian) or "jacobi".
        stop: When CG stops a row. "gap": once a bound on its objective gap, relative to the
            objective at the start (for OPTIMA: the masked weights without update), is below
            ``tol``; the bound is r^T z, exact for the "hinv" preconditioner because
            (H_FF)^-1 <= Hinv_FF (module docstring), so the reported gap never understates the
            true one. "residual": once ||H_FF x - b|| <= tol ||b||. null: "gap" with the "hinv"
            preconditioner, "residual" with "jacobi".
        tol: The stopping tolerance of ``stop``.
        max_iter: CG iterations per Newton step.
        max_newton: Projected-Newton iterations (one suffices when only pruned entries are bound).
        dtype: Precision of the solve.
        compile: torch.compile the CG step; null: on CUDA only (on the CPU the compile time,
            paid once per layer shape, outweighs the gain).
        memory_budget: Bytes for one batch of rows; null: a quarter of free accelerator memory,
            2 GiB on the CPU.
        check_every: CG iterations between convergence checks (each one a host sync).
    """

    method: Literal["auto", "pcg", "direct"] = "auto"
    preconditioner: Literal["hinv", "jacobi"] = "hinv"
    stop: Literal["gap", "residual"] | None = None
    tol: float = 1e-6
    max_iter: int = 2000
    max_newton: int = 50
    dtype: Literal["float32", "float64"] = "float32"
    compile: bool | None = None
    memory_budget: int | None = None
    check_every: int = 8

    def __post_init__(self) -> None:
        from optima.config import OptionError, check_choice  # config imports this module

        check_choice("solver.method", self.method, METHODS)
        check_choice("solver.preconditioner", self.preconditioner, PRECONDITIONERS)
        check_choice("solver.stop", self.stop, ("gap", "residual", None))
        if self.stop == "gap" and self.preconditioner != "hinv":
            raise OptionError("solver.stop", "the gap bound r^T z needs preconditioner 'hinv'; use stop 'residual' "
                                             "with 'jacobi'")
        check_choice("solver.dtype", self.dtype, ("float32", "float64"))
        for option in ("tol", "max_iter", "max_newton", "check_every"):
            if not getattr(self, option) > 0:
                raise OptionError(f"solver.{option}", f"must be positive, got {getattr(self, option)}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def stop_rule(self) -> Literal["gap", "residual"]:
        return self.stop or ("gap" if self.preconditioner == "hinv" else "residual")


@dataclass
class QPResult:
    """Solution of a batch of row QPs and how it was reached."""

    delta: torch.Tensor              # (rows, d) the update d
    converged: torch.Tensor          # (rows,) bool
    cg_iterations: torch.Tensor      # (rows,) CG iterations summed over Newton steps
    kkt_residual: torch.Tensor       # (rows,) ||projected gradient|| / ||initial gradient||
    gap_bound: torch.Tensor | None = None  # (rows,) bound on the relative objective gap (stop="gap"; 0: direct)
    newton_iterations: int = 0
    method: str = "pcg"
    damping: Damping | None = None
    escalated_rows: int = 0          # rows whose system needed extra damping (direct path)


def default_memory_budget(device: torch.device) -> int:
    """A quarter of free accelerator memory, or 2 GiB on the CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 4
    return 2 << 30


def _masked_matmul(v: torch.Tensor, matrix: torch.Tensor, free: torch.Tensor) -> torch.Tensor:
    """Apply the free-set block of ``matrix`` to rows of ``v`` that are zero off the free set.

    Every CG vector (x, r, p, z) stays zero on fixed entries, so no input masking is needed.
    """
    return free * (v @ matrix)


def _cg_step(x, r, p, rz, matrix, precond, free, threshold, gap):
    """One PCG iteration for all rows; rows whose measure (r^T z with ``gap``, else r^T r) is below
    ``threshold`` stand still."""
    active = (rz if gap else (r * r).sum(1)) > threshold
    ap = _masked_matmul(p, matrix, free)
    pap = (p * ap).sum(1)
    alpha = torch.where(active, rz / pap.clamp_min(torch.finfo(pap.dtype).tiny), torch.zeros_like(rz))
    x = x + alpha[:, None] * p
    r = r - alpha[:, None] * ap
    z = _masked_matmul(r, precond, free) if precond is not None else r
    rz_new = (r * z).sum(1)
    beta = torch.where(active, rz_new / rz.clamp_min(torch.finfo(rz.dtype).tiny), torch.zeros_like(rz))
    p = z + beta[:, None] * p
    rz = torch.where(active, rz_new, rz)
    return x, r, p, rz, active


@functools.cache
def _compiled_cg_step() -> Callable:
    """The CG iteration compiled once per process (torch.compile itself specializes per shape)."""
    return torch.compile(_cg_step, dynamic=False, fullgraph=True)


def _step_for(compile: bool | None, device: torch.device) -> Callable:
    """The compiled CG iteration when asked (on CUDA by default), else the eager one."""
    return _compiled_cg_step() if (compile if compile is not None else device.type == "cuda") else _cg_step


def pcg(matrix: torch.Tensor, rhs: torch.Tensor, free: torch.Tensor, precond: torch.Tensor | None,
        options: SolverOptions, start_objective: torch.Tensor | None = None
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Solve ``matrix_FF x_F = rhs_F`` per row by preconditioned CG, x = 0 off the free set.

    With ``options.stop_rule == "gap"`` a row stops once r^T z <= tol * ``start_objective``.
    Returns (x, iterations per row, converged per row, the final stopping measure relative to
    its scale: the gap bound, or the relative residual).
    """
    rows = rhs.shape[0]
    rhs = rhs * free
    gap = options.stop_rule == "gap"
    scale = start_objective if gap else (rhs * rhs).sum(1)
    threshold = (options.tol if gap else options.tol ** 2) * scale
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    z = _masked_matmul(r, precond, free) if precond is not None else r.clone()
    p = z.clone()
    rz = (r * z).sum(1)
    iterations = torch.zeros(rows, dtype=torch.int64, device=rhs.device)
    step = _step_for(options.compile, rhs.device)
    done = 0
    while done < options.max_iter and bool(((rz if gap else (r * r).sum(1)) > threshold).any()):
        for _ in range(min(options.check_every, options.max_iter - done)):
            try:
                x, r, p, rz, active = step(x, r, p, rz, matrix, precond, free, threshold, gap)
            except Exception as err:  # a compiler problem must not stop a pruning run: finish this solve eagerly
                if step is _cg_step:
                    raise
                warnings.warn(f"torch.compile of the CG step failed ({type(err).__name__}: {err}); "
                              "running it eagerly", RuntimeWarning)
                step = _cg_step
                x, r, p, rz, active = step(x, r, p, rz, matrix, precond, free, threshold, gap)
            iterations += active
            done += 1
    measure = rz if gap else (r * r).sum(1)
    converged = measure <= threshold
    tiny = torch.finfo(measure.dtype).tiny
    relative = measure / scale.clamp_min(tiny) if gap else (measure / scale.clamp_min(tiny)).sqrt()
    return x, iterations, converged, relative


def _objective(x: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    return 0.5 * (x * (x @ hessian)).sum(1)


@torch.no_grad()
def solve_box_qp(hessian: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor,
                 options: SolverOptions | None = None, damping: Damping | None = None) -> QPResult:
    """Projected Newton with PCG inner solves for ``min 1/2 d^T H d, lower <= d <= upper`` per row.

    ``hessian`` must already be damped (positive definite); rows are processed in
    batches sized from the memory budget. Entries with ``lower == upper`` are pinned.
    """
    options = options or SolverOptions()
    dtype, device = options.torch_dtype, hessian.device
    h = hessian.to(dtype)
    lower, upper = lower.to(dtype), upper.to(dtype)
    if (lower > upper).any():
        raise ValueError("lower bound above upper bound")
    scale = h.diagonal().clamp_min(torch.finfo(dtype).tiny).rsqrt()
    hs = scale[:, None] * h * scale[None, :]          # Jacobi-scaled Hessian, unit diagonal
    precond, exact_preconditioner = None, False
    if options.preconditioner == "hinv":
        given = damping or Damping(0.0, 0.0, 0)
        _, chol, used = cholesky_escalating(hs, given)
        precond = torch.cholesky_inverse(chol)
        exact_preconditioner = used.value <= given.value  # else Hinv_FF < (H_FF)^-1 may hold: no proven bound
    lo, hi = lower / scale, upper / scale              # bounds in scaled coordinates
    rows, d = lower.shape
    budget = options.memory_budget or default_memory_budget(device)
    step_rows = batch_rows(rows, 10 * d * h.element_size(), budget)

    y = torch.zeros(rows, d, dtype=dtype, device=device)
    converged = torch.zeros(rows, dtype=torch.bool, device=device)
    cg_iters = torch.zeros(rows, dtype=torch.int64, device=device)
    kkt = torch.zeros(rows, dtype=dtype, device=device)
    measure = torch.zeros(rows, dtype=dtype, device=device)
    newton = 0
    for start in range(0, rows, step_rows):
        sl = slice(start, start + step_rows)
        y[sl], converged[sl], cg_iters[sl], kkt[sl], measure[sl], steps = _projected_newton(hs, lo[sl], hi[sl],
                                                                                           precond, options)
        newton = max(newton, steps)
    # back to weight units, exactly feasible: entries at a bound (pins included) get the bound itself
    delta = (y * scale).clamp_(lower, upper).where(y > lo, lower).where(y < hi, upper)
    return QPResult(delta=delta, converged=converged, cg_iterations=cg_iters, kkt_residual=kkt,
                    gap_bound=measure if options.stop_rule == "gap" and exact_preconditioner else None,
                    newton_iterations=newton, method="pcg", damping=damping)


def _projected_newton(hs: torch.Tensor, l: torch.Tensor, u: torch.Tensor, precond: torch.Tensor | None,
                      options: SolverOptions) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Projected Newton for one batch of rows in scaled coordinates, from the feasible point nearest 0.

    Each iteration fixes the entries at an active bound, solves the Newton system on the rest by
    PCG and backtracks along the projection arc. Returns (y, converged, CG iterations, relative
    KKT residual, the last CG solve's stopping measure, Newton iterations).
    """
    pinned = l == u
    box = ~pinned & (torch.isfinite(l) | torch.isfinite(u))
    y = torch.zeros_like(l).clamp(l, u)
    g0 = _projected_gradient_norm(y, y @ hs, l, u).clamp_min(torch.finfo(y.dtype).tiny)
    cg_iters = torch.zeros(l.shape[0], dtype=torch.int64, device=l.device)
    converged, newton = torch.zeros_like(cg_iters, dtype=torch.bool), 0
    gap_bound = torch.zeros_like(g0)
    # a gap tolerance is on a squared scale: the projected gradient's is its square root
    kkt_tol = options.tol ** 0.5 if options.stop_rule == "gap" else options.tol
    for it in range(options.max_newton):
        g = y @ hs
        fixed = pinned | ((y <= l) & (g > 0)) | ((y >= u) & (g < 0))
        rel = _projected_gradient_norm(y, g, l, u) / g0
        if it > 0 and (not box.any() or bool((rel <= kkt_tol).all())):
            break
        step, iters, converged, gap_bound = pcg(hs, -g, (~fixed).to(y.dtype), precond, options, (y * g).sum(1))
        cg_iters += iters
        newton = it + 1
        if not box.any():                      # pins only: the Newton step is the optimum
            y = y + step
            break
        y = _line_search(y, step, g, l, u, hs)
    kkt = _projected_gradient_norm(y, y @ hs, l, u) / g0
    if box.any():                              # general bounds: converged means a KKT point too
        converged = converged & (kkt <= kkt_tol)
    return y, converged, cg_iters, kkt, gap_bound, newton


def _projected_gradient_norm(y: torch.Tensor, g: torch.Tensor, lower: torch.Tensor,
                             upper: torch.Tensor) -> torch.Tensor:
    """Per-row norm of ``y - clamp(y - g)``: zero exactly at a KKT point of the box QP."""
    return torch.linalg.vector_norm(y - (y - g).clamp(lower, upper), dim=1)


def _line_search(y: torch.Tensor, step: torch.Tensor, g: torch.Tensor, lower: torch.Tensor,
                 upper: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """Per-row Armijo backtracking along the projection arc ``clamp(y + a * step)``."""
    f0 = _objective(y, hessian)
    alpha = torch.ones(y.shape[0], dtype=y.dtype, device=y.device)
    best = y
    pending = torch.ones_like(alpha, dtype=torch.bool)
    for _ in range(30):
        trial = (y + alpha[:, None] * step).clamp(lower, upper)
        accept = _objective(trial, hessian) <= f0 + 1e-4 * (g * (trial - y)).sum(1)
        take = pending & accept
        best = torch.where(take[:, None], trial, best)
        pending &= ~accept
        if not pending.any():
            break
        alpha = torch.where(pending, alpha * 0.5, alpha)
    return best


def choose_method(d: int, smaller_set: int) -> str:
    """Direct Cholesky only for small systems.

    Per row, a batched Cholesky costs k^3/3 flops at a fraction of matmul speed, PCG about
    40 iterations of two d^2 matmuls at full speed; measured on MiniLM layers (bench/),
    PCG wins from d = 384 on, so direct is kept for k^3/3 <= 8 d^2 (d up to ~200 at 50%).
    """
    return "direct" if smaller_set ** 3 / 3 <= 8 * d * d else "pcg"


@torch.no_grad()
def solve_pinned(hessian: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor, damping: Damping,
                 options: SolverOptions | None = None,
                 weight_range: tuple[torch.Tensor, torch.Tensor] | None = None) -> QPResult:
    """The OPTIMA row problem: best update of the kept weights once the pruned ones are zero.

    ``hessian`` is the damped Hessian; returns the update ``delta`` with ``w + delta``
    exactly zero on pruned entries. With ``weight_range`` = (low, high), per-row bounds of
    shape (rows,), every new kept weight also stays in [low, high]: a box-constrained QP
    that projected Newton solves with a few active-set changes.
    """
    options = options or SolverOptions()
    rows, d = weight.shape
    h = hessian.to(options.torch_dtype)
    w = weight.to(device=h.device, dtype=options.torch_dtype)
    keep = keep.to(h.device)
    method = options.method
    if method == "auto":
        smaller = min(int((~keep).sum(1).max()), int(keep.sum(1).max()))
        method = "pcg" if weight_range is not None else choose_method(d, smaller)
    if method == "direct":
        if weight_range is not None:
            raise ValueError("the direct solver has no bounds; use method 'pcg' or 'auto' with a weight range")
        budget = options.memory_budget or default_memory_budget(h.device)
        delta, damping, escalated = solve_pinned_direct(h, w, keep, damping, budget)
        result = QPResult(delta=delta, converged=torch.ones(rows, dtype=torch.bool, device=h.device),
                          cg_iterations=torch.zeros(rows, dtype=torch.int64, device=h.device),
                          kkt_residual=torch.zeros(rows, dtype=h.dtype, device=h.device),
                          gap_bound=torch.zeros(rows, dtype=h.dtype, device=h.device),
                          method="direct", damping=damping, escalated_rows=escalated)
    else:
        lower, upper = torch.full_like(w, -float("inf")), torch.full_like(w, float("inf"))
        if weight_range is not None:
            low, high = (bound.to(w)[:, None] for bound in weight_range)
            lower, upper = (low - w).clamp(max=0), (high - w).clamp(min=0)  # never exclude w itself
        lower, upper = torch.where(keep, lower, -w), torch.where(keep, upper, -w)
        result = solve_box_qp(h, lower, upper, options, damping)
    result.delta = torch.where(keep, result.delta, -w)   # pinned entries exactly -w
    if weight_range is None:
        # KKT residual of the kept-set system H_KK delta_K = H_KP w_P, the same measure for both paths
        rhs = torch.linalg.vector_norm(((w * ~keep) @ h) * keep, dim=1)
        gradient = torch.linalg.vector_norm((result.delta @ h) * keep, dim=1)
        result.kkt_residual = gradient / rhs.clamp_min(torch.finfo(h.dtype).tiny)
    return result
