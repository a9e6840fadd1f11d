"""The ``optima`` command: LightningCLI with the pruning callback always configured.

    optima fit --config recipes/stories260k.yaml                   # prune (+ evaluate)
    optima fit --config recipes/stories260k.yaml --config recipes/methods/sparsegpt.yaml
    optima validate --config ...                                   # evaluate only
    optima fit --config ... --print_config                         # the full resolved recipe

The ``pruning:`` section configures ``OptimaPruning`` (``pruning.config`` is the
``PruneConfig``); ``evaluate: true`` validates the dense model before the fit and the
pruned one after it, and prints both; an ``lm_eval:`` section adds lm-eval-harness
tasks to both evaluations. Bad options end the command with one line and status 2.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
import warnings
from pathlib import Path
from typing import Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from rich.console import Console
from rich.table import Table
from typing_extensions import override

from optima.callbacks.pruning import OptimaPruning
from optima.config import OptionError
from optima.loading import load_tokenizer

RECIPES = Path(__file__).resolve().parent.parent / "recipes"  # the repository's recipes (editable installs)
SUBCOMMANDS = ("fit", "validate", "test", "predict")


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
    """Lightning's progress bar with the evaluation named: "dense evaluation", "pruned evaluation"."""

    label = "evaluation"

    @property
    @override
    def validation_description(self) -> str:
        return self.label


class OptimaCLI(LightningCLI):
    """LightningCLI plus a ``pruning`` section and a dense-vs-pruned evaluation around ``fit``."""

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
            kwargs["callbacks"] = [*(trainer.get("callbacks") or []), EvaluationBar()]
        return super().instantiate_trainer(**kwargs)

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
        self.dense_metrics = self._validate("dense") if self._evaluation_on() else None
        self.console.rule("calibrating and pruning")

    def after_fit(self) -> None:
        if self.dense_metrics is not None:
            self._print_metrics("Evaluation: dense vs pruned",
                                {"dense": self.dense_metrics, "pruned": self._validate("pruned")})
        if self.trainer.is_global_zero:
            for label, path in (("pruned model", getattr(self.model.hparams, "save_dir", None)),
                                ("report", self.config[self.subcommand]["pruning"].get("report_path"))):
                if path:
                    self.console.print(f"{label} written to {path}", soft_wrap=True)

    def before_validate(self) -> None:
        self.config_init[self.subcommand]["verbose"] = False  # our table below, not Lightning's per-dataloader one

    def before_test(self) -> None:
        self.config_init[self.subcommand]["verbose"] = False

    def after_validate(self) -> None:
        self._print_metrics("Evaluation", {"value": self._logged_metrics()})

    def after_test(self) -> None:
        self._print_metrics("Test", {"value": self._logged_metrics()})

    def _logged_metrics(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.trainer.callback_metrics.items()}

    def _print_metrics(self, title: str, columns: dict[str, dict[str, float]]) -> None:
        """One table, a row per metric and a column per evaluated model, then the data's protocol."""
        table = Table(title=title)
        table.add_column("metric")
        for name in columns:
            table.add_column(name, justify="right")
        for key in sorted(set().union(*columns.values())):
            table.add_row(key, *(_fmt(metrics.get(key)) for metrics in columns.values()))
        self.console.print(table)
        if hasattr(self.datamodule, "protocol"):
            self.console.print(f"protocol: {self.datamodule.protocol()}", soft_wrap=True)

    def _validate(self, label: str) -> dict[str, float]:
        self.console.rule(f"{label} evaluation")
        for bar in self.trainer.callbacks:
            if isinstance(bar, EvaluationBar):
                bar.label = f"{label} evaluation"
        results = self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)
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


def _option_name(option: str) -> str:
    """The command-line name of an option: ``PruneConfig`` fields live under ``--pruning.config``."""
    return f"--{option}" if option.split(".")[0] in ("data", "model", "pruning", "trainer") else \
        f"--pruning.config.{option}"


def _usage_problem(err: BaseException) -> str | None:
    """The one-line message for a bad option or a missing input file, looked for along the exception chain
    (jsonargparse wraps what a class raises while it instantiates it); None for any other error."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OptionError):
            return f"{_option_name(seen.option)}: {seen.reason}"
        if isinstance(seen, (FileNotFoundError, argparse.ArgumentError)):
            return str(seen)
        seen = seen.__cause__ or seen.__context__
    return None


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
    """Entry point of the ``optima`` console script."""
    _quiet_libraries()
    kwargs = {"exit_on_error": False}
    try:
        OptimaCLI(pl.LightningModule, pl.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                  args=args, save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False,
                  trainer_defaults={"max_epochs": 0, "num_sanity_val_steps": 0,
                                    "enable_checkpointing": False, "enable_model_summary": False, "logger": False},
                  parser_kwargs={**kwargs, "description": description(), **{s: kwargs for s in SUBCOMMANDS}})
    except Exception as err:
        problem = _usage_problem(err)
        if problem is None:
            raise
        sys.exit(_usage_error(problem))


def _usage_error(message: str) -> int:
    """Print ``optima: error: MESSAGE`` on one line; return the exit status of a usage error."""
    print(f"optima: error: {' '.join(message.split())} (see optima --help)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    main()
