"""Zero-shot multiple-choice evaluation (HellaSwag-style) of causal LMs on local JSONL items.

Each item is a context and a few endings; the model's answer is the ending with the highest
summed log-likelihood (``acc``) or the highest log-likelihood per character of the ending
(``acc_norm``). Tokenization, the context/ending split, left truncation and the two metrics
follow lm-eval-harness's ``HFLM.loglikelihood`` for causal LMs, so the numbers equal its
numbers for a task with ``target_delimiter: ""`` on the same items (``tests/test_zeroshot.py``
checks this), without lm-eval installed.

The pieces compose with a DataLoader so a LightningModule can score in its validation loop:
:func:`build_requests` (items -> one request per ending, sorted longest first),
:func:`collate_requests` (requests -> right-padded tensors), :func:`batch_loglikelihoods`
(logits -> one log-likelihood per request; :func:`logits_to_keep` lets the model skip the LM
head on context positions) and :class:`ChoiceAccuracy` (a torchmetrics metric whose state sums
across processes). :func:`evaluate_choices` runs them all on a plain model.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchmetrics import Metric

IGNORE = -100  # label of positions that are not scored
_UNSET_MAX_LENGTH = int(1e30)  # transformers' model_max_length when a tokenizer sets none
_DEFAULT_MAX_LENGTH = 2048  # lm-eval's fallback when neither config nor tokenizer gives one


@dataclass(frozen=True)
class ChoiceItem:
    """A context, its candidate endings (text appended verbatim, leading space included) and the right one."""

    context: str
    choices: tuple[str, ...]
    label: int

    def __post_init__(self) -> None:
        if not isinstance(self.context, str):
            raise ValueError(f"ctx must be a string, got {type(self.context).__name__}")
        if not self.choices or not all(isinstance(c, str) and c for c in self.choices):
            raise ValueError("choices must be a non-empty list of non-empty strings")
        if isinstance(self.label, bool) or not isinstance(self.label, int) or not 0 <= self.label < len(self.choices):
            raise ValueError(f"label must be an integer index into the {len(self.choices)} choices, got {self.label!r}")


def read_jsonl(path: str | Path) -> list[ChoiceItem]:
    """Items of a JSONL file, one ``{"ctx": str, "choices": [str, ...], "label": int}`` per line.

    Blank lines are skipped; a malformed line raises ValueError naming the file and line number.
    """
    items = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("expected a JSON object")
                missing = {"ctx", "choices", "label"} - record.keys()
                if missing:
                    raise ValueError(f"missing field(s) {sorted(missing)}")
                if not isinstance(record["choices"], list):
                    raise ValueError("choices must be a list of strings")
                items.append(ChoiceItem(record["ctx"], tuple(record["choices"]), record["label"]))
            except ValueError as error:  # json.JSONDecodeError is a ValueError
                raise ValueError(f"{path}:{number}: malformed item: {error}") from None
    if not items:
        raise ValueError(f"{path}: no items")
    return items


def model_context(model: nn.Module) -> int | None:
    """The model's context length from its config: ``n_positions`` / ``max_position_embeddings`` /
    ``n_ctx`` (None when it has none)."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    for attribute in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attribute, None)
        if value is not None:
            return int(value)
    return None


def resolve_max_length(model: nn.Module, tokenizer) -> int:
    """The context length lm-eval assumes: :func:`model_context`, else the tokenizer's
    ``model_max_length``, else 2048."""
    context = model_context(model)
    if context is not None:
        return context
    value = getattr(tokenizer, "model_max_length", None)
    return int(value) if value is not None and value < _UNSET_MAX_LENGTH else _DEFAULT_MAX_LENGTH


def _prefix(tokenizer, bos: bool | int | None) -> int | None:
    if isinstance(bos, int) and not isinstance(bos, bool):
        return bos
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def prefix_token_id(tokenizer, bos: bool | int | None = None) -> int:
    """The token that stands for an empty context and that ``bos=True`` prepends: an explicit id,
    else the tokenizer's BOS, else its EOS (lm-eval's ``prefix_token_id``)."""
    token = _prefix(tokenizer, bos)
    if token is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token; pass bos as a token id")
    return token


def encode(tokenizer, text: str, bos: bool | int | None = None) -> list[int]:
    """Token ids of ``text``.

    ``bos=None`` adds the tokenizer's own special tokens (lm-eval's default); ``False`` adds none;
    ``True`` (the BOS, else EOS token) or a token id prepends that token instead of the special
    tokens. As in lm-eval, a text that already starts with the prefix token's string gets nothing added.
    """
    prefix = _prefix(tokenizer, bos)
    if prefix is not None and text.startswith(tokenizer.decode(prefix)):
        return tokenizer.encode(text, add_special_tokens=False)
    if bos is None:
        return tokenizer.encode(text)
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids if bos is False else [prefix_token_id(tokenizer, bos), *ids]


