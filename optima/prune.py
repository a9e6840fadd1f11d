"""Prune one linear layer: choose a mask, then update the surviving weights.

``prune_weight`` is the layer-level contract the rest of the toolkit builds on:
Hessian in, mask and new weight out, with the numbers that say how well it went.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import torch

from optima.block_ldl import keep_rate_order
from optima.config import OWN_UPDATES, PruneConfig
from optima.hessian import damp_hessian
from optima.linalg import Damping, reconstruction_error
from optima.masks import Pattern, score_mask
from optima.refine import refine_mask
from optima.share import RowShare
from optima.solver import QPResult, resolve_method, solve_pinned
from optima.sparsegpt import sparsegpt, sparsegpt_rowwise
from optima.thanos import thanos

# Selectors that update the weights as they choose the mask: (weight, H, pattern, mask_block, damp)
# -> (updated weight, keep, damping). Their own update is named after the method ("sparsegpt", "thanos").
GREEDY_SELECTORS = {"sparsegpt": sparsegpt, "sparsegpt-rowwise": sparsegpt_rowwise, "thanos": thanos}


@dataclass
class PruneStats:
    """Numbers describing one layer's pruning (objectives use the undamped Hessian)."""

    objective_none: float      # sum_rows (w_masked - w)^T H (w_masked - w): mask, no update
    objective: float           # the same for the returned weight
    dense_energy: float        # sum_rows w^T H w, the output energy the errors are relative to
    sparsity: float            # fraction of exact zeros in the returned weight
    solver_method: str = ""
    solver_preconditioner: str = ""   # the CG preconditioner used ("pcg" only; its default depends on the device)
    cg_iterations_mean: float = 0.0
    cg_iterations_max: int = 0
    unconverged_rows: int = 0
    kkt_residual_max: float = 0.0
    gap_bound_max: float | None = None  # bound on (objective - optimum) / objective_none over rows (solver stop="gap")
    damping: float = 0.0       # absolute damping added to diag(H) for the update
    dead_inputs: int = 0
    escalated_rows: int = 0
    fell_back_to_none: bool = False
    seconds: float = 0.0
    seconds_mask: float = 0.0
    seconds_update: float = 0.0
    mask_round_objectives: list[float] = field(default_factory=list)  # mask refinement: [before, after each round]
    mask_round_accepted: list[int] = field(default_factory=list)       # rows whose swaps were kept, per round
    notes: list[str] = field(default_factory=list)

    @property
    def relative_error(self) -> float:
        return self.objective / self.dense_energy if self.dense_energy > 0 else 0.0

    @property
    def relative_error_none(self) -> float:
        return self.objective_none / self.dense_energy if self.dense_energy > 0 else 0.0

    def as_dict(self) -> dict:
        out = asdict(self)
        out.update(relative_error=self.relative_error, relative_error_none=self.relative_error_none)
        return out


@dataclass
class PruneResult:
    weight: torch.Tensor       # new weight, input dtype/device, pruned entries exactly 0
    keep: torch.Tensor         # bool, True = kept
    stats: PruneStats


def reconstruction_objective(new_weight: torch.Tensor, weight: torch.Tensor, hessian: torch.Tensor) -> float:
    """sum over rows of (w' - w)^T H (w' - w), computed in float64."""
    return float(reconstruction_error(new_weight, weight, hessian, per_row=False))


def _shared_objectives(candidates: list[torch.Tensor], weight: torch.Tensor, hessian: torch.Tensor,
                       share: RowShare | None) -> list[float]:
    """``reconstruction_objective`` of each candidate weight; with ``share``, each process sums its
    share of the rows and one all-gather adds the sums of every candidate."""
    if share is None:
        return [reconstruction_objective(new, weight, hessian) for new in candidates]
    rows = share.span(weight.shape[0])
    parts = [reconstruction_objective(new[rows], weight[rows], hessian) for new in candidates]
    return share.all_gather(torch.tensor(parts, dtype=torch.float64, device=weight.device)).sum(0).tolist()


def _check_inputs(weight: torch.Tensor, hessian: torch.Tensor, pattern: Pattern) -> None:
    d_in = weight.shape[1]
    if hessian.shape != (d_in, d_in):
        raise ValueError(f"Hessian shape {tuple(hessian.shape)} does not match weight width {d_in}")
    if not torch.isfinite(hessian).all():
        raise FloatingPointError("Hessian contains NaN or Inf")
    if not torch.isfinite(weight).all():
        raise FloatingPointError("weight contains NaN or Inf")
    pattern.check(d_in)


def select_mask(w: torch.Tensor, h: torch.Tensor, pattern: Pattern,
                config: PruneConfig) -> tuple[torch.Tensor, torch.Tensor | None, Damping | None]:
    """The keep-mask of ``config.mask``; greedy selectors also return their updated weight and damping."""
    if config.mask in GREEDY_SELECTORS:
        greedy, keep, damping = GREEDY_SELECTORS[config.mask](w, h, pattern, mask_block=config.mask_block,
                                                              damp=config.damp)
        return keep, greedy, damping
    return score_mask(config.mask, w, h, pattern), None, None


