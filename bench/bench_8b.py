"""LLaMA-3.1-8B-shaped layers: SparseGPT vs OPTIMA per layer, and the projected time for the whole model.

    python bench/bench_8b.py                      # CPU: about 20 minutes on one thread
    python bench/bench_8b.py --device cuda        # a GPU: every layer at full size
    python bench/bench_8b.py --preconditioner hinv   # another preconditioner than the device's default
    python bench/bench_8b.py --matmul bfloat16    # CG's matmuls in bfloat16, refined in float32

The seven linear layers of a LLaMA-3.1-8B block (hidden 4096, 8 key-value heads of 128,
intermediate 14336): q_proj and o_proj 4096x4096, k_proj and v_proj 1024x4096, gate_proj and
up_proj 14336x4096, down_proj 4096x14336. Weights are random (0.02 N(0, 1)); the two Hessians
(d = 4096 and d = 14336) are X^T X / n of n = 2d correlated inputs with a decaying spectrum,
8 outlier features x10 and a dead input, the generator of ``bench_solver.py``.

Timed as in ``bench_solver.py``: SparseGPT = ``optima.sparsegpt.sparsegpt`` (damping, inverse
Hessian, mask and update; best of 2 runs), OPTIMA = the Wanda mask + ``damp_hessian`` + ``solve_pinned`` (the
default solver) + applying it, 50% unstructured; on a GPU after one untimed run of the same
shape (torch.compile's first call compiles). Both costs are a part paid once per Hessian
(factorizations: d^3) plus a part per row (d^2 each), so where a layer is too big to run whole
on this machine (``--rows``), each method is timed on two row counts of the real width and the
time is extrapolated linearly to the full row count (said so in the table). Projection for the
whole model: 32 blocks x the seven layers' times.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from bench_solver import DAMP, PATTERN, optima_update, synthetic_layers, synchronize  # noqa: E402

from optima import SolverOptions  # noqa: E402
from optima.masks import wanda_mask  # noqa: E402
from optima.solver import PRECONDITIONERS  # noqa: E402
from optima.sparsegpt import sparsegpt  # noqa: E402

BLOCK = [("q_proj", 4096, 4096), ("k_proj", 1024, 4096), ("v_proj", 1024, 4096), ("o_proj", 4096, 4096),
         ("gate_proj", 14336, 4096), ("up_proj", 14336, 4096), ("down_proj", 4096, 14336)]
BLOCKS = 32
PAPER_HOURS = 40.0   # the OPTIMA paper's time for an 8B model on one H100 (../shared/OPTIMA.md)


def timed(fn, device: torch.device) -> tuple[float, object]:
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - start, out


def layer_times(weight: torch.Tensor, hessian: torch.Tensor, device: torch.device,
                options: SolverOptions) -> dict[str, float]:
    """Seconds of SparseGPT and of Wanda + OPTIMA on these rows, and OPTIMA's mean CG iterations."""
    w, h = weight.to(device), hessian.to(device=device, dtype=torch.float32)
    # best of 2: SparseGPT's time is mostly its d^3 part, so the row extrapolation amplifies any noise in it
    t_sgpt = min(timed(lambda: sparsegpt(w, h, PATTERN, damp=DAMP), device)[0] for _ in range(2))
    t_mask, keep = timed(lambda: wanda_mask(w, h, PATTERN), device)
    if device.type == "cuda":   # untimed first run: torch.compile's code for this shape, cuBLAS's handles
        optima_update(w, h, keep, options)
    t_update, (_, result) = timed(lambda: optima_update(w, h, keep, options), device)
    return {"sparsegpt": t_sgpt, "optima": t_mask + t_update, "iters": float(result.cg_iterations.float().mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, nargs=2, default=None, metavar=("FEW", "MORE"),
                        help="time FEW and MORE rows and extrapolate (default: 256 512 on the CPU, whole on a GPU)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the CG step (default: SolverOptions', compiled on CUDA)")
    parser.add_argument("--preconditioner", choices=PRECONDITIONERS, default=None,
                        help="default: SolverOptions' own choice for the device")
    parser.add_argument("--matmul", choices=("full", "bfloat16", "tf32"), default="full",
                        help="precision of CG's matmuls (SolverOptions.matmul)")
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = args.rows or ((256, 512) if device.type == "cpu" else None)
    options = SolverOptions(compile=args.compile, preconditioner=args.preconditioner, matmul=args.matmul)
    console = Console(width=180)
    console.print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} CPU threads, "
                  f"50% unstructured, damping {DAMP}, solver {options}")
    start = time.perf_counter()
    biggest = {d: max(r for _, r, dd in BLOCK if dd == d) for d in {d for *_, d in BLOCK}}
    shapes = [(min(rows[1], r) if rows else r, d) for d, r in biggest.items()]
    layers = {layer.hessian.shape[0]: layer for layer in synthetic_layers(shapes)}
    console.print(f"Hessians built in {time.perf_counter() - start:.0f} s")
    table = Table(title="LLaMA-3.1-8B layer shapes: seconds per layer")
    for column in ("layer", "rows x d", "SparseGPT", "OPTIMA (Wanda mask)", "OPTIMA / SparseGPT", "CG iterations",
                   "how"):
        table.add_column(column, justify="left" if column in ("layer", "how") else "right")
    totals = {"sparsegpt": 0.0, "optima": 0.0}
    for name, r, d in BLOCK:
        layer = layers[d]
        if rows and r > rows[1]:
            few, more = (layer_times(layer.weight[:n], layer.hessian, device, options) for n in rows)
            times = {k: few[k] + (more[k] - few[k]) * (r - rows[0]) / (rows[1] - rows[0]) for k in totals}
            times["iters"], how = more["iters"], f"extrapolated from {rows[0]} and {rows[1]} rows"
        else:
            times, how = layer_times(layer.weight[:r], layer.hessian, device, options), "measured whole"
        for k in totals:
            totals[k] += times[k]
        table.add_row(name, f"{r}x{d}", f"{times['sparsegpt']:.1f} s", f"{times['optima']:.1f} s",
                      f"{times['optima'] / times['sparsegpt']:.2f}x", f"{times['iters']:.1f}", how)
    table.add_row("one block", "", f"{totals['sparsegpt']:.1f} s", f"{totals['optima']:.1f} s",
                  f"{totals['optima'] / totals['sparsegpt']:.2f}x", "", "")
    console.print(table)
    hours = {k: BLOCKS * v / 3600 for k, v in totals.items()}
    console.print(f"Projected for the {BLOCKS} blocks of LLaMA-3.1-8B (solver only, no calibration passes): "
                  f"SparseGPT {hours['sparsegpt']:.2f} h, Wanda+OPTIMA {hours['optima']:.2f} h "
                  f"(the paper: {PAPER_HOURS:.0f} h on one H100). Bench time {time.perf_counter() - start:.0f} s.")


if __name__ == "__main__":
    main()
