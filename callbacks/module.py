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
from optima.loading import check_save_dir, load_model, load_problem, save_pretrained_atomic
from optima.zeroshot import model_context

VOCAB_PADDING = 0.9   # a tokenizer smaller than this fraction of the embedding rows is another model's


class PrunableModule(pl.LightningModule):
    """Base of ``CausalLM`` and ``SentenceEncoder``; subclasses call ``save_hyperparameters()``."""

    def __init__(self, model: str, kind: str, dtype: str, save_dir: str | None) -> None:
        super().__init__()
        self.save_dir = save_dir   # checked when a fit sets up, written when it ends; validate and test never touch it
        try:
            self.model = load_model(model, kind, dtype)
        except (OSError, ValueError, ImportError) as err:   # a missing path or package, or no checkpoint there
            raise OptionError("model.init_args.model", load_problem(model, err)) from None

    @override
    def setup(self, stage: str) -> None:
        """Fail before the work: fit's output folder (``check_save_dir_option``), then the data (``check_data``)."""
        if stage == "fit":
            check_save_dir_option(self.save_dir, self.hparams.model)
        self.check_data(self.trainer.datamodule)

    def check_data(self, datamodule: pl.LightningDataModule | None) -> None:
        """Refuse data this model cannot read: windows longer than its context (positions it never learned,
        or cannot index), or a tokenizer of another vocabulary than its embedding's."""
        hp = getattr(datamodule, "hparams", None)
        context = model_context(self.model)
        for option in ("seq_len", "calibration_len"):
            length = getattr(hp, option, None)
            if length is not None and context is not None and length > context:
                raise OptionError(f"data.init_args.{option}", f"{length} tokens is longer than the model's "
                                                              f"context of {context} tokens")
        vocab = getattr(datamodule, "vocab_size", None)
        if vocab is None:
            return
        rows = self.model.get_input_embeddings().num_embeddings
        # embeddings are often padded past the vocabulary (to a multiple of 64 or 128: up to 2% more rows)
        if not VOCAB_PADDING * rows <= vocab <= rows:
            effect = (f"ids from {rows} up would index past them" if vocab > rows else
                      "its ids would mean other tokens to this model")
            raise OptionError("data.init_args.tokenizer", f"{hp.tokenizer} has {vocab} tokens, but the model "
                                                          f"{self.hparams.model} has {rows} embedding rows: {effect}; "
                                                          "use the model's own tokenizer (for "
                                                          "--model.init_args.tokenizer too)")

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
        if self.save_dir and self.trainer.is_global_zero:
            save_pretrained_atomic(self.model, self.save_dir, self.tokenizer_spec)


def check_save_dir_option(save_dir: str | None, model: str) -> None:
    """``check_save_dir`` of fit's ``model.init_args.save_dir`` (when set) as an ``OptionError``."""
    if save_dir:
        try:
            check_save_dir(save_dir, source=model)
        except ValueError as err:
            raise OptionError("model.init_args.save_dir", str(err)) from None


def check_window_options(seq_len: int, calibration_samples: int, batch_size: int) -> None:
    """Raise ``OptionError`` for window sizes a data module cannot serve (the CLI names the option)."""
    if seq_len < 2:
        raise OptionError("data.init_args.seq_len", f"must be >= 2, got {seq_len}")
    if calibration_samples < 1:  # the CLI links it from pruning.calibration_samples
        raise OptionError("pruning.calibration_samples", f"must be >= 1, got {calibration_samples}")
    if batch_size < 1:
        raise OptionError("data.init_args.batch_size", f"must be >= 1, got {batch_size}")
