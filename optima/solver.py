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

import warnings
from dataclasses import dataclass, field

import torch

from optima.direct import batch_rows, solve_pinned_direct
from optima.hessian import Damping, cholesky_escalating

PRECONDITIONERS = ("hinv", "jacobi")
METHODS = ("auto", "pcg", "direct")


@dataclass
class SolverOptions:
    """Knobs of the QP solver; the defaults are exact to float32 precision."""

    method: str = "auto"            # "pcg", "direct" (batched Cholesky) or "auto" (by cost)
    preconditioner: str = "hinv"    # see module docstring
    tol: float = 1e-6               # relative residual per row: ||H_FF x - b|| <= tol ||b||
    max_iter: int = 2000            # CG iterations per Newton step
    max_newton: int = 50            # projected-Newton iterations (1 suffices with pins only)
    dtype: torch.dtype = torch.float32
    compile: bool | None = None     # torch.compile the CG step; None: on CUDA only (on the CPU the
                                    # compile time, paid per layer shape, outweighs the gain)
    memory_budget: int | None = None  # bytes for one batch of rows; None: a share of free memory
    check_every: int = 8            # CG iterations between convergence checks (host syncs)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown solver method {self.method!r}; choose from {METHODS}")
        if self.preconditioner not in PRECONDITIONERS:
            raise ValueError(f"unknown preconditioner {self.preconditioner!r}; choose from {PRECONDITIONERS}")
        if self.dtype not in (torch.float32, torch.float64):
            raise ValueError("the solver runs in float32 or float64")


@dataclass
class QPResult:
    """Solution of a batch of row QPs and how it was reached."""

    delta: torch.Tensor              # (rows, d) the update d
    converged: torch.Tensor          # (rows,) bool
    cg_iterations: torch.Tensor      # (rows,) CG iterations summed over Newton steps
    kkt_residual: torch.Tensor       # (rows,) ||projected gradient|| / ||initial gradient||
    newton_iterations: int = 0
    method: str = "pcg"
    damping: Damping | None = None
    escalated_rows: int = 0          # rows whose system needed extra damping (direct path)
    notes: list[str] = field(default_factory=list)


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


def _cg_step(x, r, p, rz, matrix, precond, free, threshold):
    """One PCG iteration for all rows; rows whose residual is below threshold stand still."""
    active = (r * r).sum(1) > threshold
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


_compiled_step = None


def _step_fn(compile: bool | None, device: torch.device):
    """The CG iteration, compiled once per process when asked (eager if that fails)."""
    global _compiled_step
    if not (compile if compile is not None else device.type == "cuda"):
        return _cg_step
    if _compiled_step is None:
        _compiled_step = torch.compile(_cg_step, dynamic=False, fullgraph=True)
    return _compiled_step


