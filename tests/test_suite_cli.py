"""The zero-shot suite in the ``optima`` command: the printed table, the JSON report and the figure
agree with ``evaluate_suite`` run directly on the dense and the saved pruned model."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from optima.loading import assets_dir
from optima.tasks import PAPER_SUITE
from optima.zeroshot import evaluate_suite, suite_difference, suite_mean

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "tests" / "recipes" / "stories260k-tiny.yaml"
TASKS = {"arc_easy": PAPER_SUITE["arc_easy"], "winogrande": PAPER_SUITE["winogrande"]}
ITEMS = 16   # the tiny recipe's zero_shot_items


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OPTIMA_ASSETS": str(assets_dir())}
    process = subprocess.run(
        [sys.executable, "-c", "from optima.callbacks.cli import main; main()", "fit", "--config", str(RECIPE),
         f"--trainer.default_root_dir={out}", f"--model.init_args.save_dir={out / 'pruned'}",
         f"--pruning.report_path={out / 'report.json'}"], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=900)
    assert process.returncode == 0, process.stderr[-3000:]
    return process.stdout, out


def test_the_table_the_report_and_the_figure_hold_the_suite(run):
    from optima.llama2c import load_llama2c, load_llama2c_tokenizer

    stdout, out = run
    tokenizer = load_llama2c_tokenizer(assets_dir() / "stories260K" / "tok512.bin")
    dense = evaluate_suite(load_llama2c(assets_dir() / "stories260K" / "stories260K.bin"), tokenizer, TASKS,
                           limit=ITEMS)
    from transformers import AutoModelForCausalLM

    pruned = evaluate_suite(AutoModelForCausalLM.from_pretrained(out / "pruned"), tokenizer, TASKS, limit=ITEMS)
    zero_shot = json.loads((out / "report.json").read_text())["evaluation"]["zero_shot"]
    for label, ours in (("dense", dense), ("pruned", pruned)):
        for name, result in ours.items():
            saved = zero_shot[label]["tasks"][name]
            assert saved["n"] == ITEMS and saved["hits"] == result["hits"]
            assert saved["acc"] == result["acc"] and saved["acc_stderr"] == result["acc_stderr"]
        assert zero_shot[label]["mean"]["value"] == pytest.approx(suite_mean(ours)[0])
    difference = suite_difference(dense, pruned)
    assert zero_shot["difference"]["mean"]["value"] == pytest.approx(difference["mean"][0])
    assert zero_shot["difference"]["mean"]["stderr"] == pytest.approx(difference["mean"][1])
    # the printed rows: points ± standard error, dense, pruned and the paired difference
    row = re.search(r"winogrande\s*│\s*acc\s*│\s*16\s*│\s*([\d.]+) ± ([\d.]+)\s*│\s*([\d.]+) ± ([\d.]+)\s*│\s*(-?[\d.]+) ±",
                    stdout)
    assert row, stdout
    assert float(row.group(1)) == pytest.approx(100 * dense["winogrande"]["acc"], abs=0.006)
    assert float(row.group(3)) == pytest.approx(100 * pruned["winogrande"]["acc"], abs=0.006)
    assert float(row.group(5)) == pytest.approx(100 * difference["winogrande"][0], abs=0.006)
    assert "zero-shot mean of arc_easy acc, winogrande acc (MMLU has no offline copy)" in stdout
    assert re.search(r"^dense zero-shot: winogrande done \(32 requests, \d+ s\)$", stdout, re.MULTILINE)
    assert (out / "report.png").read_bytes().startswith(b"\x89PNG")
