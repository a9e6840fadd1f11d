"""Hessian accumulation: ``HessianAccumulator.add`` (lower-triangle panels) against the full X^T X product.

    python bench/bench_hessian.py            # SmolLM2-135M's input widths, a few seconds

Times one ``add`` of a calibration batch (tokens x d, float32) against what ``add`` did before: the
same finiteness check, then ``H.addmm_(X.T, X)``; best of 5 each; checks that both give the same matrix.
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table

from optima.hessian import PANEL, HessianAccumulator


def best_seconds(fn, repeats: int) -> float:
    fn()   # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="*", default=[576, 1536, 4096],
                        help="input widths d (SmolLM2-135M: 576 and 1536; LLaMA-8B: 4096)")
    parser.add_argument("--tokens", type=int, nargs="*", default=[2048, 8192], help="tokens per batch")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    table = Table(title=f"X^T X of one batch, float32, {torch.get_num_threads()} thread(s): "
                        f"lower-triangle panels of {PANEL} rows against the full product")
    for column in ("d", "tokens", "full product", "panels", "panels / full", "max |difference| / max |H|"):
        table.add_column(column, justify="right")
    for d in args.widths:
        for tokens in args.tokens:
            x = torch.randn(tokens, d, generator=torch.Generator().manual_seed(d))
            full, acc = torch.zeros(d, d), HessianAccumulator(d)
            # the accumulator's add before panels: the same input check, then the whole product
            t_full = best_seconds(lambda: (bool(torch.isfinite(x).all()), full.addmm_(x.T, x)), args.repeats)
            t_panels = best_seconds(lambda: acc.add(x), args.repeats)
            full.zero_().addmm_(x.T, x)
            acc = HessianAccumulator(d)
            acc.add(x)
            error = float((acc.sum - full).abs().max() / full.abs().max())
            table.add_row(str(d), str(tokens), f"{t_full * 1e3:.1f} ms", f"{t_panels * 1e3:.1f} ms",
                          f"{t_panels / t_full:.2f}", f"{error:.1e}")
    Console().print(table)


if __name__ == "__main__":
    main()
