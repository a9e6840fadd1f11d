"""Batched projected-Newton solver for box-constrained QPs that share one Hessian.

    minimize 1/2 d^T H d   subject to   lower <= d <= upper      (one problem per row)

A pruned weight is a pinned entry (lower = upper = -w_i). Each projected-Newton
iteration fixes the active set, then solves the Newton system on the free set
matrix-free with preconditioned conjugate gradients for all rows at once: the only
heavy operation is the batched matmul (rows x d) @ H. With pins only, the active set
is known in advance and one Newton step is the exact optimum (up to the CG tolerance).

Preconditioners (applied after symmetric Jacobi scaling of H, which is always done):
- ``"jacobi"``: the scaling alone, i.e. diagonal preconditioning.
- ``"ldl"`` (default on the CPU): the free-set restriction of a block LDL^T factorization of H
  (``optima.block_ldl``); like "hinv" it never understates a row's gap, costs about one matmul per
  iteration and needs fewer iterations than "hinv" on real layers (bench/README.md measures both).
- ``"hinv"``: the free-set block of the inverse of the damped, scaled H, shared by all
  rows. By the Schur identity ``(H_FF)^-1 = Hinv_FF - Hinv_FP (Hinv_PP)^-1 Hinv_PF``, so
  ``Hinv_FF`` is an approximate inverse whose error is a positive semidefinite
  correction; it costs one d x d factorization per layer and one more matmul per
  iteration, and cuts CG iterations several-fold on real Hessians (see bench/).

Rows are solved in batches sized from ``SolverOptions.memory_budget``: besides the d x d
matrices, only the weight, the mask and the returned update span the whole layer. With
``matmul="bfloat16"`` (or "tf32" on CUDA) CG multiplies low-precision copies of H and the
preconditioner's factors, and iterative refinement in the solve's dtype restores full accuracy
(``optima.cg.refined_pcg``). The CG kernel itself (its step, compile fallback and refinement) is ``optima.cg``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch

from optima.block_ldl import BlockLDL, keep_rate_order
from optima.cg import CGOptions, Operator, pcg, refined_pcg
from optima.direct import solve_pinned_direct
from optima.errors import OptionError, check_choice
from optima.linalg import Damping, batch_rows, cholesky_escalating, quadratic_form

PRECONDITIONERS = ("ldl", "hinv", "jacobi")   # "ldl" and "hinv" have M^-1 >= (H_FF)^-1: r^T z bounds the gap
METHODS = ("auto", "pcg", "direct")


@dataclass
class SolverOptions:
    """Options of the OPTIMA QP solver; the defaults are exact to float32 precision.

    Args:
        method: "pcg" (matrix-free preconditioned CG), "direct" (batched Cholesky of each row's
            system) or "auto" (direct for small systems, PCG otherwise).
        preconditioner: "ldl" (free-set restriction of a block LDL^T factorization of the scaled
            Hessian, ``optima.block_ldl``), "hinv" (free-set block of the scaled inverse Hessian) or
            "jacobi". null: "ldl" on the CPU, the fastest there (bench/README.md), "hinv"
            on CUDA, where "ldl"'s 2 d / block_size thin matmuls per CG iteration (each a kernel
            launch, and a block loop that torch.compile unrolls) have not been measured yet.
        block_size: Block size of the "ldl" factorization: smaller blocks, fewer CG iterations but
            thinner matmul panels (``block_size >= d`` is "hinv").
        stop: When CG stops a row. "gap": once a bound on its objective gap, relative to the
            objective at the start (for OPTIMA: the masked weights without update), is below
            ``tol``; the bound is r^T z, exact for the "ldl" and "hinv" preconditioners because
            their M^-1 >= (H_FF)^-1 (module docstring), so the reported gap never understates the
            true one. "residual": once ||H_FF x - b|| <= tol ||b||. null: "gap" with "ldl" or
            "hinv", "residual" with "jacobi".
        tol: The stopping tolerance of ``stop``.
        max_iter: CG iterations per Newton step.
        max_newton: Projected-Newton iterations (one suffices when only pruned entries are bound).
        dtype: Precision of the solve.
        compile: torch.compile the CG step; null: on CUDA only (on the CPU the compile time,
            paid once per layer shape, outweighs the gain).
        memory_budget: Bytes for one batch of rows; null: a quarter of free accelerator memory,
            2 GiB on the CPU.
        check_every: CG iterations between convergence checks; null: 1 on the CPU (a check is free
            there, and every iteration run after the last row converged is wasted), 8 on CUDA
            (each check is a host sync).
        matmul: Precision of CG's matmuls. "full": the solve's ``dtype``. "bfloat16" or "tf32"
            (TF32 on CUDA only; elsewhere full precision): CG runs on low-precision copies of H and
            the preconditioner to a loose tolerance, and iterative refinement corrects the answer
            in ``dtype``: each round recomputes the residual and the stopping measure (the gap
            bound r^T z) in full precision, so the stopping rule and its bound hold as with "full".
    """

    method: Literal["auto", "pcg", "direct"] = "auto"
    preconditioner: Literal["ldl", "hinv", "jacobi"] | None = None
    block_size: int = 64
    stop: Literal["gap", "residual"] | None = None
    tol: float = 1e-6
    max_iter: int = 2000
    max_newton: int = 50
    dtype: Literal["float32", "float64"] = "float32"
    compile: bool | None = None
    memory_budget: int | None = None
    check_every: int | None = None
    matmul: Literal["full", "bfloat16", "tf32"] = "full"

    def __post_init__(self) -> None:
        check_choice("solver.method", self.method, METHODS)
        check_choice("solver.preconditioner", self.preconditioner, (*PRECONDITIONERS, None))
        check_choice("solver.stop", self.stop, ("gap", "residual", None))
        if self.stop == "gap" and self.preconditioner == "jacobi":
            raise OptionError("solver.stop", "the gap bound r^T z needs preconditioner 'ldl' or 'hinv'; use stop "
                                             "'residual' with 'jacobi'")
        check_choice("solver.dtype", self.dtype, ("float32", "float64"))
        check_choice("solver.matmul", self.matmul, ("full", "bfloat16", "tf32"))
        for option in ("tol", "max_iter", "max_newton", "check_every", "block_size"):
            if getattr(self, option) is not None and not getattr(self, option) > 0:
                raise OptionError(f"solver.{option}", f"must be positive, got {getattr(self, option)}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def stop_rule(self) -> Literal["gap", "residual"]:
        return self.stop or ("residual" if self.preconditioner == "jacobi" else "gap")

    @property
    def cg(self) -> CGOptions:
        """How the CG kernel runs and stops under these options."""
        return CGOptions(gap=self.stop_rule == "gap", tol=self.tol, max_iter=self.max_iter, compile=self.compile,
                         check_every=self.check_every, matmul=self.matmul)

    def preconditioner_on(self, device: torch.device) -> Literal["ldl", "hinv", "jacobi"]:
        """The preconditioner used on ``device`` (``preconditioner``, or its default there)."""
        return self.preconditioner or ("hinv" if device.type == "cuda" else "ldl")


@dataclass
class QPResult:
    """Solution of a batch of row QPs and how it was reached."""

    delta: torch.Tensor              # (rows, d) the update d
    converged: torch.Tensor          # (rows,) bool
    cg_iterations: torch.Tensor      # (rows,) CG iterations summed over Newton steps
    kkt_residual: torch.Tensor       # (rows,) ||projected gradient|| / ||initial gradient||, Jacobi-scaled
    gap_bound: torch.Tensor | None = None  # (rows,) bound on the relative objective gap (stop="gap"; 0: direct)
    newton_iterations: int = 0
    method: str = "pcg"
    damping: Damping | None = None   # with the rows whose system needed damping of its own (direct path)


def default_memory_budget(device: torch.device) -> int:
    """A quarter of free accelerator memory, or 2 GiB on the CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 4
    return 2 << 30


