"""The ``optima`` command: LightningCLI with the pruning callback always configured.

    optima fit --config recipes/stories260k.yaml                   # prune (+ evaluate)
    optima fit --config recipes/stories260k.yaml --config recipes/methods/sparsegpt.yaml
    optima validate --config ...                                   # evaluate only
    optima fit --config ... --print_config                         # the full resolved recipe

The ``pruning:`` section configures ``OptimaPruning`` (``pruning.config`` is the
``PruneConfig``); ``evaluate: true`` validates the dense model before the fit and the
pruned one after it, and prints both; an ``lm_eval:`` section adds lm-eval-harness
tasks to both evaluations. Bad options end the command with one line and status 2, before
anything is written; an interrupted one says in one line what it finished and what it left
unchanged (status 130 for SIGINT, 143 for SIGTERM).
"""

from __future__ import annotations

import argparse
import difflib
import functools
import importlib
import inspect
import json
import logging
import os
import re
import shlex
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import yaml
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from rich.console import Console
from rich.table import Table
from typing_extensions import override

from optima.atomic import check_writable, write_atomic
from optima.callbacks.module import check_save_dir_option
from optima.callbacks.pruning import OptimaPruning
from optima.callbacks.signals import Interrupted, interruptible
from optima.config import OptionError
from optima.figure import block_errors, write_figure
from optima.loading import load_tokenizer
from optima.zeroshot import suite_difference, suite_mean

RECIPES = Path(__file__).resolve().parent.parent / "recipes"  # the repository's recipes (editable installs)
SUBCOMMANDS = ("fit", "validate", "test", "predict")
SUBCOMMAND_HELP = ("The model and data options depend on the recipe's classes: 'optima fit --config RECIPE "
                   "--print_config' prints every value a recipe sets, and '--model.help optima.callbacks.lm.CausalLM' "
                   "or '--data.help optima.callbacks.lm.TextData' lists a class's options (see "
                   "optima.callbacks.encoder for the encoder recipe's).")


def description() -> str:
    """What ``optima --help`` says: what the tool does, and the recipes it can run."""
    text = ("Prune a language model one-shot: a mask selector (magnitude, Wanda, SparseGPT, Thanos) chooses "
            "the weights to zero, then OPTIMA re-solves every row's remaining weights exactly on the layer "
            "Hessian. 'optima fit --config RECIPE' prunes, evaluates the dense and the pruned model and "
            "saves the pruned one; 'optima validate --config RECIPE' only evaluates.")
    recipes = sorted(RECIPES.glob("*.yaml")) + sorted(RECIPES.glob("*/*.yaml"))
    if recipes:
        text += " Recipes (later --config files override earlier ones): " + ", ".join(
            str(p.relative_to(RECIPES.parent)) for p in recipes) + "."
    return text


