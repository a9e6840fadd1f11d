"""Prune one linear layer: choose a mask, then update the surviving weights.

``prune_weight`` is the layer-level contract the rest of the toolkit builds on:
Hessian in, mask and new weight out, with the numbers that say how well it went.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from optima.hessian import Damping, damp_hessian
from optima.masks import MASK_SELECTORS, Pattern, magnitude_mask, parse_pattern, wanda_mask
from optima.solver import SolverOptions, solve_pinned
from optima.sparsegpt import sparsegpt, sparsegpt_rowwise
from optima.thanos import thanos

OWN_UPDATES = ("sparsegpt", "thanos")  # a selector's own update, made while it chooses the mask
UPDATES = ("none", *OWN_UPDATES, "optima")
# Selectors that update the weights as they choose the mask: (weight, H, pattern, blocksize, damp)
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
    cg_iterations_mean: float = 0.0
    cg_iterations_max: int = 0
    unconverged_rows: int = 0
    kkt_residual_max: float = 0.0
    damping: float = 0.0       # absolute damping added to diag(H) for the update
    dead_inputs: int = 0
    escalated_rows: int = 0
    fell_back_to_none: bool = False
    seconds: float = 0.0
    seconds_mask: float = 0.0
    seconds_update: float = 0.0
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
    diff = new_weight.double() - weight.double()
    return float((diff * (diff @ hessian.double())).sum())


def validate_options(sparsity: float | None, pattern: str, mask: str, update: str) -> Pattern:
    """Check the pruning options together; return the parsed pattern or raise ValueError."""
    if mask not in MASK_SELECTORS:
        raise ValueError(f"unknown mask selector {mask!r}; choose from {MASK_SELECTORS}")
    if update not in UPDATES:
        raise ValueError(f"unknown update {update!r}; choose from {UPDATES}")
    if update in OWN_UPDATES and not mask.startswith(update):
        raise ValueError(f"update={update!r} is {update}'s own update, made while it chooses the mask: "
                         f"it needs mask={update!r}")
    return parse_pattern(pattern, sparsity)


@torch.no_grad()
def prune_weight(weight: torch.Tensor, hessian: torch.Tensor, *, sparsity: float | None = 0.5,
                 pattern: str = "unstructured", mask: str = "wanda", update: str = "optima",
                 damp: float = 0.01, solver_options: SolverOptions | None = None,
                 keep: torch.Tensor | None = None, blocksize: int = 128) -> PruneResult:
    """Prune ``weight`` (rows, d_in) given its layer Hessian ``hessian`` (d_in, d_in).

    ``mask`` picks the weights to zero, ``update`` moves the survivors:
    ``"none"`` leaves them, ``"sparsegpt"`` applies SparseGPT's greedy update,
    ``"optima"`` the exact per-row least-squares optimum. A precomputed ``keep`` mask
    skips selection. The update is never allowed to make the layer worse than no
    update on the same mask; if it would, the result says so and keeps the better.
    """
    pat = validate_options(sparsity, pattern, mask, update)
    rows, d_in = weight.shape
    if hessian.shape != (d_in, d_in):
        raise ValueError(f"Hessian shape {tuple(hessian.shape)} does not match weight width {d_in}")
    if not torch.isfinite(hessian).all():
        raise FloatingPointError("Hessian contains NaN or Inf")
    if not torch.isfinite(weight).all():
        raise FloatingPointError("weight contains NaN or Inf")
    pat.check(d_in)
    options = solver_options or SolverOptions()
    device = hessian.device
    w = weight.to(device=device, dtype=torch.float64 if options.dtype == torch.float64 else torch.float32)
    h = hessian.to(w.dtype)
    start = time.perf_counter()

    greedy, greedy_damping = None, None
    if keep is not None:
        if update in OWN_UPDATES:
            raise ValueError(f"update={update!r} chooses its own mask as it goes; it cannot take a given keep mask")
        keep = keep.to(device=device, dtype=torch.bool)
    elif mask in GREEDY_SELECTORS:
        greedy, keep, greedy_damping = GREEDY_SELECTORS[mask](w, h, pat, blocksize=blocksize, damp=damp)
    else:
        keep = magnitude_mask(w, pat) if mask == "magnitude" else wanda_mask(w, h, pat)
    seconds_mask = time.perf_counter() - start

    masked = w * keep
    damped, damping = damp_hessian(h, damp)
    stats = PruneStats(objective_none=reconstruction_objective(masked, w, h), objective=0.0,
                       dense_energy=reconstruction_objective(torch.zeros_like(w), w, h), sparsity=0.0,
                       damping=damping.value, dead_inputs=damping.dead_inputs, seconds_mask=seconds_mask)
    t_update = time.perf_counter()
    if update == "none":
        new = masked
    elif update in OWN_UPDATES:
        new = greedy
        if greedy_damping.value > damping.value:
            stats.notes.append(f"damping raised to {greedy_damping.value:.3g} to factor H for {mask}")
            stats.damping = greedy_damping.value
    else:
        new = _optima_update(w, damped, keep, damping, options, stats)
    new = new * keep  # pruned entries are exact zeros whatever the arithmetic did
    stats.seconds_update = time.perf_counter() - t_update
    stats.objective = reconstruction_objective(new, w, h)
    if update != "none" and not stats.objective <= stats.objective_none:
        stats.notes.append(f"update raised the error ({stats.objective:.4g} > {stats.objective_none:.4g}); "
                           "kept the masked weights without update")
        stats.fell_back_to_none = True
        new, stats.objective = masked, stats.objective_none
    if damping.dead_inputs:
        stats.notes.append(f"{damping.dead_inputs} dead inputs (zero Hessian diagonal) left unchanged")
    stats.sparsity = float((new == 0).sum()) / new.numel()
    stats.seconds = time.perf_counter() - start
    return PruneResult(weight=new.to(dtype=weight.dtype, device=weight.device), keep=keep.to(weight.device),
                       stats=stats)


def _optima_update(w: torch.Tensor, damped: torch.Tensor, keep: torch.Tensor, damping: Damping,
                   options: SolverOptions, stats: PruneStats) -> torch.Tensor:
    """Solve the pinned QP for every row and record how the solver did."""
    result = solve_pinned(damped, w, keep, damping, options)
    stats.solver_method = result.method
    stats.cg_iterations_mean = float(result.cg_iterations.float().mean())
    stats.cg_iterations_max = int(result.cg_iterations.max())
    stats.unconverged_rows = int((~result.converged).sum())
    stats.kkt_residual_max = float(result.kkt_residual.max())
    stats.escalated_rows = result.escalated_rows
    if result.damping is not None and result.damping.value > damping.value:
        stats.notes.append(f"damping raised to {result.damping.value:.3g} to factor H")
        stats.damping = result.damping.value
    if stats.escalated_rows:
        stats.notes.append(f"{stats.escalated_rows} rows needed extra damping to factor their kept set")
    if stats.unconverged_rows:
        stats.notes.append(f"{stats.unconverged_rows} rows did not reach the CG tolerance "
                           f"(worst KKT residual {stats.kkt_residual_max:.2e})")
    return (w + result.delta.to(w.dtype))