def pcg(matrix: torch.Tensor, rhs: torch.Tensor, free: torch.Tensor, precond: torch.Tensor | None,
        options: SolverOptions) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Solve ``matrix_FF x_F = rhs_F`` per row by preconditioned CG, x = 0 off the free set.

    Returns (x, iterations per row, converged per row).
    """
    rows = rhs.shape[0]
    rhs = rhs * free
    threshold = (options.tol ** 2) * (rhs * rhs).sum(1)
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    z = _masked_matmul(r, precond, free) if precond is not None else r.clone()
    p = z.clone()
    rz = (r * z).sum(1)
    iterations = torch.zeros(rows, dtype=torch.int64, device=rhs.device)
    step = _step_fn(options.compile, rhs.device)
    done = 0
    while done < options.max_iter:
        for _ in range(min(options.check_every, options.max_iter - done)):
            try:
                x, r, p, rz, active = step(x, r, p, rz, matrix, precond, free, threshold)
            except Exception as err:  # compilation trouble: say so once, run eagerly
                if step is _cg_step:
                    raise
                warnings.warn(f"torch.compile of the CG step failed ({type(err).__name__}: {err}); "
                              "running it eagerly", RuntimeWarning)
                options.compile = False
                step = _cg_step
                x, r, p, rz, active = step(x, r, p, rz, matrix, precond, free, threshold)
            iterations += active
            done += 1
        if not bool(((r * r).sum(1) > threshold).any()):
            break
    converged = (r * r).sum(1) <= threshold
    return x, iterations, converged


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
    dtype, device = options.dtype, hessian.device
    h = hessian.to(dtype)
    lower, upper = lower.to(dtype), upper.to(dtype)
    if (lower > upper).any():
        raise ValueError("lower bound above upper bound")
    scale = h.diagonal().clamp_min(torch.finfo(dtype).tiny).rsqrt()
    hs = scale[:, None] * h * scale[None, :]          # Jacobi-scaled Hessian, unit diagonal
    precond = None
    if options.preconditioner == "hinv":
        _, chol, _ = cholesky_escalating(hs, damping or Damping(0.0, 0.0, 0))
        precond = torch.cholesky_inverse(chol)
    lo, hi = lower / scale, upper / scale              # bounds in scaled coordinates
    rows, d = lower.shape
    budget = options.memory_budget or default_memory_budget(device)
    step_rows = batch_rows(rows, 10 * d * h.element_size(), budget)

    y = torch.zeros(rows, d, dtype=dtype, device=device)
    converged = torch.zeros(rows, dtype=torch.bool, device=device)
    cg_iters = torch.zeros(rows, dtype=torch.int64, device=device)
    kkt = torch.zeros(rows, dtype=dtype, device=device)
    newton = 0
    for start in range(0, rows, step_rows):
        sl = slice(start, start + step_rows)
        l, u = lo[sl], hi[sl]
        pinned = l == u
        box = ~pinned & (torch.isfinite(l) | torch.isfinite(u))
        yb = torch.zeros_like(l).clamp(l, u)
        g0 = _projected_gradient_norm(yb, yb @ hs, l, u).clamp_min(torch.finfo(dtype).tiny)
        for it in range(options.max_newton):
            g = yb @ hs
            fixed = pinned | ((yb <= l) & (g > 0)) | ((yb >= u) & (g < 0))
            rel = _projected_gradient_norm(yb, g, l, u) / g0
            if it > 0 and (not box.any() or bool((rel <= options.tol).all())):
                break
            step, iters, ok = pcg(hs, -g, (~fixed).to(dtype), precond, options)
            cg_iters[sl] += iters
            converged[sl] = ok
            newton = max(newton, it + 1)
            if not box.any():                      # pins only: the Newton step is the optimum
                yb = yb + step
                break
            yb = _line_search(yb, step, g, l, u, hs)
        kkt[sl] = _projected_gradient_norm(yb, yb @ hs, l, u) / g0
        if box.any():                              # general bounds: converged means a KKT point too
            converged[sl] &= kkt[sl] <= options.tol
        y[sl] = yb
    # back to weight units, exactly feasible: entries at a bound (pins included) get the bound itself
    delta = (y * scale).clamp_(lower, upper).where(y > lo, lower).where(y < hi, upper)
    return QPResult(delta=delta, converged=converged, cg_iterations=cg_iters, kkt_residual=kkt,
                    newton_iterations=newton, method="pcg", damping=damping)


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
                 options: SolverOptions | None = None) -> QPResult:
    """The OPTIMA row problem: best update of the kept weights once the pruned ones are zero.

    ``hessian`` is the damped Hessian; returns the update ``delta`` with ``w + delta``
    exactly zero on pruned entries.
    """
    options = options or SolverOptions()
    rows, d = weight.shape
    h = hessian.to(options.dtype)
    w = weight.to(device=h.device, dtype=options.dtype)
    keep = keep.to(h.device)
    method = options.method
    if method == "auto":
        smaller = min(int((~keep).sum(1).max()), int(keep.sum(1).max()))
        method = choose_method(d, smaller)
    if method == "direct":
        budget = options.memory_budget or default_memory_budget(h.device)
        delta, damping, escalated = solve_pinned_direct(h, w, keep, damping, budget)
        result = QPResult(delta=delta, converged=torch.ones(rows, dtype=torch.bool, device=h.device),
                          cg_iterations=torch.zeros(rows, dtype=torch.int64, device=h.device),
                          kkt_residual=torch.zeros(rows, dtype=h.dtype, device=h.device),
                          method="direct", damping=damping, escalated_rows=escalated)
    else:
        pins = torch.where(keep, torch.full_like(w, float("inf")), -w)
        result = solve_box_qp(h, torch.where(keep, -pins, pins), pins, options, damping)
    result.delta = torch.where(keep, result.delta, -w)   # pinned entries exactly -w
    # KKT residual of the kept-set system H_KK delta_K = H_KP w_P, the same measure for both paths
    rhs = torch.linalg.vector_norm(((w * ~keep) @ h) * keep, dim=1)
    gradient = torch.linalg.vector_norm((result.delta @ h) * keep, dim=1)
    result.kkt_residual = gradient / rhs.clamp_min(torch.finfo(h.dtype).tiny)
    return result