class EvaluationBar(TQDMProgressBar):
    """Lightning's progress bar with the evaluation named: "dense evaluation", "pruned evaluation".

    ``plain`` (output to a log file or a pipe): no bars, a line per finished dataloader instead.
    """

    label = "evaluation"

    def __init__(self, plain: bool = False) -> None:
        super().__init__()
        self.plain = plain
        self.started = time.perf_counter()

    @property
    @override
    def validation_description(self) -> str:
        return self.label

    @property
    @override
    def is_disabled(self) -> bool:
        return self.plain or super().is_disabled

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_start(trainer, pl_module)
        self.started = time.perf_counter()

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_test_start(trainer, pl_module)
        self.started = time.perf_counter()

    def _batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                   batch_idx: int, dataloader_idx: int = 0) -> None:
        """Lightning's validation or test batch-end hook (whichever loop runs), then the plain-mode line."""
        hook = super().on_test_batch_end if trainer.testing else super().on_validation_batch_end
        hook(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        total, loaders = ((self.total_test_batches_current_dataloader, trainer.num_test_batches) if trainer.testing
                          else (self.total_val_batches_current_dataloader, trainer.num_val_batches))
        self._line(batch, batch_idx, dataloader_idx, total, len(loaders))

    on_validation_batch_end = on_test_batch_end = _batch_end

    def _line(self, batch: Any, batch_idx: int, dataloader_idx: int, total: float, loaders: int) -> None:
        """In plain mode, a line when a dataloader's last batch is done: which one, its batches, the time so far."""
        if not self.plain or batch_idx + 1 != total or not self.trainer.is_global_zero:
            return
        name = (batch.get("text") or [""])[0] if isinstance(batch, dict) else ""   # TextData names its texts
        print(f"{self.label}: {dataloader_idx + 1}/{loaders} {name or 'text'} done ({int(total)} batches, "
              f"{time.perf_counter() - self.started:.0f} s)", flush=True)


class ConfigAtFitEnd(SaveConfigCallback):
    """Lightning's ``config.yaml``, written (atomically) when a fit ends, with the outputs it describes: a
    refused or interrupted fit leaves the previous run's in place; validate and test write none."""

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        pass

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            write_atomic(Path(trainer.log_dir) / self.config_filename, self.parser.dump(self.config, skip_none=False))


@dataclass
class Progress:
    """How far the command got: what the line an interruption prints says."""

    cli: OptimaCLI | None = None
    stage: str = "starting"   # then "dense evaluation", "pruning", "pruned evaluation"; or "evaluation"


class OptimaCLI(LightningCLI):
    """LightningCLI plus a ``pruning`` section and a dense-vs-pruned evaluation around ``fit``.

    Every check runs before anything is written: fit's output paths before the classes are built,
    the data against the model before the first evaluation or the pruning.
    """

    def __init__(self, *args: Any, progress: Progress, **kwargs: Any) -> None:
        self.progress = progress
        progress.cli = self
        self.suites: dict[str, dict | None] = {}   # zero-shot results of each evaluated model ("dense", "pruned")
        super().__init__(*args, **kwargs)

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(OptimaPruning, "pruning")
        parser.link_arguments("pruning.calibration_samples", "data.init_args.calibration_samples")
        parser.add_argument("--evaluate", type=bool, default=True,
                            help="validate the dense model before pruning and the pruned one after, print both")
        parser.add_argument("--lm_eval.tasks", type=Optional[list[str]], default=None,
                            help="lm-eval-harness tasks to run on the dense and the pruned model, e.g. [boolq, rte, "
                                 "hellaswag, winogrande, arc_easy, arc_challenge, openbookqa] (hub tasks need a "
                                 "network; pip install -e '.[lmeval]' in the optima checkout)")
        parser.add_argument("--lm_eval.include_path", type=Optional[str], default=None,
                            help="folder of custom lm-eval task YAMLs (local tasks run offline)")
        parser.add_argument("--lm_eval.limit", type=Optional[float], default=None,
                            help="at most this many items per task (a fraction if < 1)")
        parser.add_argument("--lm_eval.batch_size", type=int, default=16, help="sequences per forward pass")

    @override
    def instantiate_trainer(self, **kwargs) -> pl.Trainer:
        """The recipe's Trainer, with Lightning's progress bar replaced by one that names each evaluation."""
        trainer = self.config_init[self.subcommand]["trainer"] if self.subcommand else self.config_init["trainer"]
        if trainer.get("enable_progress_bar") is not False and "callbacks" not in kwargs:
            kwargs["callbacks"] = [*(trainer.get("callbacks") or []), EvaluationBar(plain=not self.console.is_terminal)]
        return super().instantiate_trainer(**kwargs)

    @override
    def before_instantiate_classes(self) -> None:
        """fit's output paths, checked before the model loads (validate and test write nothing)."""
        if self.subcommand != "fit":
            return
        config = self.config.fit
        model = config.model.get("init_args") or {}
        check_save_dir_option(model.get("save_dir"), model.get("model"))
        OptimaPruning.check_outputs(config.pruning.get("report_path"), config.pruning.get("resume_dir"))
        root = config.trainer.get("default_root_dir") or os.getcwd()
        try:
            check_writable(Path(root) / "config.yaml")
        except ValueError as err:
            raise OptionError("trainer.default_root_dir", str(err)) from None

    def _check_inputs(self, stage: str) -> None:
        """Read the data and check it against the model now, before any evaluation, pruning or output."""
        if self.datamodule is not None:
            self.datamodule.setup(stage)   # the data modules keep what they read: Lightning's call reuses it
        check_data = getattr(self.model, "check_data", None)
        if check_data is not None:
            check_data(self.datamodule)

    def fit(self, **kwargs: Any) -> None:
        """``trainer.fit``, with how far it got kept for an interruption's message."""
        self.progress.stage = "pruning"
        self.trainer.fit(**kwargs)
        self.progress.stage = "pruned evaluation"

    def _evaluation_on(self) -> bool:
        hp = getattr(self.datamodule, "hparams", {})
        return bool(self.config[self.subcommand].get("evaluate")) and (self._lm_eval_tasks() or (
            self.datamodule is not None and (hp.get("evaluation") is not None or bool(hp.get("zero_shot")))))

    def _lm_eval_tasks(self) -> list[str]:
        return list(self.config[self.subcommand].get("lm_eval", {}).get("tasks") or [])

    @functools.cached_property
    def console(self) -> Console:
        """Rich output; 200 columns wide when it goes to a file or a pipe."""
        return Console() if Console().is_terminal else Console(width=200)

    def before_fit(self) -> None:
        self._check_inputs("fit")
        self.progress.stage = "dense evaluation"
        self.dense_metrics = self._validate("dense") if self._evaluation_on() else None
        self.console.rule("calibrating and pruning")

    def after_fit(self) -> None:
        if self.dense_metrics is not None:
            columns = {"dense": self.dense_metrics, "pruned": self._validate("pruned")}
            self._print_metrics("Evaluation: dense vs pruned", columns)
            self._report_evaluation(columns)
        if self.trainer.is_global_zero:
            for label, path in (("pruned model", getattr(self.model.hparams, "save_dir", None)),
                                ("report", self.config[self.subcommand]["pruning"].get("report_path"))):
                if path:
                    self.console.print(f"{label} written to {path}", soft_wrap=True)

    def before_validate(self) -> None:
        self._check_inputs("validate")
        self.progress.stage = "evaluation"
        self.config_init[self.subcommand]["verbose"] = False  # our table below, not Lightning's per-dataloader one

    def before_test(self) -> None:
        self._check_inputs("test")
        self.progress.stage = "evaluation"
        self.config_init[self.subcommand]["verbose"] = False

    def after_validate(self) -> None:
        self.suites = {"value": getattr(self.model, "zero_shot", None)}
        self._print_metrics("Evaluation", {"value": self._logged_metrics()})

    def after_test(self) -> None:
        self.suites = {"value": getattr(self.model, "zero_shot", None)}
        self._print_metrics("Test", {"value": self._logged_metrics()})

    def _logged_metrics(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.trainer.callback_metrics.items()}

    def _print_metrics(self, title: str, columns: dict[str, dict[str, float]]) -> None:
        """One table, a row per metric and a column per evaluated model, then the zero-shot suite's
        table (per task and the mean, with standard errors and paired differences) and the protocol."""
        suites = self._scored_suites()
        table = Table(title=title)
        table.add_column("metric")
        for name in columns:
            table.add_column(name, justify="right")
        for key in sorted(set().union(*columns.values())):
            if not _is_zero_shot(key, suites):
                table.add_row(key, *(_fmt(metrics.get(key)) for metrics in columns.values()))
        self.console.print(table)
        if suites:
            self.console.print(suite_table(suites))
        if hasattr(self.datamodule, "protocol"):
            self.console.print(f"protocol: {self.datamodule.protocol()}", soft_wrap=True)

    def _scored_suites(self) -> dict[str, dict]:
        """The zero-shot results of the models evaluated so far, those with a suite configured."""
        return {name: suite for name, suite in self.suites.items() if suite}

    def _report_evaluation(self, columns: dict[str, dict[str, float]]) -> None:
        """Add the evaluation (every metric of the tables, the suite per item) to the JSON report, and
        write the figure beside it."""
        path = self.config[self.subcommand]["pruning"].get("report_path")
        if not path or not self.trainer.is_global_zero or not Path(path).is_file():
            return
        report = json.loads(Path(path).read_text())
        suites = self._scored_suites()
        protocol = self.datamodule.protocol() if hasattr(self.datamodule, "protocol") else None
        report["evaluation"] = {"protocol": protocol, **columns}
        if suites:
            report["evaluation"]["zero_shot"] = suite_report(suites)
        write_atomic(path, json.dumps(report, indent=2))
        if suites:
            figure = Path(path).with_suffix(".png")
            try:
                write_figure(figure, suites, block_errors(report.get("layers", [])))
                self.console.print(f"figure written to {figure}", soft_wrap=True)
            except ImportError as err:
                self.console.print(f"figure not written: {err}", soft_wrap=True)

    def _validate(self, label: str) -> dict[str, float]:
        self.console.rule(f"{label} evaluation")
        for bar in self.trainer.callbacks:
            if isinstance(bar, EvaluationBar):
                bar.label = f"{label} evaluation"
        if hasattr(self.model, "zero_shot_progress"):
            self.model.zero_shot_progress = SuiteProgress(self.console, label)
        results = self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)
        self.suites[label] = getattr(self.model, "zero_shot", None)
        metrics = {k: float(v) for per_loader in results for k, v in per_loader.items()}
        if self._lm_eval_tasks():
            metrics.update(self._lm_eval())
        return metrics

    def _lm_eval(self) -> dict[str, float]:
        """The configured lm-eval-harness tasks on the module's model as it is now, ``lm_eval/TASK_METRIC``."""
        from optima.lmeval import evaluate_tasks

        options = self.config[self.subcommand]["lm_eval"]
        hp = self.model.hparams
        limit = options.get("limit")
        scores = evaluate_tasks(self.model.model, load_tokenizer(hp.get("tokenizer") or hp["model"]),
                                self._lm_eval_tasks(), batch_size=options.get("batch_size", 16),
                                include_path=options.get("include_path"),
                                limit=int(limit) if limit is not None and limit >= 1 else limit)
        return {f"lm_eval/{task}_{metric}": value for task, values in scores.items() for metric, value in values.items()
                if "stderr" not in metric}


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.6g}"