def encode_pair(tokenizer, context: str, continuation: str,
                bos: bool | int | None = None) -> tuple[list[int], list[int]]:
    """Context and continuation token ids, split as lm-eval does for causal LMs.

    Trailing whitespace of the context moves to the continuation; the continuation is what
    encoding the whole text adds beyond the context's own encoding. An empty context becomes
    the prefix token alone (:func:`prefix_token_id`).
    """
    if context == "":
        continuation_ids = tokenizer.encode(continuation, add_special_tokens=False)
        prefix = prefix_token_id(tokenizer, bos)
        if continuation_ids and continuation_ids[0] == prefix:
            return continuation_ids[:1], continuation_ids[1:]
        return [prefix], continuation_ids
    stripped = context.rstrip()
    if not stripped:
        raise ValueError(f"context {context!r} is only whitespace")
    continuation = context[len(stripped):] + continuation
    context_ids = encode(tokenizer, stripped, bos)
    whole = encode(tokenizer, stripped + continuation, bos)
    return context_ids, whole[len(context_ids):]


@dataclass(frozen=True)
class Request:
    """One (item, ending) sequence to score: the tokens (context + ending, left-truncated to at most
    ``max_length + 1``) whose last ``continuation`` tokens are the scored ending."""

    item: int
    choice: int
    tokens: tuple[int, ...]
    continuation: int


def build_requests(items: Sequence[ChoiceItem], tokenizer, max_length: int,
                   bos: bool | int | None = None) -> list[Request]:
    """One request per (item, ending), longest first (as lm-eval orders them) so batches pad little."""
    requests = []
    for i, item in enumerate(items):
        for c, choice in enumerate(item.choices):
            context_ids, continuation_ids = encode_pair(tokenizer, item.context, choice, bos)
            if not context_ids or not continuation_ids:
                raise ValueError(f"item {i} choice {c}: the context or the ending encodes to no tokens")
            if len(continuation_ids) > max_length:
                raise ValueError(f"item {i} choice {c}: the ending has {len(continuation_ids)} tokens, "
                                 f"more than the model's {max_length}")
            tokens = (context_ids + continuation_ids)[-(max_length + 1):]
            requests.append(Request(i, c, tuple(tokens), len(continuation_ids)))
    return sorted(requests, key=lambda r: -len(r.tokens))


