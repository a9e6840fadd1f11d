"""``OptimaPruning``: prune a model at the start of ``trainer.fit`` with OPTIMA.

Life cycle:
- ``setup``: check the options, that the model has layers to prune and, for a fit, the output
  paths (before any work);
- ``on_fit_start``: draw calibration batches from the fit's own train dataloader, walk
  the model block by block (``optima.walk``), prune, print the report;
- ``on_fit_end``: write the JSON report, with the fit's other outputs (an interrupted fit
  leaves the previous report in place);
- ``on_train_batch_end``: if the fit goes on, it is sparse fine-tuning; pruned weights
  are zeroed again after every optimizer step;
- ``state_dict`` / ``load_state_dict``: masks travel in Lightning checkpoints, so a
  resumed fit keeps them and does not prune again.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import time
import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn
from typing_extensions import override

from optima.atomic import check_writable
from optima.config import OptionError, PruneConfig
from optima.model import find_blocks, linear_layers, weight_rows
from optima.report import PruneReport, print_report, summary, write_json
from optima.resume import ForeignCheckpoints, finished_blocks
from optima.share import RowShare
from optima.walk import RunOptions, prune_model


def _batch_size(batch: Any) -> int:
    """Number of sequences in a batch (first dimension of its first tensor)."""
    if torch.is_tensor(batch):
        return batch.shape[0]
    values = batch.values() if isinstance(batch, dict) else batch
    for v in values:
        if torch.is_tensor(v):
            return v.shape[0]
    raise TypeError(f"cannot tell the batch size of a {type(batch).__name__}")


def default_forward(model: nn.Module, batch: Any) -> Any:
    """Run a transformers-style model on a batch: dict of tensors, tensor of ids, or (ids, ...)."""
    if isinstance(batch, dict):
        return model(**{k: v for k, v in batch.items() if k != "labels"})
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


class OptimaPruning(pl.Callback):
    """Prune the targeted linear layers of the LightningModule's model when the fit starts.

    The model pruned is ``pl_module.model`` when that attribute is a module (the usual
    wrapper around a transformers model), else the LightningModule itself.

    Args:
        config: What to prune and how: sparsity, pattern, mask selector, update, damping,
            layers, solver (see ``optima.config.PruneConfig``).
        calibration_samples: Sequences drawn from the start of the fit's train dataloader
            to accumulate the Hessians (split over processes under data parallelism).
        report_path: Where to write the per-layer report as JSON when the fit ends (none: not written).
        resume_dir: Checkpoint each finished block here; a rerun after an interruption
            continues from the last finished block.
        execution_device: Keep the model where the Trainer put it (e.g. CPU memory) and run
            each block on this device (e.g. "cuda") in turn: models larger than the
            device's memory prune block by block.
        progress: Show calibration and pruning progress.
        forward: ``forward(model, batch)`` runs the model on a calibration batch (default:
            a transformers-style call on a dict of tensors, a tensor or a tuple).
    """

    def __init__(self, config: PruneConfig = PruneConfig(), calibration_samples: int = 128,
                 report_path: str | None = None, resume_dir: str | None = None,
                 execution_device: str | None = None, progress: bool = True,
                 forward: Callable[[nn.Module, Any], Any] | None = None) -> None:
        super().__init__()
        if calibration_samples < 1:
            raise OptionError("pruning.calibration_samples", f"must be >= 1, got {calibration_samples}")
        self.config = copy.deepcopy(config)
        self.calibration_samples = calibration_samples
        self.report_path = report_path
        self.run_options = RunOptions(resume_dir=resume_dir, execution_device=execution_device)
        self.progress = progress
        self.forward = forward or default_forward
        self.masks: dict[str, torch.Tensor] = {}
        self.report: PruneReport | None = None
        self.block: tuple[int, int] | None = None   # (index, count) of the block being pruned

    @property
    def pruned(self) -> bool:
        return bool(self.masks)

    @staticmethod
    def check_outputs(report_path: str | None, resume_dir: str | None) -> None:
        """Raise ``OptionError`` for a report path or resume folder that cannot be written."""
        for option, path, folder in (("pruning.report_path", report_path, False),
                                     ("pruning.resume_dir", resume_dir, True)):
            if path:
                try:
                    check_writable(path, folder)
                except ValueError as err:
                    raise OptionError(option, str(err)) from None

    # -- life cycle -------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Fail fast: find the blocks and targeted layers, check each fits its pattern, before any data is touched;
        for a fit, the output paths too (a bad one must not cost the run)."""
        if stage == "fit":
            self.check_outputs(self.report_path, self.run_options.resume_dir)
        model = self.target_model(pl_module)
        try:
            layers = linear_layers(model, self.config.selection)
        except ValueError as err:
            raise OptionError("targets", str(err)) from None
        for name, layer in layers.items():
            try:
                self.config.pattern_for(name).check(weight_rows(layer).shape[1])
            except ValueError as err:
                raise OptionError("pattern", f"{err} ({name})") from None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.pruned:  # resumed from a checkpoint that already holds the masks
            missing = set(self.masks) - set(dict(self.target_model(pl_module).named_modules()))
            if missing:
                raise KeyError(f"checkpoint masks name layers this model lacks: {sorted(missing)[:3]}")
            self.apply_masks(pl_module)
            return
        batches = self.calibration_batches(trainer)
        model = self.target_model(pl_module)
        if trainer.world_size > 1:  # data-parallel: sum Hessians over the processes, split each solve's rows
            self.run_options.reduce_sum = functools.partial(trainer.strategy.reduce, reduce_op="sum")
            self.run_options.row_share = RowShare(trainer.global_rank, trainer.world_size, trainer.strategy.all_gather)
        self.report = self.prune(model, batches, lambda b: self.forward(model, trainer.strategy.batch_to_device(b)))
        self.masks = {name: keep.to(pl_module.device) for name, keep in self.report.masks.items()}
        self.publish(trainer)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.report is not None and self.report_path and trainer.is_global_zero:
            write_json(self.report, self.report_path, extra={"config": dataclasses.asdict(self.config)})

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.apply_masks(pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"masks": {name: keep.cpu() for name, keep in self.masks.items()}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.masks = dict(state_dict.get("masks", {}))

    # -- the work ---------------------------------------------------------------------------------
    @staticmethod
    def target_model(pl_module: pl.LightningModule) -> nn.Module:
        inner = getattr(pl_module, "model", None)
        return inner if isinstance(inner, nn.Module) else pl_module

    def calibration_batches(self, trainer: pl.Trainer) -> list[Any]:
        """The first ``calibration_samples`` sequences of the fit's train dataloader.

        Under a data-parallel strategy each process takes its share from its own shard.
        """
        wanted = -(-self.calibration_samples // trainer.world_size)
        trainer.fit_loop.setup_data()
        loader = trainer.train_dataloader
        if loader is None:
            raise ValueError("OptimaPruning calibrates on the fit's train dataloader, and there is none")
        batches, seen = [], 0
        for batch in loader:
            batches.append(batch)
            seen += _batch_size(batch)
            if seen >= wanted:
                break
        if not batches:
            raise ValueError("the calibration set (train dataloader) is empty")
        if seen < wanted:
            warnings.warn(f"calibration asked for {wanted} sequences (this process), the train "
                          f"dataloader gave {seen}", UserWarning)
        elif seen > wanted:  # trim the last batch so exactly the asked number is used
            batches[-1] = _take(batches[-1], _batch_size(batches[-1]) - (seen - wanted))
        return batches

    def prune(self, model: nn.Module, batches: list[Any], run_batch: Callable[[Any], Any]) -> PruneReport:
        """Walk the model with a progress display; restore ``use_cache`` afterwards."""
        config = getattr(model, "config", None)
        use_cache = getattr(config, "use_cache", None)
        if use_cache is not None:
            config.use_cache = False
        progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                            TimeElapsedColumn(), disable=not self.progress, transient=False)
        n_blocks = len(find_blocks(model)[1])
        plain = self.progress and not progress.console.is_terminal   # a log file or pipe: a line per block instead
        start = time.perf_counter()

        def on_block(i: int, n: int) -> None:
            self.block = (i, n)
            resume_dir = self.run_options.resume_dir
            done = finished_blocks(resume_dir) if i == 0 and resume_dir else 0
            if done:   # the walk has checked that they are this run's blocks
                finished = "block 1 of 1 was" if n == 1 else f"all {n} blocks were" if done >= n else \
                    f"block 1 of {n} was" if done == 1 else f"blocks 1-{done} of {n} were"
                progress.console.print(f"resuming from {resume_dir}: {finished} pruned by an earlier run" + (
                    f", continuing at block {done + 1}" if done < n else ""), soft_wrap=True)
            progress.update(blocks, completed=i, description=f"pruning block {i + 1}/{n}")
            if plain:
                progress.console.print(f"pruning block {i + 1}/{n} ({time.perf_counter() - start:.0f} s)")

        try:
            with progress:
                blocks = progress.add_task("pruning", total=n_blocks)
                layers = progress.add_task("layers", total=len(linear_layers(model, self.config.selection)))
                self.run_options.on_block = on_block
                self.run_options.on_layer = lambda record: progress.update(
                    layers, advance=1, description=f"{record.name} ({record.shape[0]} rows)")
                report = prune_model(model, batches, run_batch, self.config, self.run_options)
                progress.update(blocks, completed=n_blocks)
        except ForeignCheckpoints as err:
            raise OptionError("pruning.resume_dir", str(err)) from None
        finally:
            if use_cache is not None:
                config.use_cache = use_cache
        return report

    @torch.no_grad()
    def apply_masks(self, pl_module: pl.LightningModule) -> None:
        """Zero every pruned weight (after an optimizer step, or after loading a checkpoint)."""
        layers = dict(self.target_model(pl_module).named_modules())
        for name, keep in self.masks.items():
            weight = weight_rows(layers[name])
            weight.mul_(keep.to(device=weight.device, dtype=weight.dtype))

    def publish(self, trainer: pl.Trainer) -> None:
        """Print the report and log its totals (``on_fit_end`` writes it)."""
        assert self.report is not None
        if trainer.is_global_zero:
            print_report(self.report, Console(width=200) if not Console().is_terminal else None)
        totals = summary(self.report)
        if trainer.logger is not None:
            trainer.logger.log_metrics({f"prune/{k}": v for k, v in totals.items() if isinstance(v, (int, float))},
                                       step=trainer.global_step)


def _take(batch: Any, n: int) -> Any:
    """The first ``n`` sequences of a batch."""
    if torch.is_tensor(batch):
        return batch[:n]
    if isinstance(batch, dict):
        return {k: _take(v, n) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_take(v, n) for v in batch)
    return batch
