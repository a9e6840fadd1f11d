"""The CG kernel of the OPTIMA solver: batched preconditioned conjugate gradients on each row's free set.

``pcg`` solves ``A_FF x_F = b_F`` for every row at once (the only heavy operation is the batched
matmul (rows x d) @ A); its step is torch.compiled when asked, and falls back to the eager step
if compiling fails. ``refined_pcg`` runs CG on low-precision copies of the matrices (bfloat16, or
TF32 on CUDA) and restores full accuracy by iterative refinement. The projected-Newton driver that
calls them is ``optima.solver``.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch

from optima.block_ldl import BlockLDL

Preconditioner = torch.Tensor | BlockLDL | None   # "hinv": the scaled inverse; "ldl"; "jacobi": None

REFINEMENT_TOL = 1e-2   # each refinement round's low-precision CG cuts its measure by this factor
MAX_REFINEMENTS = 20


@dataclass(frozen=True)
class CGOptions:
    """How CG runs and stops (``SolverOptions.cg``)."""

    gap: bool                    # stop on r^T z (the gap rule), else on r^T r (the residual rule)
    tol: float
    max_iter: int
    compile: bool | None = None  # torch.compile the step; None: on CUDA only
    check_every: int | None = None   # iterations between convergence checks; None: 1 on the CPU, 8 on CUDA
    matmul: str = "full"         # "full", "bfloat16" or "tf32": the precision of ``refined_pcg``'s inner CG


@dataclass
class Operator:
    """The matrix CG solves with and its preconditioner, with low-precision copies for ``refined_pcg``."""

    matrix: torch.Tensor
    precond: Preconditioner
    low_matrix: torch.Tensor | None = None
    low_precond: Preconditioner = None


class _State(NamedTuple):
    """The CG iterates of a batch of rows."""

    x: torch.Tensor
    r: torch.Tensor
    p: torch.Tensor
    rz: torch.Tensor


class _System(NamedTuple):
    """What one CG step solves with: the matrix, the preconditioner, the free sets and the stop rule."""

    matrix: torch.Tensor
    precond: Preconditioner
    free: torch.Tensor
    threshold: torch.Tensor
    gap: bool


def masked_matmul(v: torch.Tensor, matrix: torch.Tensor, free: torch.Tensor) -> torch.Tensor:
    """Apply the free-set block of ``matrix`` to rows of ``v`` that are zero off the free set.

    Every CG vector (x, r, p, z) stays zero on fixed entries, so no input masking is needed. A
    low-precision ``matrix`` (bfloat16) multiplies a rounded copy of ``v``; the result comes back in
    ``v``'s dtype.
    """
    return free * (v.to(matrix.dtype) @ matrix).to(v.dtype)


def precondition(r: torch.Tensor, precond: Preconditioner, free: torch.Tensor) -> torch.Tensor:
    """z = M^-1 r on each row's free set."""
    if precond is None:
        return r
    if isinstance(precond, BlockLDL):
        return precond.apply(r, free)
    return masked_matmul(r, precond, free)


def _stop_measure(r: torch.Tensor, rz: torch.Tensor, gap: bool) -> torch.Tensor:
    """What CG compares with each row's threshold: r^T z with the gap rule, else r^T r."""
    return rz if gap else (r * r).sum(1)


def _cg_step(state: _State, system: _System) -> tuple[_State, torch.Tensor]:
    """One PCG iteration for all rows; rows whose ``_stop_measure`` is below the threshold stand still.
    Returns the new iterates and which rows moved."""
    x, r, p, rz = state
    active = _stop_measure(r, rz, system.gap) > system.threshold
    ap = masked_matmul(p, system.matrix, system.free)
    pap = (p * ap).sum(1)
    alpha = torch.where(active, rz / pap.clamp_min(torch.finfo(pap.dtype).tiny), torch.zeros_like(rz))
    x = x + alpha[:, None] * p
    r = r - alpha[:, None] * ap
    z = precondition(r, system.precond, system.free)
    rz_new = (r * z).sum(1)
    beta = torch.where(active, rz_new / rz.clamp_min(torch.finfo(rz.dtype).tiny), torch.zeros_like(rz))
    p = z + beta[:, None] * p
    rz = torch.where(active, rz_new, rz)
    return _State(x, r, p, rz), active


@functools.cache
def _compiled_cg_step() -> Callable:
    """The CG iteration compiled once per process (torch.compile itself specializes per shape)."""
    return torch.compile(_cg_step, dynamic=False, fullgraph=True)


def _step_for(compile: bool | None, device: torch.device) -> Callable:
    """The compiled CG iteration when asked (on CUDA by default), else the eager one."""
    return _compiled_cg_step() if (compile if compile is not None else device.type == "cuda") else _cg_step


def stop_threshold(options: CGOptions, scale: torch.Tensor) -> torch.Tensor:
    """Each row's threshold on its stopping measure: ``tol`` (gap rule) or ``tol^2`` (residual rule) times
    ``scale``."""
    return (options.tol if options.gap else options.tol ** 2) * scale


def relative_measure(measure: torch.Tensor, scale: torch.Tensor, gap: bool) -> torch.Tensor:
    """The final stopping measure relative to its scale: the gap bound, or the relative residual."""
    relative = measure / scale.clamp_min(torch.finfo(measure.dtype).tiny)
    return relative if gap else relative.sqrt()


