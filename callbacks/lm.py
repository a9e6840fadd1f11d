"""LightningModule and DataModule for pruning and evaluating causal language models.

``CausalLM`` wraps any transformers causal LM (hub id, local folder, llama2.c file);
its validation/test loop is the post-pruning evaluation: perplexity (torchmetrics),
sparsity of the prunable layers, and, when ``compare_dense`` is on, each block's
relative output error against a dense copy kept from before pruning.
``TextData`` serves calibration windows as the train set and evaluation windows as
the validation/test set.
"""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader
from torchmetrics.text import Perplexity
from typing_extensions import override

from optima.callbacks.module import PrunableModule, check_window_options
from optima.evaluate import block_output_errors, overall_sparsity
from optima.config import OptionError
from optima.loading import load_problem, load_tokenizer, resolve_path
from optima.text import bos_token_id, check_source, consecutive_windows, prefix_token, random_windows, read_tokens
from optima.zeroshot import (ChoiceAccuracy, ChoiceItem, batch_loglikelihoods, build_requests, collate_requests,
                             logits_to_keep, read_jsonl)


class CausalLM(PrunableModule):
    """A causal LM to prune, fine-tune and evaluate.

    Args:
        model: hub id, local checkpoint folder, or llama2.c ``.bin`` file.
        dtype: weight dtype to load ("float32", "bfloat16", ...).
        learning_rate: AdamW learning rate for sparse fine-tuning after pruning.
        compare_dense: keep a dense copy to report per-block output error in evaluation.
        save_dir: where ``save_pretrained`` writes the model after the fit (atomically).
        tokenizer: tokenizer spec saved beside the model (defaults to ``model``).
    """

    def __init__(self, model: str, dtype: str = "float32", learning_rate: float = 1e-5,
                 compare_dense: bool = False, save_dir: str | None = None, tokenizer: str | None = None) -> None:
        super().__init__(model, "causal_lm", dtype, save_dir)
        self.save_hyperparameters()
        self.dense: torch.nn.Module | None = None
        self.perplexity = torch.nn.ModuleDict()  # one torchmetrics Perplexity per evaluation text
        self.zero_shot = torch.nn.ModuleDict()   # one ChoiceAccuracy per zero-shot set
        self.block_errors: list[float] | None = None

    @override
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)

    @override
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.hparams.compare_dense and self.dense is None:
            self.dense = copy.deepcopy(self.model).eval().requires_grad_(False)

    @override
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        ids = batch["input_ids"]
        loss = self.model(input_ids=ids, labels=ids, use_cache=False).loss
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _evaluate(self, batch: dict) -> None:
        if "task" in batch:
            self._score_choices(batch)
            return
        ids = batch["input_ids"]
        key = batch.get("text", [""])[0] or "_"  # "_": the one unnamed text (ModuleDict keys cannot be empty)
        if key not in self.perplexity:
            self.perplexity[key] = Perplexity(ignore_index=-100).to(self.device)
        logits = self(ids).logits.float()
        self.perplexity[key].update(logits[:, :-1], ids[:, 1:])

    def _score_choices(self, batch: dict) -> None:
        """Zero-shot: the summed log-likelihood of each (context, ending) request of the batch."""
        name = batch["task"]
        if name not in self.zero_shot:
            self.zero_shot[name] = ChoiceAccuracy(self.trainer.datamodule.choice_items[name]).to(self.device)
        # the LM head only on the positions that score an ending
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                            logits_to_keep=logits_to_keep(batch["labels"])).logits
        self.zero_shot[name].update(batch["item"], batch["choice"], batch_loglikelihoods(logits, batch["labels"]))

    def _fresh_metrics(self) -> None:
        # a reset inside inference mode would leave inference tensors that a later
        # (no_grad) validation inside fit could not update; reset outside it
        with torch.inference_mode(False):
            for metric in [*self.perplexity.values(), *self.zero_shot.values()]:
                metric.reset()

    @override
    def on_validation_epoch_start(self) -> None:
        self._fresh_metrics()

    @override
    def on_test_epoch_start(self) -> None:
        self._fresh_metrics()

    @override
    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch)

    @override
    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch)

    @override
    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    @override
    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def _log_epoch(self, prefix: str) -> None:
        """Log every metric of the epoch: perplexity per text, sparsity, per-block errors."""
        for key, metric in self.perplexity.items():
            if metric.update_called:
                self.log(f"{prefix}/perplexity" if key == "_" else f"{prefix}/{key}_perplexity", metric.compute())
        for name, metric in self.zero_shot.items():
            if metric.update_called:
                for key, value in metric.compute().items():
                    self.log(f"{prefix}/{name}_{key}", value.float())
        self.log(f"{prefix}/sparsity", overall_sparsity(self.model))
        if self.dense is not None and self.trainer.datamodule is not None:
            loader = self.trainer.datamodule.val_dataloader()[0]
            self.dense.to(self.device)
            self.block_errors = block_output_errors(
                self.dense, self.model, [next(iter(loader))],
                lambda m, b: m(input_ids=b["input_ids"].to(self.device), use_cache=False))
            for i, err in enumerate(self.block_errors):
                self.log(f"{prefix}/block{i}_rel_error", err)