@dataclass
class _ScaledProblem:
    """What every row batch of a layer shares: the Jacobi-scaled Hessian and the preconditioner."""

    operator: Operator                 # scale H scale (unit diagonal, inputs in ``order``) and the preconditioner
    scale: torch.Tensor                # diag(H)^-1/2: weight units = scale * scaled units (in ``order``)
    order: torch.Tensor | None         # "ldl": the factorization's input order; None: as given
    exact_preconditioner: bool         # M^-1 >= (H_FF)^-1 holds, so r^T z bounds the gap


def _check_order(order: torch.Tensor, d: int, device: torch.device) -> torch.Tensor:
    """``order`` as a long tensor on ``device``, or ValueError unless it is a permutation of the d inputs."""
    order = order.to(device=device, dtype=torch.long)
    if order.shape != (d,) or not torch.equal(order.sort().values, torch.arange(d, device=device)):
        raise ValueError(f"order must be a permutation of the {d} inputs")
    return order


def _scaled_problem(hessian: torch.Tensor, options: SolverOptions, damping: Damping | None,
                    order: torch.Tensor | None = None) -> _ScaledProblem:
    """Scale the (damped) Hessian to unit diagonal and factor the preconditioner, once per layer.

    ``order``: the input order of the "ldl" factorization (None: as given; ignored by the others).
    """
    h = hessian.to(options.torch_dtype)
    kind = options.preconditioner_on(h.device)
    if kind != "ldl":
        order = None
    if order is not None:
        h = h[order][:, order]
    scale = h.diagonal().clamp_min(torch.finfo(h.dtype).tiny).rsqrt()
    hs = scale[:, None] * h * scale[None, :]
    precond, exact = None, False
    given = damping or Damping(0.0, 0.0, 0)
    if kind != "jacobi":
        _, chol, used = cholesky_escalating(hs, given)
        precond = (BlockLDL.from_cholesky(chol, options.block_size) if kind == "ldl"
                   else torch.cholesky_inverse(chol))
        exact = used.value <= given.value  # else M^-1 < (H_FF)^-1 may hold: no proven bound
    operator = Operator(hs, precond)
    if options.matmul != "full":
        low = torch.bfloat16 if options.matmul == "bfloat16" else hs.dtype
        operator.low_matrix = hs.to(low)
        operator.low_precond = precond.to(low) if precond is not None else None
    return _ScaledProblem(operator, scale, order, exact)


