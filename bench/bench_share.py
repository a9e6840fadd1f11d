"""Row split across processes: one layer's OPTIMA solve on 2 processes against 1, measured in one run.

    python bench/bench_share.py                     # MiniLM layers + a synthetic 1024x4096 layer
    python bench/bench_share.py --synthetic ""      # MiniLM layers only

Each process runs on one CPU thread, pinned to its own core (process r on core r), so two
processes stand for two devices. Each layer (Wanda mask, 50% unstructured, float32) is pruned
by ``prune_weight(update="optima")`` given the mask: damping, the solve and the layer's numbers.
With 2 processes (gloo), every process solves half the rows and sums half the objectives
(``optima.share.RowShare``); the all-gathers are inside the timing. Times are the best of
``--repeats``; the table gives 2-process time / 1-process time and checks the results agree.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from bench_solver import minilm_layers, synthetic_layers  # noqa: E402

from optima import PruneConfig, prune_weight  # noqa: E402
from optima.masks import wanda_mask  # noqa: E402
from optima.share import process_group_share  # noqa: E402


def worker(rank: int, world: int, layers_file: str, out: str, repeats: int) -> None:
    """Time every layer's pruning in this process (a share of the rows when world > 1)."""
    torch.set_num_threads(1)
    share = None
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"file://{out}.store", rank=rank, world_size=world)
        share = process_group_share()
    config = PruneConfig(mask="wanda", update="optima")
    results = {}
    for name, (weight, hessian) in torch.load(layers_file).items():
        hessian = hessian.float()
        keep = wanda_mask(weight, hessian, config.pattern_for())
        best, result = float("inf"), None
        for _ in range(repeats):
            if share is not None:
                torch.distributed.barrier()
            start = time.perf_counter()
            result = prune_weight(weight, hessian, config, keep=keep, share=share)
            best = min(best, time.perf_counter() - start)
        results[name] = (best, result.weight, result.stats.cg_iterations_mean)
    if rank == 0:
        torch.save(results, out)
    if share is not None:
        torch.distributed.destroy_process_group()   # left alive, gloo's threads can abort the interpreter at exit


def run(world: int, layers_file: str, out: str, repeats: int) -> dict:
    procs = [subprocess.Popen(["taskset", "-c", str(rank), sys.executable, __file__, "--worker", str(rank), str(world),
                               layers_file, out, "--repeats", str(repeats)],
                              env={**os.environ, "OMP_NUM_THREADS": "1"}) for rank in range(world)]
    for proc in procs:
        if proc.wait() != 0:
            raise SystemExit(f"worker failed with status {proc.returncode}")
    return torch.load(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--synthetic", default="1024x4096", help="comma-separated ROWSxD shapes ('' for none)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", nargs=4, metavar=("RANK", "WORLD", "LAYERS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        rank, world, layers_file, out = args.worker
        return worker(int(rank), int(world), layers_file, out, args.repeats)
    torch.set_num_threads(1)
    shapes = [tuple(map(int, s.split("x"))) for s in args.synthetic.split(",") if s]
    layers = minilm_layers(64, 128) + synthetic_layers(shapes)
    console = Console(width=160)
    with tempfile.TemporaryDirectory() as tmp:
        layers_file = f"{tmp}/layers.pt"
        torch.save({layer.name: (layer.weight, layer.hessian) for layer in layers}, layers_file)
        one = run(1, layers_file, f"{tmp}/one.pt", args.repeats)
        two = run(2, layers_file, f"{tmp}/two.pt", args.repeats)
    table = Table(title=f"OPTIMA update of one layer, 1 vs 2 processes (1 thread each), best of {args.repeats}")
    for column in ("layer", "1 process", "2 processes", "2 / 1", "same mask", "max |w2 - w1| / max |w1|",
                   "CG iterations"):
        table.add_column(column, justify="left" if column == "layer" else "right")
    for name, (t1, w1, iters) in one.items():
        t2, w2, _ = two[name]
        table.add_row(name, f"{t1:.3f} s", f"{t2:.3f} s", f"{t2 / t1:.2f}x", str(torch.equal(w1 == 0, w2 == 0)),
                      f"{float((w2 - w1).abs().max() / w1.abs().max()):.1e}", f"{iters:.1f}")
    console.print(table)


if __name__ == "__main__":
    main()