@torch.no_grad()
def prune_weight(weight: torch.Tensor, hessian: torch.Tensor, config: PruneConfig | None = None, *,
                 pattern: Pattern | None = None, keep: torch.Tensor | None = None,
                 share: RowShare | None = None) -> PruneResult:
    """Prune ``weight`` (rows, d_in) given its layer Hessian ``hessian`` (d_in, d_in).

    ``config.mask`` picks the weights to zero (under ``pattern``, default the config's
    own), ``config.update`` moves the survivors: ``"none"`` leaves them, ``"sparsegpt"`` /
    ``"thanos"`` are the selector's greedy update, ``"optima"`` the exact per-row optimum.
    A given ``keep`` mask skips selection. The update is never allowed to make the layer
    worse than no update on the same mask; if it would, the result says so and keeps the better.
    With ``share`` (several processes, same weight and Hessian) each process solves its share of
    the OPTIMA rows and all end with the same result; the mask is chosen whole by every process.
    """
    config = config or PruneConfig()
    pattern = pattern or config.pattern_for()
    _check_inputs(weight, hessian, pattern)
    device = hessian.device
    w = weight.to(device=device, dtype=config.solver.torch_dtype)
    h = hessian.to(w.dtype)
    start = time.perf_counter()
    greedy, greedy_damping = None, None
    if keep is not None:
        if config.update in OWN_UPDATES:
            raise ValueError(f"update={config.update!r} chooses its own mask as it goes; it cannot take a given "
                             "keep mask")
        keep = keep.to(device=device, dtype=torch.bool)
    else:
        keep, greedy, greedy_damping = select_mask(w, h, pattern, config)
    seconds_mask = time.perf_counter() - start

    masked = w * keep
    damped, damping = damp_hessian(h, config.damp)
    objectives = functools.partial(_shared_objectives, weight=w, hessian=h, share=share)
    objective_none, dense_energy = objectives([masked, torch.zeros_like(w)])
    stats = PruneStats(objective_none=objective_none, objective=0.0, dense_energy=dense_energy, sparsity=0.0,
                       damping=damping.value, dead_inputs=damping.dead_inputs, seconds_mask=seconds_mask)
    t_update = time.perf_counter()
    if config.update == "none":
        new = masked
    elif config.update in OWN_UPDATES:
        new = greedy
        if greedy_damping.value > damping.value:
            stats.notes.append(f"damping raised to {greedy_damping.value:.3g} to factor H for {config.mask}")
            stats.damping = greedy_damping.value
        if greedy_damping.escalated_rows:
            stats.escalated_rows = greedy_damping.escalated_rows
            stats.notes.append(f"{stats.escalated_rows} rows needed extra damping to factor their own system")
    else:
        new = _optima_update(w, damped, keep, damping, config, stats, share)
    new = new * keep  # pruned entries are exact zeros whatever the arithmetic did
    stats.seconds_update = time.perf_counter() - t_update
    new = _keep_the_better(new, masked, lambda v: objectives([v])[0], config, stats)
    if config.mask_rounds and not stats.fell_back_to_none:
        t_refine = time.perf_counter()
        keep, new = _refine(w, h, damped, keep, new, pattern, damping, config, stats, share)
        stats.objective = objectives([new])[0]
        stats.seconds_update += time.perf_counter() - t_refine
    if damping.dead_inputs:
        stats.notes.append(f"{damping.dead_inputs} dead inputs (zero Hessian diagonal) left unchanged")
    stats.sparsity = float((new == 0).sum()) / new.numel()
    stats.seconds = time.perf_counter() - start
    return PruneResult(weight=new.to(dtype=weight.dtype, device=weight.device), keep=keep.to(weight.device),
                       stats=stats)


def _keep_the_better(new: torch.Tensor, masked: torch.Tensor, objective: Callable[[torch.Tensor], float],
                     config: PruneConfig, stats: PruneStats) -> torch.Tensor:
    """The updated weight, unless it reconstructs worse than no update (then the masked one, with a note)."""
    stats.objective = objective(new)
    if config.update != "none" and not stats.objective <= stats.objective_none:
        stats.notes.append(f"update raised the error ({stats.objective:.4g} > {stats.objective_none:.4g}); "
                           "kept the masked weights without update")
        stats.fell_back_to_none = True
        new, stats.objective = masked, stats.objective_none
    return new


def _own_rows(w: torch.Tensor, config: PruneConfig,
              share: RowShare | None) -> tuple[slice, tuple[torch.Tensor, torch.Tensor] | None]:
    """The rows of ``w`` this process solves (all of them without ``share``) and, with ``keep_row_range``,
    each one's original [min, max]."""
    rows = slice(None) if share is None else share.span(w.shape[0])
    return rows, ((w[rows].amin(1), w[rows].amax(1)) if config.keep_row_range else None)


