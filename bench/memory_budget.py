"""Peak memory of the PCG solve against ``SolverOptions.memory_budget``, measured with MemTracker.

    python bench/memory_budget.py

``solve_pinned`` alone (Wanda mask, 50%, float32) on a synthetic 1024x4096 layer and the real
MiniLM intermediate.dense (1536x384), with the default budget (2 GiB on the CPU) and with 64 and
16 MiB. The peak counts every tensor the call creates (torch's MemTracker); beyond the d x d
matrices (scaled H, Cholesky factor, and the inverse or the "ldl" block factors) and the returned
update, it should stay within the budget.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch.distributed._tools.mem_tracker import MemTracker

sys.path.insert(0, str(Path(__file__).parent))
from bench_solver import DAMP, PATTERN, minilm_layers, synthetic_layers  # noqa: E402

from optima import SolverOptions, damp_hessian  # noqa: E402
from optima.masks import wanda_mask  # noqa: E402
from optima.solver import solve_pinned  # noqa: E402

MIB = 1 << 20


def main() -> None:
    layers = synthetic_layers([(1024, 4096)]) + [minilm_layers(64, 128)[1]]
    table = Table(title="Peak memory of solve_pinned (PCG) by memory budget")
    for column in ("layer", "budget", "peak", "d x d matrices (3)", "returned update", "peak - both", "converged"):
        table.add_column(column, justify="left" if column == "layer" else "right")
    for layer in layers:
        w, h = layer.weight, layer.hessian.float()
        keep = wanda_mask(w, h, PATTERN)
        damped, damping = damp_hessian(h, DAMP)
        rows, d = w.shape
        matrices, update = 3 * d * d * 4, rows * d * 4
        for budget in (None, 64 * MIB, 16 * MIB):
            tracker = MemTracker()
            with tracker:
                result = solve_pinned(damped, w, keep, damping, SolverOptions(method="pcg", memory_budget=budget))
            peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
            table.add_row(layer.name, "default" if budget is None else f"{budget // MIB} MiB", f"{peak / MIB:.1f} MiB",
                          f"{matrices / MIB:.1f} MiB", f"{update / MIB:.1f} MiB",
                          f"{(peak - matrices - update) / MIB:.1f} MiB", str(bool(result.converged.all())))
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