class TextData(pl.LightningDataModule):
    """Calibration windows (train) and evaluation windows (validation/test) of tokenized text.

    Args:
        tokenizer: tokenizer spec (hub id, folder, llama2.c ``tok*.bin``, ``gguf:PACKAGE``).
        calibration: local text file or ``dataset:NAME[:CONFIG]:SPLIT``.
        evaluation: text(s) for perplexity: one source, or ``{name: source}`` for several
            (logged as ``val/NAME_perplexity``); None skips perplexity.
        seq_len: tokens per window, the BOS token included when one is used.
        calibration_samples: number of random calibration windows (seeded).
        batch_size: windows per batch.
        eval_windows: cap on evaluation windows per text (None: the whole text).
        seed: seed of the calibration windows.
        bos: start every window with the tokenizer's BOS token; None (default) does so when the
            tokenizer adds a BOS to a plain encode, as the model saw text in training.
        zero_shot: ``{name: JSONL file}`` of multiple-choice items (``ctx``, ``choices``, ``label``)
            scored zero-shot as lm-eval-harness does (logged as ``val/NAME_acc`` and ``_acc_norm``).
        zero_shot_items: cap on items per zero-shot set (None: all).
        max_length: context length for zero-shot sequences (longer ones are cut from the left).
    """

    def __init__(self, tokenizer: str, calibration: str, evaluation: str | dict[str, str] | None = None,
                 seq_len: int = 128, calibration_samples: int = 128, batch_size: int = 8,
                 eval_windows: int | None = None, seed: int = 0, bos: bool | None = None,
                 zero_shot: dict[str, str] | None = None, zero_shot_items: int | None = None,
                 max_length: int = 2048) -> None:
        super().__init__()
        check_window_options(seq_len, calibration_samples, batch_size)
        texts = [("data.init_args.calibration", calibration),
                 *(("data.init_args.evaluation", source) for source in self.evaluation_sources(evaluation).values())]
        for option, source in texts:
            try:
                check_source(source)
            except FileNotFoundError as err:
                raise OptionError(option, str(err)) from None
        for source in (zero_shot or {}).values():
            check_source(source)
        self.save_hyperparameters()
        self.choice_items: dict[str, list[ChoiceItem]] = {}
        self.choice_requests: dict[str, list] = {}
        self.bos: int | None = None
        self.vocab_size: int | None = None   # the tokenizer's, checked against the model's embedding
        self.calibration_ids: torch.Tensor | None = None
        self.evaluation_ids: dict[str, torch.Tensor] = {}

    @staticmethod
    def evaluation_sources(evaluation: str | dict[str, str] | None) -> dict[str, str]:
        """``{name: source}`` of the perplexity texts; a single source has the empty name."""
        if evaluation is None:
            return {}
        return {"": evaluation} if isinstance(evaluation, str) else dict(evaluation)

    @override
    def setup(self, stage: str) -> None:
        hp = self.hparams
        if self.calibration_ids is not None:
            return
        try:
            tokenizer = load_tokenizer(hp.tokenizer)
        except (OSError, ValueError, ImportError) as err:   # a missing path or package, no tokenizer there
            raise OptionError("data.init_args.tokenizer", load_problem(hp.tokenizer, err)) from None
        self.vocab_size = len(tokenizer)
        self.bos = bos_token_id(tokenizer) if hp.bos is None else (tokenizer.bos_token_id if hp.bos else None)
        if hp.bos and self.bos is None:
            raise OptionError("data.init_args.bos", f"bos=True, but the tokenizer {hp.tokenizer} has no BOS token")
        text_len = hp.seq_len - (self.bos is not None)
        ids = read_tokens("data.init_args.calibration", hp.calibration, tokenizer, hp.seq_len, self.bos)
        self.calibration_ids = prefix_token(random_windows(ids, text_len, hp.calibration_samples, hp.seed), self.bos)
        for name, source in self.evaluation_sources(hp.evaluation).items():
            ids = read_tokens("data.init_args.evaluation", source, tokenizer, hp.seq_len, self.bos)
            self.evaluation_ids[name] = prefix_token(consecutive_windows(ids, text_len, hp.eval_windows), self.bos)
        for name, source in (hp.zero_shot or {}).items():
            self.choice_items[name] = read_jsonl(resolve_path(source))[: hp.zero_shot_items]
            # bos=None lets the tokenizer add its own special tokens, as the auto-detected windows do
            self.choice_requests[name] = build_requests(self.choice_items[name], tokenizer, hp.max_length, hp.bos)

    def protocol(self) -> str:
        """How the numbers were measured, printed beside them."""
        hp = self.hparams
        texts = ", ".join(f"{name or 'perplexity'}={source} ({len(self.evaluation_ids.get(name, ()))} windows)"
                          for name, source in self.evaluation_sources(hp.evaluation).items())
        choices = "".join(f", {name}={source} ({len(self.choice_items.get(name, ()))} items, zero-shot acc/acc_norm)"
                          for name, source in (hp.zero_shot or {}).items())
        return (f"calibration={hp.calibration} ({hp.calibration_samples} random windows, seed={hp.seed}), "
                f"{texts}{choices}, seq_len={hp.seq_len}, bos={'none' if self.bos is None else self.bos}")

    def _loader(self, windows: torch.Tensor, name: str = "") -> DataLoader:
        return DataLoader([{"input_ids": w, "text": name} for w in windows], batch_size=self.hparams.batch_size)

    @override
    def train_dataloader(self) -> DataLoader:
        return DataLoader([{"input_ids": w} for w in self.calibration_ids], batch_size=self.hparams.batch_size)

    @override
    def val_dataloader(self) -> list[DataLoader]:
        texts = [self._loader(windows, name) for name, windows in self.evaluation_ids.items()]
        choices = [DataLoader(requests, batch_size=self.hparams.batch_size,
                              collate_fn=lambda batch, name=name: {**collate_requests(batch), "task": name})
                   for name, requests in self.choice_requests.items()]
        return texts + choices

    @override
    def test_dataloader(self) -> list[DataLoader]:
        if not self.evaluation_ids and not self.choice_requests:
            raise ValueError("no evaluation configured (data.evaluation or data.zero_shot)")
        return self.val_dataloader()
