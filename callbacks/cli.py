"""The ``optima`` command: LightningCLI with the pruning callback always configured.

    optima fit --config recipes/stories260k-wanda-optima.yaml      # prune (+ evaluate)
    optima validate --config ...                                   # evaluate only
    optima fit --config ... --print_config                         # the full resolved recipe

The ``pruning:`` section configures ``OptimaPruning``; ``evaluate: true`` validates
the dense model before the fit and the pruned one after it, and prints both; an
``lm_eval:`` section adds lm-eval-harness tasks to both evaluations.
"""

from __future__ import annotations

from typing import Optional

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from rich.console import Console
from rich.table import Table

from callbacks.pruning import OptimaPruning
from optima.loading import load_tokenizer


class OptimaCLI(LightningCLI):
    """LightningCLI plus a ``pruning`` section and a dense-vs-pruned evaluation around ``fit``."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(OptimaPruning, "pruning")
        parser.link_arguments("pruning.calibration_samples", "data.init_args.calibration_samples")
        parser.add_argument("--evaluate", type=bool, default=True,
                            help="validate the dense model before pruning and the pruned one after, print both")
        parser.add_argument("--lm_eval.tasks", type=Optional[list[str]], default=None,
                            help="lm-eval-harness tasks to run on the dense and the pruned model, e.g. [boolq, rte, "
                                 "hellaswag, winogrande, arc_easy, arc_challenge, openbookqa] (hub tasks need a "
                                 "network; pip install 'optima-prune[lmeval]')")
        parser.add_argument("--lm_eval.include_path", type=Optional[str], default=None,
                            help="folder of custom lm-eval task YAMLs (local tasks run offline)")
        parser.add_argument("--lm_eval.limit", type=Optional[float], default=None,
                            help="at most this many items per task (a fraction if < 1)")
        parser.add_argument("--lm_eval.batch_size", type=int, default=16, help="sequences per forward pass")

    def _evaluation_on(self) -> bool:
        hp = getattr(self.datamodule, "hparams", {})
        return bool(self.config[self.subcommand].get("evaluate")) and (self._lm_eval_tasks() or (
            self.datamodule is not None and (hp.get("evaluation") is not None or bool(hp.get("zero_shot")))))

    def _lm_eval_tasks(self) -> list[str]:
        return list(self.config[self.subcommand].get("lm_eval", {}).get("tasks") or [])

    def before_fit(self) -> None:
        self.console = Console(width=200) if not Console().is_terminal else Console()
        self.dense_metrics = self._validate("dense") if self._evaluation_on() else None

    def after_fit(self) -> None:
        if self.dense_metrics is not None:
            pruned = self._validate("pruned")
            table = Table(title="Evaluation: dense vs pruned")
            for col in ("metric", "dense", "pruned"):
                table.add_column(col, justify="left" if col == "metric" else "right")
            for key in sorted(set(self.dense_metrics) | set(pruned)):
                table.add_row(key, _fmt(self.dense_metrics.get(key)), _fmt(pruned.get(key)))
            self.console.print(table)
            protocol = self.datamodule.protocol() if hasattr(self.datamodule, "protocol") else "-"
            self.console.print(f"protocol: {protocol}", soft_wrap=True)
        if self.trainer.is_global_zero:
            for label, path in (("pruned model", getattr(self.model.hparams, "save_dir", None)),
                                ("report", self.config[self.subcommand]["pruning"].get("report_path"))):
                if path:
                    self.console.print(f"{label} written to {path}", soft_wrap=True)

    def _validate(self, label: str) -> dict[str, float]:
        self.console.rule(f"evaluating the {label} model")
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
    return "-" if value is None else f"{value:.4g}"


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``optima`` console script."""
    OptimaCLI(pl.LightningModule, pl.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
              args=args, save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False)


if __name__ == "__main__":
    main()