def pcg(matrix: torch.Tensor, rhs: torch.Tensor, free: torch.Tensor, precond: Preconditioner,
        options: CGOptions, scale: torch.Tensor | None = None
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Solve ``matrix_FF x_F = rhs_F`` per row by preconditioned CG, x = 0 off the free set.

    A row stops once its measure is ``options.tol`` (gap rule) or ``tol^2`` (residual rule) times
    ``scale``: with the gap rule r^T z against ``scale`` = the objective at the start (required);
    with the residual rule ||r||^2 against ``scale``, by default ||rhs||^2. With the eager step,
    rows that stopped leave the batch at each check, so the matmuls shrink as rows converge (the
    rows of a layer stop many iterations apart: bench/README.md).
    Returns (x, iterations per row, converged per row, the final measure relative to its scale:
    the gap bound, or the relative residual).
    """
    rows = rhs.shape[0]
    rhs = rhs * free
    gap = options.gap
    if scale is None:
        if gap:
            raise ValueError("the gap rule needs the start objective as scale")
        scale = (rhs * rhs).sum(1)
    threshold = stop_threshold(options, scale)
    r = rhs.clone()
    z = precondition(r, precond, free)     # CG never writes into r or z in place: no copy needed
    state = _State(torch.zeros_like(rhs), r, z.clone(), (r * z).sum(1))
    iterations = torch.zeros(rows, dtype=torch.int64, device=rhs.device)
    step = _step_for(options.compile, rhs.device)
    check_every = options.check_every or (8 if rhs.device.type == "cuda" else 1)
    solution, measure = torch.zeros_like(rhs), torch.zeros_like(scale)
    live, bar = torch.arange(rows, device=rhs.device), threshold   # the batch's rows and their thresholds
    done = 0
    while done < options.max_iter:
        now = _stop_measure(state.r, state.rz, gap)
        running = now > bar
        if not running.any():
            break
        if step is _cg_step and not running.all():   # eager: stopped rows leave the batch (compiled: fixed shape)
            stopped = live[~running]
            solution[stopped], measure[stopped] = state.x[~running], now[~running]
            state = _State(*(t[running] for t in state))
            live, free, bar = (t[running] for t in (live, free, bar))
        system = _System(matrix, precond, free, bar, gap)
        for _ in range(min(check_every, options.max_iter - done)):
            try:
                state, active = step(state, system)
            except Exception as err:  # a compiler problem must not stop a pruning run: finish this solve eagerly
                if step is _cg_step:
                    raise
                warnings.warn(f"torch.compile of the CG step failed ({type(err).__name__}: {err}); "
                              "running it eagerly", RuntimeWarning)
                step = _cg_step
                state, active = step(state, system)
            iterations[live] += active
            done += 1
    solution[live], measure[live] = state.x, _stop_measure(state.r, state.rz, gap)
    return solution, iterations, measure <= threshold, relative_measure(measure, scale, gap)


@contextmanager
def _matmul_precision(matmul: str) -> Iterator[None]:
    """Let float32 matmuls use TF32 (on CUDA) inside the block when ``matmul == "tf32"``."""
    before = torch.get_float32_matmul_precision()
    if matmul == "tf32":
        torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def refined_pcg(operator: Operator, rhs: torch.Tensor, free: torch.Tensor, options: CGOptions,
                scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Iterative refinement: low-precision PCG on the full-precision residual, each correction kept
    only where it lowers the full-precision stopping measure. Once a round fails to halve it (the
    low-precision system too far from the true one: ill-conditioned H), the rows left finish
    with full-precision PCG from where refinement got. Returns what ``pcg`` returns."""
    gap = options.gap
    threshold = stop_threshold(options, scale)

    def residual(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = rhs - masked_matmul(x, operator.matrix, free)
        z = precondition(r, operator.precond, free)
        return r, (r * z).sum(1) if gap else (r * r).sum(1)

    inner = replace(options, matmul="full", tol=REFINEMENT_TOL if gap else REFINEMENT_TOL ** 0.5)
    x = torch.zeros_like(rhs)
    r, measure = rhs, residual(x)[1]
    iterations = torch.zeros(rhs.shape[0], dtype=torch.int64, device=rhs.device)
    for _ in range(MAX_REFINEMENTS):
        todo = measure > threshold
        if not todo.any():
            break
        with _matmul_precision(options.matmul):
            correction, iters, _, _ = pcg(operator.low_matrix, r, free, operator.low_precond, inner,
                                          measure if gap else None)
        iterations += todo * iters
        trial = x + todo[:, None] * correction
        r_trial, m_trial = residual(trial)
        better = (m_trial < measure)[:, None]
        halved = bool((m_trial[todo] <= 0.5 * measure[todo]).all())
        x, r, measure = torch.where(better, trial, x), torch.where(better, r_trial, r), torch.where(
            better[:, 0], m_trial, measure)
        if not halved:
            break
    if (measure > threshold).any():
        correction, iters, _, _ = pcg(operator.matrix, r, free, operator.precond, options, scale)
        x, iterations = x + correction, iterations + iters
        measure = residual(x)[1]
    return x, iterations, measure <= threshold, relative_measure(measure, scale, gap)