def _row_batches(rows: int, d: int, element_size: int, options: SolverOptions,
                 device: torch.device) -> Iterator[slice]:
    """Row slices whose solver tensors (about 27 (rows x d) ones in PCG, 3 more in "ldl") fit the memory budget."""
    budget = options.memory_budget or default_memory_budget(device)
    tensors = 30 if options.preconditioner_on(device) == "ldl" else 27
    step = batch_rows(rows, tensors * d * element_size, budget)
    return (slice(start, start + step) for start in range(0, rows, step))


@dataclass
class _BatchResult:
    delta: torch.Tensor
    converged: torch.Tensor
    cg_iterations: torch.Tensor
    kkt_residual: torch.Tensor
    measure: torch.Tensor
    newton: int


def _solve_batch(problem: _ScaledProblem, lower: torch.Tensor, upper: torch.Tensor,
                 options: SolverOptions) -> _BatchResult:
    """Projected Newton on one batch of rows; the update comes back in weight units, exactly feasible."""
    if problem.order is not None:
        lower, upper = lower[:, problem.order], upper[:, problem.order]
    lo, hi = lower / problem.scale, upper / problem.scale
    y, converged, iters, kkt, measure, newton = _projected_newton(problem, lo, hi, options)
    # entries at a bound (pins included) get the bound itself
    delta = (y * problem.scale).clamp_(lower, upper).where(y > lo, lower).where(y < hi, upper)
    if problem.order is not None:
        delta = torch.empty_like(delta).index_copy_(1, problem.order, delta)
    return _BatchResult(delta, converged, iters, kkt, measure, newton)


