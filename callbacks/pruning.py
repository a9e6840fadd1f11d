"""``OptimaPruning``: prune a model at the start of ``trainer.fit`` with OPTIMA.

Life cycle:
- ``setup``: check the options and that the model has layers to prune (before any work);
- ``on_fit_start``: draw calibration batches from the fit's own train dataloader, walk
  the model block by block (``optima.sequential``), prune, print and save the report;
- ``on_train_batch_end``: if the fit goes on, it is sparse fine-tuning; pruned weights
  are zeroed again after every optimizer step;
- ``state_dict`` / ``load_state_dict``: masks travel in Lightning checkpoints, so a
  resumed fit keeps them and does not prune again.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from optima.config import PruneConfig
from optima.model import LayerSelection, find_blocks, linear_layers, weight_rows
from optima.report import print_report, summary, write_json
from optima.sequential import LayerRecord, PruneReport, prune_model
from optima.solver import SolverOptions


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
    wrapper around a transformers model), else the LightningModule itself. Calibration
    uses the first ``calibration_samples`` sequences of the fit's train dataloader. With
    ``resume_dir`` each finished block is checkpointed, and a rerun after an interruption
    continues from the last finished block. With ``execution_device`` (e.g. "cuda") the
    model can stay in CPU memory (Trainer on the CPU) while each block visits the device
    in turn: models larger than the device's memory prune block by block.
    """

    def __init__(self, sparsity: float | dict[str, float] | None = 0.5, default_sparsity: float | None = 0.5,
                 pattern: str = "unstructured", mask: str = "wanda", update: str = "optima",
                 calibration_samples: int = 128, sequential: bool = True, targets: list[str] | None = None, ignore: list[str] | None = None,
                 skip_attention: bool = False, damp: float = 0.01, blocksize: int = 128,
                 solver_method: str = "auto", preconditioner: str = "hinv", solver_tol: float = 1e-6,
                 solver_dtype: str = "float32", compile: bool | None = None, hessian_dtype: str = "float32",
                 report_path: str | None = None, resume_dir: str | None = None,
                 execution_device: str | None = None, progress: bool = True,
                 forward: Callable[[nn.Module, Any], Any] | None = None) -> None:
        super().__init__()
        if calibration_samples < 1:
            raise ValueError(f"calibration_samples must be >= 1, got {calibration_samples}")
        dtypes = {"float32": torch.float32, "float64": torch.float64}
        for label, value in (("solver_dtype", solver_dtype), ("hessian_dtype", hessian_dtype)):
            if value not in dtypes:
                raise ValueError(f"{label} must be 'float32' or 'float64', got {value!r}")
        solver = SolverOptions(method=solver_method, preconditioner=preconditioner, tol=solver_tol,
                               dtype=dtypes[solver_dtype], compile=compile)
        self.config = PruneConfig(sparsity=sparsity, default_sparsity=default_sparsity, pattern=pattern, mask=mask,
                                  update=update, damp=damp, blocksize=blocksize,
                                  hessian_dtype=dtypes[hessian_dtype], solver=solver)
        self.selection = LayerSelection(targets=tuple(targets or ()), ignore=tuple(ignore or ("lm_head",)),
                                        skip_attention=skip_attention)
        self.calibration_samples = calibration_samples
        self.sequential = sequential
        self.report_path = report_path
        self.resume_dir = resume_dir
        self.execution_device = execution_device
        self.progress = progress
        self.forward = forward or default_forward
        self.masks: dict[str, torch.Tensor] = {}
        self.report: PruneReport | None = None

    @property
    def pruned(self) -> bool:
        return bool(self.masks)

    # -- life cycle -------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Fail fast: find the blocks and targeted layers, check each fits its pattern, before any data is touched."""
        model = self.target_model(pl_module)
        for name, layer in linear_layers(model, self.selection).items():
            self.config.pattern_for(name).check(weight_rows(layer).shape[1])

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.pruned:  # resumed from a checkpoint that already holds the masks
            missing = set(self.masks) - set(dict(self.target_model(pl_module).named_modules()))
            if missing:
                raise KeyError(f"checkpoint masks name layers this model lacks: {sorted(missing)[:3]}")
            self.apply_masks(pl_module)
            return
        batches = self.calibration_batches(trainer)
        model = self.target_model(pl_module)
        reduce_sum = None
        if trainer.world_size > 1:  # data-parallel calibration: sum Hessians over the strategy's processes
            def reduce_sum(t: torch.Tensor) -> torch.Tensor:
                return trainer.strategy.reduce(t, reduce_op="sum")
        self.report = self.prune(model, batches, lambda b: self.forward(model, trainer.strategy.batch_to_device(b)),
                                 reduce_sum)
        self.masks = {name: keep.to(pl_module.device) for name, keep in self.report.masks.items()}
        self.publish(trainer)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.apply_masks(pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"masks": {name: keep.cpu() for name, keep in self.masks.items()}}

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

    def prune(self, model: nn.Module, batches: list[Any], run_batch: Callable[[Any], Any],
              reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None) -> PruneReport:
        """Walk the model with a progress display; restore ``use_cache`` afterwards."""
        config = getattr(model, "config", None)
        use_cache = getattr(config, "use_cache", None)
        if use_cache is not None:
            config.use_cache = False
        progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                            TimeElapsedColumn(), disable=not self.progress, transient=False)
        n_layers = len(linear_layers(model, self.selection))
        n_blocks = len(find_blocks(model)[1])
        try:
            with progress:
                blocks_task = progress.add_task("blocks", total=n_blocks)
                layers_task = progress.add_task("layers", total=n_layers)

                def on_block(i: int, n: int) -> None:
                    progress.update(blocks_task, completed=i, description=f"block {i + 1}/{n}")

                def on_layer(record: LayerRecord) -> None:
                    progress.update(layers_task, advance=1, description=f"{record.name} ({record.shape[0]} rows)")

                report = prune_model(model, batches, run_batch, self.config, self.selection, self.sequential,
                                     on_layer=on_layer, on_block=on_block, resume_dir=self.resume_dir,
                                     reduce_sum=reduce_sum, execution_device=self.execution_device)
                progress.update(blocks_task, completed=n_blocks)
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
        """Print the report, log its totals, save it as JSON when a path is set."""
        assert self.report is not None
        if trainer.is_global_zero:
            print_report(self.report, Console(width=200) if not Console().is_terminal else None)
        totals = summary(self.report)
        if trainer.logger is not None:
            trainer.logger.log_metrics({f"prune/{k}": v for k, v in totals.items() if isinstance(v, (int, float))},
                                       step=trainer.global_step)
        if self.report_path and trainer.is_global_zero:
            write_json(self.report, self.report_path, extra={"config": _describe(self.config)})


def _take(batch: Any, n: int) -> Any:
    """The first ``n`` sequences of a batch."""
    if torch.is_tensor(batch):
        return batch[:n]
    if isinstance(batch, dict):
        return {k: _take(v, n) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_take(v, n) for v in batch)
    return batch


def _describe(config: PruneConfig) -> dict[str, Any]:
    """A JSON-friendly copy of the options, for the report."""
    out = {k: v for k, v in vars(config).items() if k != "solver"}
    out["hessian_dtype"] = str(config.hessian_dtype)
    out["solver"] = {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in vars(config.solver).items()}
    return json.loads(json.dumps(out, default=str))

