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
from collections.abc import Callable

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader
from torchmetrics.text import Perplexity
from typing_extensions import override

from optima.callbacks.module import PrunableModule, check_window_options
from optima.evaluate import block_output_errors, overall_sparsity
from optima.config import OptionError
from optima.loading import load_problem, load_tokenizer
from optima.text import bos_token_id, check_source, consecutive_windows, prefix_token, random_windows, read_tokens
from optima.tasks import TASKS, read_task
from optima.zeroshot import evaluate_suite, suite_mean


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
        self.zero_shot: dict[str, dict] | None = None   # the last evaluation's evaluate_suite results
        self.zero_shot_progress: Callable[[str, int, int], None] | None = None   # set by the CLI to show progress
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
        ids = batch["input_ids"]
        key = batch.get("text", [""])[0] or "_"  # "_": the one unnamed text (ModuleDict keys cannot be empty)
        if key not in self.perplexity:
            self.perplexity[key] = Perplexity(ignore_index=-100).to(self.device)
        logits = self(ids).logits.float()
        self.perplexity[key].update(logits[:, :-1], ids[:, 1:])

    def _fresh_metrics(self) -> None:
        # a reset inside inference mode would leave inference tensors that a later
        # (no_grad) validation inside fit could not update; reset outside it
        with torch.inference_mode(False):
            for metric in self.perplexity.values():
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
        """Log every metric of the epoch: perplexity per text, the zero-shot suite, sparsity, per-block errors."""
        for key, metric in self.perplexity.items():
            if metric.update_called:
                self.log(f"{prefix}/perplexity" if key == "_" else f"{prefix}/{key}_perplexity", metric.compute())
        data = self.trainer.datamodule
        if getattr(data, "zero_shot_tasks", None):
            self._log_zero_shot(prefix, data)
        self.log(f"{prefix}/sparsity", overall_sparsity(self.model))
        if self.dense is not None and self.trainer.datamodule is not None:
            loader = self.trainer.datamodule.val_dataloader()[0]
            self.dense.to(self.device)
            self.block_errors = block_output_errors(
                self.dense, self.model, [next(iter(loader))],
                lambda m, b: m(input_ids=b["input_ids"].to(self.device), use_cache=False))
            for i, err in enumerate(self.block_errors):
                self.log(f"{prefix}/block{i}_rel_error", err)

    def _log_zero_shot(self, prefix: str, data: TextData) -> None:
        """The zero-shot suite on the model as it is now (every process scores all of it), logged per task
        as ``NAME_METRIC`` and ``NAME_METRIC_stderr``, and its mean as ``zero_shot_mean``."""
        hp = data.hparams
        self.zero_shot = evaluate_suite(self.model, data.tokenizer, data.zero_shot_tasks, limit=hp.zero_shot_items,
                                        batch_size=hp.zero_shot_batch_size, bos=hp.bos, max_length=hp.max_length,
                                        progress=self.zero_shot_progress)
        for name, result in self.zero_shot.items():
            for metric in TASKS[name].metrics:
                self.log(f"{prefix}/{name}_{metric}", result[metric])
                self.log(f"{prefix}/{name}_{metric}_stderr", result[f"{metric}_stderr"])
        mean, stderr = suite_mean(self.zero_shot)
        self.log(f"{prefix}/zero_shot_mean", mean)
        self.log(f"{prefix}/zero_shot_mean_stderr", stderr)


