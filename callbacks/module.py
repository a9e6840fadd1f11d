"""What the CLI's Lightning modules share: ``PrunableModule`` and the data modules' option checks.

It holds the transformers model as ``self.model`` (the attribute ``OptimaPruning``
prunes), fine-tunes all of it with AdamW if the fit goes on after pruning, and saves it
with ``save_pretrained`` when the fit ends.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from typing_extensions import override

from optima.config import OptionError
from optima.evaluate import layer_sparsity
from optima.loading import check_save_dir, load_model, save_pretrained_atomic
from optima.zeroshot import model_context


class PrunableModule(pl.LightningModule):
    """Base of ``CausalLM`` and ``SentenceEncoder``; subclasses call ``save_hyperparameters()``."""

    def __init__(self, model: str, kind: str, dtype: str, save_dir: str | None) -> None:
        super().__init__()
        if save_dir:   # before the model loads: a bad output folder fails now, not after the work
            try:
                check_save_dir(save_dir, source=model)
            except ValueError as err:
                raise OptionError("model.init_args.save_dir", str(err)) from None
        try:
            self.model = load_model(model, kind, dtype)
        except (OSError, ValueError, ImportError) as err:   # a missing path or package, or no checkpoint there
            ours = isinstance(err, (FileNotFoundError, ImportError))   # the loader's own messages name the spec
            reason = str(err) if ours else f"cannot load {model!r}: {err}"
            raise OptionError("model.init_args.model", reason) from None

    @override
    def setup(self, stage: str) -> None:
        """Refuse windows longer than the model's context (positions it never learned, or cannot index)."""
        seq_len = getattr(getattr(self.trainer.datamodule, "hparams", None), "seq_len", None)
        context = model_context(self.model)
        if seq_len is not None and context is not None and seq_len > context:
            raise OptionError("data.init_args.seq_len", f"{seq_len} tokens is longer than the model's context "
                                                        f"of {context} tokens")

    @property
    def tokenizer_spec(self) -> str | None:
        """The tokenizer saved beside the pruned model."""
        return self.hparams.get("tokenizer") or self.hparams.model

    def layer_sparsity(self) -> dict[str, float]:
        return layer_sparsity(self.model)

    @override
    def on_train_start(self) -> None:
        self.model.train()  # from_pretrained returns eval mode; fine-tuning wants dropout back

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.model.parameters(), lr=self.hparams.learning_rate)

    @override
    def on_fit_end(self) -> None:
        if self.hparams.save_dir and self.trainer.is_global_zero:
            save_pretrained_atomic(self.model, self.hparams.save_dir, self.tokenizer_spec)


def check_window_options(seq_len: int, calibration_samples: int, batch_size: int) -> None:
    """Raise ``OptionError`` for window sizes a data module cannot serve (the CLI names the option)."""
    if seq_len < 2:
        raise OptionError("data.init_args.seq_len", f"must be >= 2, got {seq_len}")
    if calibration_samples < 1:  # the CLI links it from pruning.calibration_samples
        raise OptionError("pruning.calibration_samples", f"must be >= 1, got {calibration_samples}")
    if batch_size < 1:
        raise OptionError("data.init_args.batch_size", f"must be >= 1, got {batch_size}")