class _Collected:
    """Per-row results of the row batches, gathered into whole-layer vectors."""

    def __init__(self, rows: int, d: int, dtype: torch.dtype, device: torch.device) -> None:
        self.delta = torch.empty(rows, d, dtype=dtype, device=device)
        self.converged = torch.zeros(rows, dtype=torch.bool, device=device)
        self.cg_iterations = torch.zeros(rows, dtype=torch.int64, device=device)
        self.kkt = torch.zeros(rows, dtype=dtype, device=device)
        self.measure = torch.zeros(rows, dtype=dtype, device=device)
        self.newton = 0

    def put(self, rows: slice, batch: _BatchResult) -> None:
        self.delta[rows], self.converged[rows], self.cg_iterations[rows] = (batch.delta, batch.converged,
                                                                             batch.cg_iterations)
        self.kkt[rows], self.measure[rows] = batch.kkt_residual, batch.measure
        self.newton = max(self.newton, batch.newton)

    def result(self, problem: _ScaledProblem, options: SolverOptions, damping: Damping | None) -> QPResult:
        proven = options.stop_rule == "gap" and problem.exact_preconditioner
        return QPResult(delta=self.delta, converged=self.converged, cg_iterations=self.cg_iterations,
                        kkt_residual=self.kkt, gap_bound=self.measure if proven else None,
                        newton_iterations=self.newton, method="pcg", damping=damping)


@torch.no_grad()
def solve_box_qp(hessian: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor,
                 options: SolverOptions | None = None, damping: Damping | None = None) -> QPResult:
    """Projected Newton with PCG inner solves for ``min 1/2 d^T H d, lower <= d <= upper`` per row.

    ``hessian`` must already be damped (positive definite); rows are processed in
    batches sized from the memory budget. Entries with ``lower == upper`` are pinned.
    """
    options = options or SolverOptions()
    dtype = options.torch_dtype
    lower, upper = lower.to(dtype), upper.to(dtype)
    if (lower > upper).any():
        raise ValueError("lower bound above upper bound")
    problem = _scaled_problem(hessian, options, damping)
    rows, d = lower.shape
    out = _Collected(rows, d, dtype, hessian.device)
    for sl in _row_batches(rows, d, problem.operator.matrix.element_size(), options, hessian.device):
        out.put(sl, _solve_batch(problem, lower[sl], upper[sl], options))
    return out.result(problem, options, damping)