def _is_zero_shot(key: str, suites: dict[str, dict]) -> bool:
    """Whether a logged metric (``val/TASK_METRIC``, ``val/zero_shot_mean``) belongs to the suite's own table."""
    stage, _, name = key.partition("/")
    tasks = set().union(*suites.values()) if suites else set()
    return stage in ("val", "test") and (name.startswith("zero_shot_mean") or
                                         any(name.startswith(f"{task}_") for task in tasks))


def _points(value: float, stderr: float) -> str:
    return f"{100 * value:.2f} ± {100 * stderr:.2f}"


def suite_table(suites: dict[str, dict[str, dict]]) -> Table:
    """Per task its suite metric for each model, in points ± standard error; with two models, the second
    minus the first, paired over the same items; the last row is the suite mean."""
    names = list(suites)
    first = suites[names[0]]
    table = Table(title="Zero-shot suite (points ± standard error)")
    for column in ("task", "metric", "items", *names):
        table.add_column(column, justify="right")
    paired = len(names) == 2
    if paired:
        table.add_column(f"{names[1]} - {names[0]} (paired)", justify="right")
        difference = suite_difference(first, suites[names[1]])
    for task, result in first.items():
        metric = result["metric"]
        cells = [_points(s[task][metric], s[task][f"{metric}_stderr"]) for s in suites.values()]
        table.add_row(task, metric, str(result["n"]), *cells, *([_points(*difference[task])] if paired else []))
    table.add_row("mean", "", "", *(_points(*suite_mean(s)) for s in suites.values()),
                  *([_points(*difference["mean"])] if paired else []))
    return table