class TextData(pl.LightningDataModule):
    """Calibration windows (train) and evaluation windows (validation/test) of tokenized text.

    Args:
        tokenizer: tokenizer spec (hub id, folder, llama2.c ``tok*.bin``, ``gguf:PACKAGE``).
        calibration: local text file or ``dataset:NAME[:CONFIG]:SPLIT``.
        evaluation: text(s) for perplexity: one source, or ``{name: source}`` for several
            (logged as ``val/NAME_perplexity``); None skips perplexity.
        seq_len: tokens per window, the BOS token included when one is used.
        calibration_len: tokens per calibration window (None: ``seq_len``); a longer one buys
            Hessians from more tokens (the OPTIMA paper calibrates on 128 x 2048) at the cost of
            calibration time, while the evaluation windows stay ``seq_len`` long.
        calibration_samples: number of random calibration windows (seeded).
        batch_size: windows per batch.
        eval_windows: cap on evaluation windows per text (None: the whole text).
        seed: seed of the calibration windows.
        bos: start every window with the tokenizer's BOS token; None (default) does so when the
            tokenizer adds a BOS to a plain encode, as the model saw text in training.
        zero_shot: ``{lm-eval task: JSONL file in its hub row schema}`` (tasks of ``optima.tasks``,
            e.g. the paper's suite ``optima.tasks.PAPER_SUITE``), scored zero-shot as lm-eval-harness
            does after each validation (logged as ``val/TASK_acc``, ``_acc_norm``, their ``_stderr``
            and ``val/zero_shot_mean``).
        zero_shot_items: the first N items of each task, as lm-eval's ``--limit`` (None: all).
        zero_shot_batch_size: sequences per zero-shot forward pass.
        max_length: context length for zero-shot sequences (longer ones are cut from the left).
    """

    def __init__(self, tokenizer: str, calibration: str, evaluation: str | dict[str, str] | None = None,
                 seq_len: int = 128, calibration_samples: int = 128, batch_size: int = 8,
                 eval_windows: int | None = None, seed: int = 0, bos: bool | None = None,
                 zero_shot: dict[str, str] | None = None, zero_shot_items: int | None = None,
                 zero_shot_batch_size: int = 128, max_length: int = 2048,
                 calibration_len: int | None = None) -> None:
        super().__init__()
        check_window_options(seq_len, calibration_samples, batch_size)
        if calibration_len is not None and calibration_len < 2:
            raise OptionError("data.init_args.calibration_len", f"must be >= 2, got {calibration_len}")
        texts = [("data.init_args.calibration", calibration),
                 *(("data.init_args.evaluation", source) for source in self.evaluation_sources(evaluation).values())]
        for option, source in texts:
            try:
                check_source(source)
            except FileNotFoundError as err:
                raise OptionError(option, str(err)) from None
        for name, source in (zero_shot or {}).items():
            if name not in TASKS:
                raise OptionError("data.init_args.zero_shot", f"unknown task {name!r}; known: {', '.join(TASKS)}")
            try:
                check_source(source)
            except FileNotFoundError as err:
                raise OptionError("data.init_args.zero_shot", f"{name}: {err}") from None
        if zero_shot_items is not None and zero_shot_items < 1:
            raise OptionError("data.init_args.zero_shot_items", f"must be >= 1, got {zero_shot_items}")
        if zero_shot_batch_size < 1:
            raise OptionError("data.init_args.zero_shot_batch_size", f"must be >= 1, got {zero_shot_batch_size}")
        self.save_hyperparameters()
        self.zero_shot_tasks: dict[str, str] = dict(zero_shot or {})
        self.tokenizer = None   # loaded in setup; the zero-shot suite tokenizes with it
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
        self.vocab_size, self.tokenizer = len(tokenizer), tokenizer
        self.bos = bos_token_id(tokenizer) if hp.bos is None else (tokenizer.bos_token_id if hp.bos else None)
        if hp.bos and self.bos is None:
            raise OptionError("data.init_args.bos", f"bos=True, but the tokenizer {hp.tokenizer} has no BOS token")
        text_len = hp.seq_len - (self.bos is not None)
        calibration_len = self.calibration_len
        ids = read_tokens("data.init_args.calibration", hp.calibration, tokenizer, calibration_len, self.bos)
        self.calibration_ids = prefix_token(random_windows(ids, calibration_len - (self.bos is not None),
                                                           hp.calibration_samples, hp.seed), self.bos)
        for name, source in self.evaluation_sources(hp.evaluation).items():
            ids = read_tokens("data.init_args.evaluation", source, tokenizer, hp.seq_len, self.bos)
            self.evaluation_ids[name] = prefix_token(consecutive_windows(ids, text_len, hp.eval_windows), self.bos)
        for name, source in self.zero_shot_tasks.items():   # a file in another schema fails now, not after pruning
            try:
                read_task(name, source, hp.zero_shot_items)
            except ValueError as err:
                raise OptionError("data.init_args.zero_shot", str(err)) from None

    @property
    def calibration_len(self) -> int:
        """Tokens per calibration window."""
        return self.hparams.calibration_len or self.hparams.seq_len

    def protocol(self) -> str:
        """How the numbers were measured, printed beside them."""
        hp = self.hparams
        texts = ", ".join(f"{name or 'perplexity'}={source} ({len(self.evaluation_ids.get(name, ()))} windows)"
                          for name, source in self.evaluation_sources(hp.evaluation).items())
        limit = "all" if hp.zero_shot_items is None else f"first {hp.zero_shot_items}"
        choices = "".join(f", {name}={source} ({limit} items, zero-shot {'/'.join(TASKS[name].metrics)})"
                          for name, source in self.zero_shot_tasks.items())
        if self.zero_shot_tasks:
            choices += (", zero-shot mean of " + ", ".join(f"{n} {TASKS[n].metric}" for n in self.zero_shot_tasks)
                        + " (MMLU has no offline copy)")
        length = "" if self.calibration_len == hp.seq_len else f" of {self.calibration_len} tokens"
        return (f"calibration={hp.calibration} ({hp.calibration_samples} random windows{length}, seed={hp.seed}), "
                f"{texts}{choices}, seq_len={hp.seq_len}, bos={'none' if self.bos is None else self.bos}")

    def _loader(self, windows: torch.Tensor, name: str = "") -> DataLoader:
        return DataLoader([{"input_ids": w, "text": name} for w in windows], batch_size=self.hparams.batch_size)

    @override
    def train_dataloader(self) -> DataLoader:
        return DataLoader([{"input_ids": w} for w in self.calibration_ids], batch_size=self.hparams.batch_size)

    @override
    def val_dataloader(self) -> list[DataLoader]:
        return [self._loader(windows, name) for name, windows in self.evaluation_ids.items()]

    @override
    def test_dataloader(self) -> list[DataLoader]:
        if not self.evaluation_ids:
            raise ValueError("no evaluation text configured (data.evaluation); the zero-shot suite runs after it")
        return self.val_dataloader()