def _projected_newton(problem: _ScaledProblem, l: torch.Tensor, u: torch.Tensor, options: SolverOptions
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Projected Newton for one batch of rows in scaled coordinates, from the feasible point nearest 0.

    Each iteration fixes the entries at an active bound, solves the Newton system on the rest by
    PCG and backtracks along the projection arc. Returns (y, converged, CG iterations, relative
    KKT residual, the last CG solve's stopping measure, Newton iterations).
    """
    hs = problem.operator.matrix
    pinned = l == u
    box = ~pinned & (torch.isfinite(l) | torch.isfinite(u))
    y = torch.zeros_like(l).clamp(l, u)
    g = y @ hs                                 # the gradient at y, one matmul per new y
    g0 = _projected_gradient_norm(y, g, l, u).clamp_min(torch.finfo(y.dtype).tiny)
    cg_iters = torch.zeros(l.shape[0], dtype=torch.int64, device=l.device)
    converged, newton = torch.zeros_like(cg_iters, dtype=torch.bool), 0
    gap_bound = torch.zeros_like(g0)
    # a gap tolerance is on a squared scale: the projected gradient's is its square root
    kkt_tol = options.tol ** 0.5 if options.stop_rule == "gap" else options.tol
    for it in range(options.max_newton):
        fixed = pinned | ((y <= l) & (g > 0)) | ((y >= u) & (g < 0))
        rel = _projected_gradient_norm(y, g, l, u) / g0
        if it > 0 and (not box.any() or bool((rel <= kkt_tol).all())):
            break
        step, iters, converged, gap_bound = _newton_system(problem, -g, (~fixed).to(y.dtype), options, (y * g).sum(1))
        cg_iters += iters
        newton = it + 1
        if not box.any():                      # pins only: the Newton step is the optimum
            y = y + step
            g = y @ hs
            break
        y = _line_search(y, step, g, l, u, hs)
        g = y @ hs
    kkt = _projected_gradient_norm(y, g, l, u) / g0
    if box.any():                              # general bounds: converged means a KKT point too
        converged = converged & (kkt <= kkt_tol)
    return y, converged, cg_iters, kkt, gap_bound, newton


def _newton_system(problem: _ScaledProblem, rhs: torch.Tensor, free: torch.Tensor, options: SolverOptions,
                   start_objective: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Solve the free-set Newton system per row: PCG, with low-precision matmuls plus refinement when asked."""
    scale = start_objective if options.stop_rule == "gap" else (rhs * rhs * free).sum(1)
    if options.matmul == "full":
        return pcg(problem.operator.matrix, rhs, free, problem.operator.precond, options.cg, scale)
    return refined_pcg(problem.operator, rhs * free, free, options.cg, scale)


def _projected_gradient_norm(y: torch.Tensor, g: torch.Tensor, lower: torch.Tensor,
                             upper: torch.Tensor) -> torch.Tensor:
    """Per-row norm of ``y - clamp(y - g)``: zero exactly at a KKT point of the box QP."""
    return torch.linalg.vector_norm(y - (y - g).clamp(lower, upper), dim=1)


def _line_search(y: torch.Tensor, step: torch.Tensor, g: torch.Tensor, lower: torch.Tensor,
                 upper: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """Per-row Armijo backtracking along the projection arc ``clamp(y + a * step)``."""
    f0 = 0.5 * quadratic_form(y, hessian)
    alpha = torch.ones(y.shape[0], dtype=y.dtype, device=y.device)
    best = y
    pending = torch.ones_like(alpha, dtype=torch.bool)
    for _ in range(30):
        trial = (y + alpha[:, None] * step).clamp(lower, upper)
        accept = 0.5 * quadratic_form(trial, hessian) <= f0 + 1e-4 * (g * (trial - y)).sum(1)
        take = pending & accept
        best = torch.where(take[:, None], trial, best)
        pending &= ~accept
        if not pending.any():
            break
        alpha = torch.where(pending, alpha * 0.5, alpha)
    return best


def resolve_method(method: str, keep: torch.Tensor, bounded: bool) -> str:
    """The solver path for ``keep`` (rows x d): ``method`` itself unless "auto", then the cost rule.

    Bounded problems (a weight range) need projected Newton, hence PCG.
    """
    if method != "auto":
        return method
    if bounded or keep.numel() == 0:
        return "pcg"
    return choose_method(keep.shape[1], min(int((~keep).sum(1).max()), int(keep.sum(1).max())))


def choose_method(d: int, smaller_set: int) -> str:
    """Direct Cholesky only for small systems.

    Per row, a batched Cholesky of the smaller set (k inputs) costs k^3/3 flops at a fraction of
    matmul speed, PCG a few tens of iterations of two d^2 matmuls at full speed; direct is kept for
    k^3/3 <= 3 d^2 (the crossover measured in bench/README.md).
    """
    return "direct" if smaller_set ** 3 / 3 <= 3 * d * d else "pcg"


@torch.no_grad()
def solve_pinned(hessian: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor, damping: Damping,
                 options: SolverOptions | None = None, *,
                 weight_range: tuple[torch.Tensor, torch.Tensor] | None = None,
                 order: torch.Tensor | None = None) -> QPResult:
    """The OPTIMA row problem: best update of the kept weights once the pruned ones are zero.

    ``hessian`` is the damped Hessian; returns the update ``delta`` with ``w + delta``
    exactly zero on pruned entries. With ``weight_range`` = (low, high), per-row bounds of
    shape (rows,), every new kept weight also stays in [low, high]: a box-constrained QP
    that projected Newton solves with a few active-set changes. ``order``: the "ldl" input order
    (default ``keep_rate_order(keep)``; pass the whole layer's when solving a share of its rows, so
    that every share is solved as the whole would be). Beyond the weight, the mask
    and the returned update, memory is bounded by ``options.memory_budget`` (one row batch).
    """
    options = options or SolverOptions()
    rows, d = weight.shape
    h = hessian.to(options.torch_dtype)
    w = weight.to(device=h.device, dtype=options.torch_dtype)
    keep = keep.to(h.device)
    method = resolve_method(options.method, keep, weight_range is not None)
    if rows == 0:
        return QPResult(delta=w.clone(), converged=torch.ones(0, dtype=torch.bool, device=h.device),
                        cg_iterations=torch.zeros(0, dtype=torch.int64, device=h.device),
                        kkt_residual=w.new_zeros(0), gap_bound=w.new_zeros(0), method=method, damping=damping)
    if method == "direct":
        if weight_range is not None:
            raise ValueError("the direct solver has no bounds; use method 'pcg' or 'auto' with a weight range")
        budget = options.memory_budget or default_memory_budget(h.device)
        delta, damping = solve_pinned_direct(h, w, keep, damping, budget)
        delta = torch.where(keep, delta, -w)
        return QPResult(delta=delta, converged=torch.ones(rows, dtype=torch.bool, device=h.device),
                        cg_iterations=torch.zeros(rows, dtype=torch.int64, device=h.device),
                        kkt_residual=_kkt_residual(h, w, keep, delta),
                        gap_bound=torch.zeros(rows, dtype=h.dtype, device=h.device),
                        method="direct", damping=damping)
    order = keep_rate_order(keep) if order is None else _check_order(order, d, h.device)
    problem = _scaled_problem(h, options, damping, order)
    out = _Collected(rows, d, h.dtype, h.device)
    for sl in _row_batches(rows, d, h.element_size(), options, h.device):
        wb, kb = w[sl], keep[sl]
        lower, upper = torch.full_like(wb, -float("inf")), torch.full_like(wb, float("inf"))
        if weight_range is not None:
            low, high = (bound.to(wb)[sl, None] for bound in weight_range)
            lower, upper = (low - wb).clamp(max=0), (high - wb).clamp(min=0)  # never exclude w itself
        batch = _solve_batch(problem, torch.where(kb, lower, -wb), torch.where(kb, upper, -wb), options)
        batch.delta = torch.where(kb, batch.delta, -wb)   # pinned entries exactly -w
        out.put(sl, batch)
    return out.result(problem, options, damping)


def _kkt_residual(h: torch.Tensor, w: torch.Tensor, keep: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Per-row ||(H delta)_K|| / ||H_KP w_P|| in Jacobi-scaled units (each input's gradient times
    diag(H)^-1/2): the relative residual of the kept-set system, as projected Newton measures it."""
    scale = h.diagonal().clamp_min(torch.finfo(h.dtype).tiny).rsqrt() * keep
    rhs = torch.linalg.vector_norm(((w * ~keep) @ h) * scale, dim=1)
    gradient = torch.linalg.vector_norm((delta @ h) * scale, dim=1)
    return gradient / rhs.clamp_min(torch.finfo(h.dtype).tiny)