def suite_report(suites: dict[str, dict[str, dict]]) -> dict:
    """The suite for the JSON report: per model each task's results (per-item hits included, the
    log-likelihoods left out) and the mean; with two models, the paired differences."""
    report: dict = {name: {"tasks": {task: {k: v for k, v in r.items() if k != "loglikelihoods"}
                                     for task, r in suite.items()},
                           "mean": dict(zip(("value", "stderr"), suite_mean(suite)))}
                    for name, suite in suites.items()}
    if len(suites) == 2:
        before, after = suites.values()
        report["difference"] = {key: dict(zip(("value", "stderr"), d))
                                for key, d in suite_difference(before, after).items()}
    return report


class SuiteProgress:
    """Zero-shot progress for ``evaluate_suite``: a line per task (log files and terminals alike)."""

    def __init__(self, console: Console, label: str) -> None:
        self.console, self.label, self.start = console, label, time.perf_counter()

    def __call__(self, task: str, done: int, total: int) -> None:
        if done == total:
            self.console.print(f"{self.label} zero-shot: {task} done ({total} requests, "
                               f"{time.perf_counter() - self.start:.0f} s)", soft_wrap=True)


def _option_name(option: str) -> str:
    """The command-line name of an option: ``PruneConfig`` fields live under ``--pruning.config``."""
    return f"--{option}" if option.split(".")[0] in ("data", "model", "pruning", "trainer") else \
        f"--pruning.config.{option}"