def _refine(w: torch.Tensor, h: torch.Tensor, damped: torch.Tensor, keep: torch.Tensor, new: torch.Tensor,
            pattern: Pattern, damping: Damping, config: PruneConfig, stats: PruneStats,
            share: RowShare | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``config.mask_rounds`` rounds of mask refinement on this process's rows, then all rows joined."""
    rows, weight_range = _own_rows(w, config, share)
    result = refine_mask(w[rows], h, damped, keep[rows], new[rows], pattern, damping, config.solver,
                         config.mask_rounds, weight_range=weight_range, order=keep_rate_order(keep))
    pad = config.mask_rounds + 1 - len(result.objectives)   # stopped early: the rest stands still
    objectives = torch.tensor(result.objectives + result.objectives[-1:] * pad, dtype=torch.float64)
    accepted = torch.tensor(result.accepted_rows + [0] * pad, dtype=torch.float64)
    keep, new = result.keep, result.weight.to(w.dtype)
    if share is not None:
        new, keep = share.gather_columns([new, keep], w.shape[0])
        totals = share.all_gather(torch.cat([objectives, accepted]).to(w.device)).sum(0).cpu()
        objectives, accepted = totals[:config.mask_rounds + 1], totals[config.mask_rounds + 1:]
    stats.mask_round_objectives = objectives.tolist()
    stats.mask_round_accepted = [int(a) for a in accepted]
    if stats.dense_energy > 0:
        before, after = (float(o) / stats.dense_energy for o in (objectives[0], objectives[-1]))
        stats.notes.append(f"mask refined (at most {config.mask_rounds} rounds): rel. err {before:.4g} -> {after:.4g}, "
                           f"{int(accepted.sum())} row updates kept")
    return keep, new


def _optima_update(w: torch.Tensor, damped: torch.Tensor, keep: torch.Tensor, damping: Damping,
                   config: PruneConfig, stats: PruneStats, share: RowShare | None) -> torch.Tensor:
    """Solve the pinned QP for every row (this process's share of them) and record how the solver did."""
    rows, weight_range = _own_rows(w, config, share)
    options = config.solver
    if share is not None:  # every process must take the same path: choose it from the whole mask
        options = replace(options, method=resolve_method(options.method, keep, config.keep_row_range))
    result = solve_pinned(damped, w[rows], keep[rows], damping, options, weight_range, keep_rate_order(keep))
    if share is not None:
        result = _gathered(result, share, w.shape[0])
    stats.solver_method = result.method
    if result.method == "pcg":
        stats.solver_preconditioner = options.preconditioner_on(damped.device)
    stats.cg_iterations_mean = float(result.cg_iterations.float().mean())
    stats.cg_iterations_max = int(result.cg_iterations.max())
    stats.unconverged_rows = int((~result.converged).sum())
    stats.kkt_residual_max = float(result.kkt_residual.max())
    if result.gap_bound is not None:
        stats.gap_bound_max = float(result.gap_bound.max())
    elif result.method == "pcg" and config.solver.stop_rule == "gap":
        stats.notes.append("the preconditioner needed extra damping to factor: CG stopped on r^T z, "
                           "which then bounds the objective gap only approximately")
    if result.damping is not None:
        stats.escalated_rows = result.damping.escalated_rows
    if result.damping is not None and result.damping.value > damping.value:
        stats.notes.append(f"damping raised to {result.damping.value:.3g} to factor H")
        stats.damping = result.damping.value
    if stats.escalated_rows:
        stats.notes.append(f"{stats.escalated_rows} rows needed extra damping to factor their own system")
    if stats.unconverged_rows:
        worst = f"gap bound {stats.gap_bound_max:.2e}" if stats.gap_bound_max is not None else \
            f"KKT residual {stats.kkt_residual_max:.2e}"
        stats.notes.append(f"{stats.unconverged_rows} rows did not reach the CG tolerance (worst {worst})")
    return (w + result.delta.to(w.dtype))


def _gathered(part: QPResult, share: RowShare, rows: int) -> QPResult:
    """Join every process's rows of a solve, so that all processes hold the same whole-layer result."""
    # escalations are counted over all processes; damping and method are the same everywhere
    escalated = part.damping.escalated_rows if part.damping is not None else 0
    counts = share.all_gather(torch.tensor([escalated, part.newton_iterations], device=part.delta.device))
    per_row = [part.delta, part.converged, part.cg_iterations, part.kkt_residual]
    delta, converged, cg_iterations, kkt, *gap = share.gather_columns(
        per_row if part.gap_bound is None else [*per_row, part.gap_bound], rows)
    return QPResult(delta=delta, converged=converged, cg_iterations=cg_iterations, kkt_residual=kkt,
                    gap_bound=gap[0] if gap else None, newton_iterations=int(counts[:, 1].max()),
                    method=part.method,
                    damping=None if part.damping is None else replace(part.damping, escalated_rows=int(counts[:, 0].sum())))