def collate_requests(requests: Sequence[Request], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded batch: ``input_ids`` and ``attention_mask`` to feed the model, ``labels`` (the
    next token at each scored position, else -100) and the ``item`` / ``choice`` indices.
    Usable as a DataLoader ``collate_fn`` over a list of requests."""
    length = max(len(r.tokens) for r in requests) - 1
    input_ids = torch.full((len(requests), length), pad_id, dtype=torch.long)
    labels = torch.full((len(requests), length), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(requests), length), dtype=torch.long)
    for row, r in enumerate(requests):
        n = len(r.tokens) - 1
        input_ids[row, :n] = torch.tensor(r.tokens[:-1])
        attention_mask[row, :n] = 1
        labels[row, n - r.continuation:n] = torch.tensor(r.tokens[-r.continuation:])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "item": torch.tensor([r.item for r in requests]), "choice": torch.tensor([r.choice for r in requests])}


def batch_loglikelihoods(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of each row's labelled tokens, shape (batch,), float32.

    ``logits`` may cover only the last positions (e.g. from ``logits_to_keep``); the labels are
    aligned to them from the right. Only the scored positions go through the log-softmax.
    """
    labels = labels[:, labels.shape[1] - logits.shape[1]:]
    scored = labels != IGNORE
    log_probs = logits[scored].float().log_softmax(-1)
    picked = log_probs.gather(-1, labels[scored].unsqueeze(-1)).squeeze(-1)
    rows = scored.nonzero()[:, 0]
    return torch.zeros(labels.shape[0], dtype=torch.float32, device=logits.device).index_add_(0, rows, picked)


def logits_to_keep(labels: torch.Tensor) -> int:
    """How many trailing positions of a batch hold all its scored ones: pass it as a transformers
    causal LM's ``logits_to_keep`` to skip the LM head (large for big vocabularies) on the context."""
    return labels.shape[1] - int((labels != IGNORE).any(dim=0).nonzero()[0])


class ChoiceAccuracy(Metric):
    """``acc`` and ``acc_norm`` over a fixed list of items, fed per-request log-likelihoods.

    The state is a (items x choices) table of summed log-likelihoods and counts, reduced by sum
    across processes; a request scored twice (a DistributedSampler pads with repeats) counts once.
    ``compute`` returns ``{"acc": ..., "acc_norm": ...}`` over the items whose endings were all
    scored (NaN when none were), ties going to the first ending as in lm-eval.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, items: Sequence[ChoiceItem], **kwargs) -> None:
        super().__init__(**kwargs)
        if not items:
            raise ValueError("no items")
        width = max(len(item.choices) for item in items)
        lengths = torch.full((len(items), width), float("nan"))
        for i, item in enumerate(items):
            lengths[i, :len(item.choices)] = torch.tensor([float(len(c)) for c in item.choices])
        self.register_buffer("lengths", lengths, persistent=False)
        self.register_buffer("labels", torch.tensor([item.label for item in items]), persistent=False)
        self.add_state("loglik", torch.zeros(len(items), width), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(len(items), width), dist_reduce_fx="sum")

    def update(self, item: torch.Tensor, choice: torch.Tensor, loglik: torch.Tensor) -> None:
        index = (item.to(self.loglik.device), choice.to(self.loglik.device))
        self.loglik.index_put_(index, loglik.to(self.loglik), accumulate=True)
        self.count.index_put_(index, torch.ones_like(self.count[index]), accumulate=True)

    def compute(self) -> dict[str, torch.Tensor]:
        exists = ~self.lengths.isnan()
        complete = ((self.count > 0) | ~exists).all(dim=1)
        loglik = (self.loglik / self.count.clamp_min(1)).masked_fill(~exists, float("-inf"))[complete]
        lengths, labels = self.lengths.nan_to_num(1.0)[complete], self.labels[complete]
        n = len(labels)

        def fraction(hits: torch.Tensor) -> torch.Tensor:  # exact hits / n, as a float64 CPU scalar
            return torch.tensor(int(hits.sum()) / n if n else float("nan"), dtype=torch.float64)

        return {"acc": fraction(loglik.argmax(dim=1) == labels),
                "acc_norm": fraction((loglik / lengths).argmax(dim=1) == labels)}

    def item_loglikelihoods(self) -> list[list[float]]:
        """Per item, the log-likelihood of each ending (NaN where not scored), from this process's state."""
        loglik = (self.loglik / self.count).tolist()  # 0/0 = NaN for unscored endings
        return [row[:len(row) - int(self.lengths[i].isnan().sum())] for i, row in enumerate(loglik)]


def _as_items(items: Sequence[ChoiceItem] | str | Path) -> Sequence[ChoiceItem]:
    return read_jsonl(items) if isinstance(items, (str, Path)) else items


@torch.no_grad()
def _score(model: nn.Module, tokenizer, items: Sequence[ChoiceItem], batch_size: int,
           bos: bool | int | None, max_length: int | None) -> ChoiceAccuracy:
    """Forward every request in batches (model in eval mode for the duration) and fill a metric."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    requests = build_requests(items, tokenizer, max_length or resolve_max_length(model, tokenizer), bos)
    device = next(model.parameters()).device
    metric = ChoiceAccuracy(items).to(device)
    trims_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(requests), batch_size):
            batch = {k: v.to(device) for k, v in collate_requests(requests[start:start + batch_size]).items()}
            extra = {"logits_to_keep": logits_to_keep(batch["labels"])} if trims_logits else {}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                           **extra).logits
            metric.update(batch["item"], batch["choice"], batch_loglikelihoods(logits, batch["labels"]))
    finally:
        model.train(was_training)
    return metric


def score_choices(model: nn.Module, tokenizer, items: Sequence[ChoiceItem] | str | Path, batch_size: int = 16,
                  bos: bool | int | None = None, max_length: int | None = None) -> list[list[float]]:
    """Per item, the summed log-likelihood of each ending given the context (see :func:`evaluate_choices`)."""
    items = _as_items(items)
    return _score(model, tokenizer, items, batch_size, bos, max_length).item_loglikelihoods()


def evaluate_choices(model: nn.Module, tokenizer, items: Sequence[ChoiceItem] | str | Path, batch_size: int = 16,
                     bos: bool | int | None = None, max_length: int | None = None) -> dict[str, float]:
    """``{"acc": ..., "acc_norm": ...}`` of a causal LM on multiple-choice items (or a JSONL path).

    One forward per (context + ending), longest first, ``batch_size`` sequences right-padded per
    forward. ``bos``: see :func:`encode` (None: the tokenizer's special tokens, as lm-eval);
    ``max_length``: context length for left truncation (None: :func:`resolve_max_length`).
    """
    items = _as_items(items)
    metric = _score(model, tokenizer, items, batch_size, bos, max_length)
    return {name: float(value) for name, value in metric.compute().items()}
