"""Prune one linear layer: choose a mask, then update the surviving weights.

``prune_weight`` is the layer-level contract the rest of the toolkit builds on:
Hessian in, mask and new weight out, with the numbers that say how well it went.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from optima.admm import admm
from optima.config import OWN_UPDATES, PruneConfig
from optima.hessian import damp_hessian
from optima.linalg import Damping, reconstruction_error
from optima.masks import Pattern, score_mask
from optima.problem import LayerProblem
from optima.refine import refine_mask
from optima.share import RowShare
from optima.solver import SolverOptions
from optima.sparsegpt import sparsegpt, sparsegpt_rowwise
from optima.target import DenseTarget
from optima.thanos import thanos

# Selectors that update the weights as they choose the mask: (weight, H, pattern, config) -> (updated
# weight, keep, damping), each reading its own options. Their own update is named after the method.
GREEDY_SELECTORS: dict[str, Callable[[torch.Tensor, torch.Tensor, Pattern, PruneConfig],
                                     tuple[torch.Tensor, torch.Tensor, Damping]]] = {
    "sparsegpt": lambda w, h, pattern, c: sparsegpt(w, h, pattern, mask_block=c.mask_block, damp=c.damp),
    "sparsegpt-rowwise": lambda w, h, pattern, c: sparsegpt_rowwise(w, h, pattern, mask_block=c.mask_block,
                                                                     damp=c.damp),
    "thanos": lambda w, h, pattern, c: thanos(w, h, pattern, mask_block=c.mask_block, damp=c.damp),
    "admm": lambda w, h, pattern, c: admm(w, h, pattern, damp=c.admm_damp),
}
OWN_DAMPING = ("admm",)  # selectors that damp by their own rule, not config.damp escalated


@dataclass
class PruneStats:
    """Numbers describing one layer's pruning (objectives use the undamped Hessian).

    The objective is the one the update optimised (``target``): "self", sum_rows (w' - w)^T H~ (w' - w);
    "dense", sum_rows ||X~ w' - X w||^2 (``optima.target``)."""

    objective_none: float      # the objective of the masked weight: mask, no update
    objective: float           # the same for the returned weight
    dense_energy: float        # sum_rows of the dense outputs' energy (w^T H w), what errors are relative to
    sparsity: float            # fraction of exact zeros in the returned weight
    target: str = "self"       # the objective optimised: "self" or "dense"
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
        greedy, keep, damping = GREEDY_SELECTORS[config.mask](w, h, pattern, config)
        return keep, greedy, damping
    return score_mask(config.mask, w, h, pattern), None, None


@torch.no_grad()
def prune_weight(weight: torch.Tensor, hessian: torch.Tensor, config: PruneConfig | None = None, *,
                 pattern: Pattern | None = None, keep: torch.Tensor | None = None,
                 share: RowShare | None = None, target: DenseTarget | None = None) -> PruneResult:
    """Prune ``weight`` (rows, d_in) given its layer Hessian ``hessian`` (d_in, d_in).

    ``config.mask`` picks the weights to zero (under ``pattern``, default the config's
    own), ``config.update`` moves the survivors: ``"none"`` leaves them, ``"sparsegpt"`` /
    ``"thanos"`` / ``"admm"`` are the selector's own update, ``"optima"`` the exact per-row optimum.
    A given ``keep`` mask skips selection. The update is never allowed to make the layer
    worse than no update on the same mask; if it would, the result says so and keeps the better.
    With ``share`` (several processes, same weight and Hessian) each process solves its share of
    the OPTIMA rows and all end with the same result; the mask is chosen whole by every process.
    With ``config.target="dense"``, ``hessian`` is H~ of the pruned model's inputs and ``target`` holds
    C and the dense model's H: the mask and the update work on the anchor ``w*`` (the layer's unpruned
    optimum for that objective, ``optima.target``), and every objective reported is the dense one.
    """
    config = config or PruneConfig()
    pattern = pattern or config.pattern_for()
    _check_inputs(weight, hessian, pattern)
    if (target is not None) != (config.target == "dense"):
        raise ValueError(f"target={config.target!r} " + ("needs the layer's DenseTarget (C and the dense H)"
                                                         if target is None else "takes no DenseTarget"))
    device = hessian.device
    w = weight.to(device=device, dtype=config.solver.torch_dtype)
    h = hessian.to(w.dtype)
    start = time.perf_counter()
    damped = damp_hessian(h, config.damp)
    anchor, goals = w, None
    if target is not None:
        anchor, *damped = target.anchor(w.double(), h.double(), damped[0].double(), damped[1])
        anchor, damped = anchor.to(w.dtype), (damped[0].to(w.dtype), damped[1])
        goals = target.goals(w)
    greedy, greedy_damping = None, None
    if keep is not None:
        if config.update in OWN_UPDATES:
            raise ValueError(f"update={config.update!r} chooses its own mask as it goes; it cannot take a given "
                             "keep mask")
        keep = keep.to(device=device, dtype=torch.bool)
    else:
        keep, greedy, greedy_damping = select_mask(anchor, h, pattern, config)
    seconds_mask = time.perf_counter() - start

    masked = w * keep
    problem = LayerProblem.build(anchor, h, keep, pattern, damped=damped, keep_row_range=config.keep_row_range,
                                 share=share, goals=goals)
    objective_none, dense_energy = problem.objectives([masked, torch.zeros_like(w)])
    t_update = time.perf_counter()
    if config.update == "none":
        new, update = masked, _damping_fields(problem.damping, problem.damping)
    elif config.update in OWN_UPDATES:
        requested = greedy_damping if config.mask in OWN_DAMPING else problem.damping
        new, update = greedy, _damping_fields(greedy_damping, requested, f" for {config.mask}")
    else:
        new, update = _optima_update(problem, config.solver)
    new = new * keep  # pruned entries are exact zeros whatever the arithmetic did
    seconds_update = time.perf_counter() - t_update
    new, objective, fallback = _keep_the_better(new, masked, problem.objectives([new])[0], objective_none,
                                                config.update)
    refined: dict = {}
    if config.mask_rounds and not fallback:
        t_refine = time.perf_counter()
        keep, new, refined = _refine(problem, new, config, dense_energy)
        objective = problem.objectives([new])[0]
        seconds_update += time.perf_counter() - t_refine
    notes = [*update.pop("notes"), *fallback, *refined.pop("notes", [])]
    if problem.damping.dead_inputs:
        notes.append(f"{problem.damping.dead_inputs} dead inputs (zero Hessian diagonal) left unchanged")
    stats = PruneStats(objective_none=objective_none, objective=objective, dense_energy=dense_energy,
                       sparsity=float((new == 0).sum()) / new.numel(), target=config.target, dead_inputs=problem.damping.dead_inputs,
                       fell_back_to_none=bool(fallback), seconds=time.perf_counter() - start,
                       seconds_mask=seconds_mask, seconds_update=seconds_update, notes=notes, **update, **refined)
    return PruneResult(weight=new.to(dtype=weight.dtype, device=weight.device), keep=keep.to(weight.device),
                       stats=stats)