def _usage_problem(err: BaseException, args: list[str], progress: Progress) -> str | None:
    """The one-line message for a bad option or a missing input file, looked for along the exception chain
    (jsonargparse wraps what a class raises while it instantiates it); None for any other error."""
    chain: list[BaseException] = []
    seen: BaseException | None = err
    while seen is not None:
        chain.append(seen)
        if isinstance(seen, OptionError):
            return f"{_option_name(seen.option)}: {seen.reason}"
        if isinstance(seen, FileNotFoundError):
            return str(seen)
        if isinstance(seen, argparse.ArgumentError):
            return _parse_problem(str(seen), "\n".join(map(str, chain)), args, progress)
        seen = seen.__cause__ or seen.__context__
    return None


def _parse_problem(message: str, details: str, args: list[str], progress: Progress) -> str:
    """jsonargparse's ``message`` made plain (``details``: the messages of the errors it wraps): the
    recipe file and line of a YAML error; for a misspelt option, the nearest valid name."""
    if message.startswith("Problems parsing config"):
        for path in _config_files(args):
            try:
                yaml.safe_load(Path(path).read_text())
            except yaml.MarkedYAMLError as bad:
                mark = bad.problem_mark or bad.context_mark
                return f"{path}: line {mark.line + 1}, column {mark.column + 1}: {bad.problem or bad.context}"
            except (OSError, yaml.YAMLError):
                continue
    unknown = re.search(r'Parser key "(\w+)".*class_path \'([\w.]+)\':\s*Option \'(\w+)\' is not accepted', details,
                        re.DOTALL)
    if unknown:
        group, class_path, name = unknown.groups()
        module, _, cls = class_path.rpartition(".")
        valid = inspect.signature(getattr(importlib.import_module(module), cls)).parameters
        return f"--{group}.init_args.{name}: not an option of {class_path}" + _suggest(
            name, list(valid), f"--{group}.init_args.")
    cli = progress.cli
    parsers = getattr(cli, "_subcommand_parsers", {})
    subcommand = next((a for a in args if a in SUBCOMMANDS), None)
    options = [o for o in getattr(parsers.get(subcommand), "_option_string_actions", {}) if o.startswith("--")]
    unknown = re.search(r"unrecognized arguments: (--[\w.]+)", message)
    if unknown:
        return f"{message}{_suggest(unknown.group(1), options)}"
    unknown = re.search(r"(Group|Subcommand) '([\w.]+)' does not accept option '([\w.]+)'", message)
    if unknown:
        kind, group, name = unknown.groups()
        key = f"{group}.{name}" if kind == "Group" else name
        where = next((f" in {path}" for path in _config_files(args) if _has_key(path, key)), "")
        return f"{key}{where}: not an option{_suggest(key, [o.removeprefix('--') for o in options])}"
    return message


