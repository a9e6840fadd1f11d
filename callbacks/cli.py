"""The ``optima`` command: LightningCLI with the pruning callback always configured.

    optima fit --config recipes/stories260k-wanda-optima.yaml      # prune (+ evaluate)
    optima validate --config ...                                   # evaluate only
    optima fit --config ... --print_config                         # the full resolved recipe

The ``pruning:`` section configures ``OptimaPruning``; ``evaluate: true`` validates
the dense model before the fit and the pruned one after it, and prints both.
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from rich.console import Console
from rich.table import Table

from callbacks.pruning import OptimaPruning


class OptimaCLI(LightningCLI):
    """LightningCLI plus a ``pruning`` section and a dense-vs-pruned evaluation around ``fit``."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(OptimaPruning, "pruning")
        parser.link_arguments("pruning.calibration_samples", "data.init_args.calibration_samples")
        parser.add_argument("--evaluate", type=bool, default=True,
                            help="validate the dense model before pruning and the pruned one after, print both")

    def _evaluation_on(self) -> bool:
        return bool(self.config[self.subcommand].get("evaluate")) and self.datamodule is not None \
            and getattr(self.datamodule.hparams, "evaluation", None) is not None

    def before_fit(self) -> None:
        self.dense_metrics = self._validate() if self._evaluation_on() else None

    def after_fit(self) -> None:
        if self.dense_metrics is None:
            return
        pruned = self._validate()
        table = Table(title="Evaluation: dense vs pruned")
        for col in ("metric", "dense", "pruned"):
            table.add_column(col, justify="left" if col == "metric" else "right")
        for key in sorted(set(self.dense_metrics) | set(pruned)):
            table.add_row(key, _fmt(self.dense_metrics.get(key)), _fmt(pruned.get(key)))
        console = Console(width=200) if not Console().is_terminal else Console()
        console.print(table)
        console.print(f"protocol: {self.datamodule.protocol() if hasattr(self.datamodule, 'protocol') else '-'}")

    def _validate(self) -> dict[str, float]:
        results = self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)
        return {k: float(v) for k, v in (results[0] if results else {}).items()}


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``optima`` console script."""
    OptimaCLI(pl.LightningModule, pl.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
              args=args, save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False)


if __name__ == "__main__":
    main()
