"""What a pruning run measured: per-layer records, totals, a rich table and a JSON file."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from optima.atomic import write_atomic
from optima.prune import PruneStats

# what each target's errors measure (``PruneConfig.target``); X~ are a layer's inputs in the pruned model
OBJECTIVES = {"self": "||X~ (W' - W)^T||^2, the layer's own outputs on its pruned-model inputs",
              "dense": "||X~ W'^T - X W^T||^2, the dense model's outputs (X: its inputs in the dense model)"}


@dataclass
class LayerRecord:
    """One pruned layer."""

    name: str
    block: int
    shape: tuple[int, int]
    target_sparsity: float
    tokens: int
    stats: PruneStats

    def as_dict(self) -> dict[str, Any]:
        return {"layer": self.name, "block": self.block, "shape": list(self.shape),
                "target_sparsity": self.target_sparsity, "tokens": self.tokens, **self.stats.as_dict()}


@dataclass
class PruneReport:
    """Everything a pruning run measured, and the masks it chose."""

    layers: list[LayerRecord] = field(default_factory=list)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)   # where the time went, by phase

    def add_time(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds


def summary(report: PruneReport) -> dict[str, Any]:
    """Totals over all layers: mean relative errors (of the objective the update optimised), overall
    sparsity, time by phase."""
    layers = report.layers
    params = sum(r.shape[0] * r.shape[1] for r in layers)
    zeros = sum(r.stats.sparsity * r.shape[0] * r.shape[1] for r in layers)
    n = max(1, len(layers))
    return {
        "layers": len(layers),
        "sparsity": zeros / params if params else 0.0,
        "mean_relative_error": sum(r.stats.relative_error for r in layers) / n,
        "mean_relative_error_no_update": sum(r.stats.relative_error_none for r in layers) / n,
        "objective": "; ".join(f"{t}: {OBJECTIVES[t]}" for t in sorted({r.stats.target for r in layers})),
        "unconverged_rows": sum(r.stats.unconverged_rows for r in layers),
        "fallbacks_to_no_update": sum(r.stats.fell_back_to_none for r in layers),
        "seconds": dict(report.seconds),
    }


def _solver(stats: PruneStats) -> str:
    """'pcg (ldl)', 'direct', or '-' when no solve ran."""
    if not stats.solver_method:
        return "-"
    return f"{stats.solver_method} ({stats.solver_preconditioner})" if stats.solver_preconditioner else stats.solver_method


def table(report: PruneReport, title: str = "OPTIMA pruning report") -> Table:
    """One row per layer: shape, sparsity, error before/after the update, solver effort, time."""
    t = Table(title=title)
    for col in ("layer", "shape", "sparsity", "rel. err (mask only)", "rel. err", "solver", "CG it.",
                "gap <=", "time s", "notes"):
        t.add_column(col, justify="left" if col in ("layer", "notes", "solver") else "right")
    for r in report.layers:
        s = r.stats
        t.add_row(r.name, f"{r.shape[0]}x{r.shape[1]}", f"{s.sparsity:.3f}", f"{s.relative_error_none:.4g}",
                  f"{s.relative_error:.4g}", _solver(s), f"{s.cg_iterations_mean:.0f}",
                  "-" if s.gap_bound_max is None else f"{s.gap_bound_max:.1e}", f"{s.seconds:.2f}", "; ".join(s.notes))
    return t


def print_report(report: PruneReport, console: Console | None = None) -> None:
    """Print the per-layer table and the totals."""
    console = console or Console()
    console.print(table(report))
    total = summary(report)
    console.print(f"[bold]{total['layers']} layers[/bold], sparsity {total['sparsity']:.4f}, mean relative "
                  f"error {total['mean_relative_error']:.4g} (mask only: {total['mean_relative_error_no_update']:.4g})"
                  f"; objective {total['objective']}; time by phase: "
                  + ", ".join(f"{k} {v:.2f}s" for k, v in total["seconds"].items()))


def write_json(report: PruneReport, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> None:
    """Save the per-layer records and totals as JSON (atomically)."""
    payload = {"summary": summary(report), "layers": [r.as_dict() for r in report.layers], **(extra or {})}
    write_atomic(path, json.dumps(payload, indent=2))