def _keep_the_better(new: torch.Tensor, masked: torch.Tensor, objective: float, objective_none: float,
                     update: str) -> tuple[torch.Tensor, float, list[str]]:
    """The updated weight and its objective, unless it reconstructs worse than no update: then the masked
    weight, its objective and the note saying so (no note: no fallback)."""
    if update != "none" and not objective <= objective_none:
        return masked, objective_none, [f"update raised the error ({objective:.4g} > {objective_none:.4g}); "
                                        "kept the masked weights without update"]
    return new, objective, []


def _damping_fields(used: Damping, requested: Damping, what: str = "") -> dict:
    """The statistics of the damping an update finally used, against what was asked for (with notes)."""
    fields = {"damping": max(used.value, requested.value), "escalated_rows": used.escalated_rows, "notes": []}
    if used.value > requested.value:
        fields["notes"].append(f"damping raised to {used.value:.3g} to factor H{what}")
    if used.escalated_rows:
        fields["notes"].append(f"{used.escalated_rows} rows needed extra damping to factor their own system")
    return fields


def _refine(problem: LayerProblem, new: torch.Tensor, config: PruneConfig,
            dense_energy: float) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """``config.mask_rounds`` rounds of mask refinement on this process's rows, then all rows joined;
    returns (keep, weight, the refinement's statistics)."""
    own = problem.own()
    rows = slice(None) if problem.share is None else problem.share.span(new.shape[0])
    result = refine_mask(own, new[rows], config.solver, config.mask_rounds)
    pad = config.mask_rounds + 1 - len(result.objectives)   # stopped early: the rest stands still
    objectives = torch.tensor(result.objectives + result.objectives[-1:] * pad, dtype=torch.float64)
    accepted = torch.tensor(result.accepted_rows + [0] * pad, dtype=torch.float64)
    new, keep = problem.gather([result.weight.to(new.dtype), result.keep])
    if problem.share is not None:
        totals = problem.total(torch.cat([objectives, accepted]).to(new.device)).cpu()
        objectives, accepted = totals[:config.mask_rounds + 1], totals[config.mask_rounds + 1:]
    notes = []
    if dense_energy > 0:
        before, after = (float(o) / dense_energy for o in (objectives[0], objectives[-1]))
        notes.append(f"mask refined (at most {config.mask_rounds} rounds): rel. err {before:.4g} -> {after:.4g}, "
                     f"{int(accepted.sum())} row updates kept")
    return keep, new, {"mask_round_objectives": objectives.tolist(),
                       "mask_round_accepted": [int(a) for a in accepted], "notes": notes}


def _optima_update(problem: LayerProblem, options: SolverOptions) -> tuple[torch.Tensor, dict]:
    """Solve the pinned QP for every row (each process its share of them); return the new weight and
    the statistics of how the solver did."""
    result = problem.solve(options)
    fields = {"solver_method": result.method, "cg_iterations_mean": float(result.cg_iterations.float().mean()),
              "cg_iterations_max": int(result.cg_iterations.max()),
              "unconverged_rows": int((~result.converged).sum()),
              "kkt_residual_max": float(result.kkt_residual.max()),
              "gap_bound_max": None if result.gap_bound is None else float(result.gap_bound.max())}
    notes = []
    if result.method == "pcg":
        fields["solver_preconditioner"] = options.preconditioner_on(problem.damped.device)
        if result.gap_bound is None and options.stop_rule == "gap":
            notes.append("the preconditioner needed extra damping to factor: CG stopped on r^T z, "
                         "which then bounds the objective gap only approximately")
    damping = _damping_fields(result.damping or problem.damping, problem.damping)
    fields.update(damping, notes=[*notes, *damping["notes"]])
    if fields["unconverged_rows"]:
        worst = f"gap bound {fields['gap_bound_max']:.2e}" if fields["gap_bound_max"] is not None else \
            f"KKT residual {fields['kkt_residual_max']:.2e}"
        fields["notes"].append(f"{fields['unconverged_rows']} rows did not reach the CG tolerance (worst {worst})")
    return problem.weight + result.delta.to(problem.weight.dtype), fields