def _suggest(name: str, valid: list[str], prefix: str = "") -> str:
    """`` (did you mean PREFIX+NEAREST?)`` for the valid name closest to ``name``, or nothing."""
    nearest = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    return f" (did you mean {prefix}{nearest[0]}?)" if nearest else ""


def _has_key(path: str, key: str) -> bool:
    """Whether the YAML file ``path`` sets the dotted ``key``."""
    try:
        node = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _config_files(args: list[str]) -> list[str]:
    """The ``--config`` files of a command line, in order."""
    files = [value for flag, value in zip(args, args[1:]) if flag == "--config"]
    return files + [a.split("=", 1)[1] for a in args if a.startswith("--config=")]


def _interruption(progress: Progress, args: list[str]) -> str:
    """What an interrupted command finished and what it left unchanged, for ``Interrupted.report``."""
    cli, stage = progress.cli, progress.stage
    if stage == "starting" or getattr(cli, "subcommand", None) != "fit":
        return f"{'while starting' if stage == 'starting' else 'during the ' + stage}: nothing was written"
    pruning = next(c for c in cli.trainer.callbacks if isinstance(c, OptimaPruning))
    config = os.path.join(cli.trainer.log_dir, "config.yaml")
    outputs = [p for p in (getattr(cli.model, "save_dir", None), pruning.report_path, config) if p]
    if stage == "pruned evaluation":
        return f"during the pruned evaluation: the pruning finished and wrote {', '.join(outputs)}"
    kept = [p for p in outputs if os.path.exists(p)]
    unchanged = f"left unchanged: {', '.join(kept)}" if kept else "no output written"
    if stage == "pruning" and pruning.pruned:
        return f"after pruning, before the fit ended and wrote its outputs: {unchanged}"
    if stage != "pruning" or pruning.block is None:
        return f"during the {stage if stage != 'pruning' else 'calibration'}: {unchanged}"
    block, blocks = pruning.block
    resume_dir = pruning.run_options.resume_dir
    kept_blocks = (f"{block} finished blocks kept in {resume_dir}; resume with: optima {shlex.join(args)}" if resume_dir
                   else f"{block} finished blocks not kept (--pruning.resume_dir=DIR keeps them for a rerun)")
    return f"while pruning block {block + 1}/{blocks}: {unchanged}; {kept_blocks}"


def _quiet_libraries() -> None:
    """Keep the libraries' own chatter (accelerator lines, tips, data-loader advice, weight loading
    and saving bars) out of the command's output: it shows only its own progress and tables."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for pattern in (".*does not have many workers.*", ".*litlogger.*", ".*LeafSpec.*"):
        warnings.filterwarnings("ignore", pattern)


def main(args: list[str] | None = None) -> None:
    """Run the ``optima`` command (the console script is ``optima.callbacks.command.main``)."""
    argv = sys.argv[1:] if args is None else list(args)
    progress = Progress()
    kwargs = {"exit_on_error": False}
    subcommands = {s: {**kwargs, "description": SUBCOMMAND_HELP,
                       "usage": f"optima {s} [-h] [--config RECIPE ...] [--print_config] [--OPTION=VALUE ...]"}
                   for s in SUBCOMMANDS}
    with interruptible():
        try:
            _quiet_libraries()
            OptimaCLI(pl.LightningModule, pl.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                      args=args, save_config_callback=ConfigAtFitEnd, auto_configure_optimizers=False,
                      trainer_defaults={"max_epochs": 0, "num_sanity_val_steps": 0, "enable_checkpointing": False,
                                        "enable_model_summary": False, "logger": False},
                      parser_kwargs={**kwargs, "prog": "optima", "description": description(), **subcommands},
                      progress=progress)
        except Interrupted as stop:
            sys.exit(stop.report(_interruption(progress, argv)))
        except Exception as err:
            problem = _usage_problem(err, argv, progress)
            if problem is None:
                raise
            sys.exit(_usage_error(problem))


def _usage_error(message: str) -> int:
    """Print ``optima: error: MESSAGE`` on one line; return the exit status of a usage error."""
    print(f"optima: error: {' '.join(message.split())} (see optima --help)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    main()
