"""Zero-shot multiple-choice scoring of causal LMs, as lm-eval-harness scores it, and the suite entry point.

An item (:class:`~optima.tasks.ChoiceItem`) is a (context, continuation) pair per choice; the answer
is the choice with the highest summed log-likelihood of its continuation (``acc``) or the highest
per character (``acc_norm``). Tokenization, the context/continuation split, left truncation and the
two metrics follow lm-eval's ``HFLM.loglikelihood`` for causal LMs.

:func:`evaluate_suite` scores lm-eval tasks read from local files (:mod:`optima.tasks`) with standard
errors and per-item hits; :func:`suite_mean` and :func:`suite_difference` give the suite's mean and
paired differences. A transformers causal LM runs each item as a tree (:class:`ItemTree`: the shared
prefix once, every choice's rest beside it, a 4D attention mask keeping the branches apart), several
items packed into one unpadded sequence, with the LM head only where a choice is scored; other
models run every (context + continuation) whole. The lower-level pieces (:func:`build_requests`,
:func:`collate_requests`, :func:`batch_loglikelihoods`, :class:`ChoiceAccuracy`) serve both paths.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchmetrics import Metric

from optima.stats import combined_mean, mean_stderr, paired_difference
from optima.tasks import PAPER_SUITE, ChoiceItem, read_jsonl, read_task, task

IGNORE = -100  # label of positions that are not scored
_UNSET_MAX_LENGTH = int(1e30)  # transformers' model_max_length when a tokenizer sets none
_DEFAULT_MAX_LENGTH = 2048  # lm-eval's fallback when neither config nor tokenizer gives one


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
        for c, (context, continuation) in enumerate(item.pairs):
            context_ids, continuation_ids = encode_pair(tokenizer, context, continuation, bos)
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
    aligned to them from the right. Each position's log-probability is its label's logit minus the
    log-sum-exp of its row, so no log-softmax over the vocabulary is written out.
    """
    labels = labels[:, labels.shape[1] - logits.shape[1]:]
    scored = labels != IGNORE
    logits = logits.float()
    picked = logits.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    return picked.masked_fill(~scored, 0.0).sum(dim=1)


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
        width = max(len(item.pairs) for item in items)
        lengths = torch.full((len(items), width), float("nan"))
        for i, item in enumerate(items):
            lengths[i, :len(item.pairs)] = torch.tensor([float(n) for n in item.lengths])
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

        return {name: fraction(hits) for name, hits in self._hits(loglik, lengths, labels).items()}

    @staticmethod
    def _hits(loglik: torch.Tensor, lengths: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per item, whether the most likely choice (``acc``) and the most likely per character
        (``acc_norm``) is the right one; ties go to the first choice, as numpy's argmax in lm-eval."""
        per_character = loglik.double() / lengths.double()   # lm-eval divides float64 values
        return {"acc": loglik.argmax(dim=1) == labels, "acc_norm": per_character.argmax(dim=1) == labels}

    def item_hits(self) -> dict[str, list[int]]:
        """Per item (all of them scored), 1 where ``acc`` / ``acc_norm`` picked the right choice, else 0."""
        if not bool(((self.count > 0) | self.lengths.isnan()).all()):
            raise ValueError("some items were not scored")
        loglik = (self.loglik / self.count.clamp_min(1)).masked_fill(self.lengths.isnan(), float("-inf"))
        hits = self._hits(loglik, self.lengths.nan_to_num(1.0), self.labels)
        return {name: h.int().tolist() for name, h in hits.items()}

    def item_loglikelihoods(self) -> list[list[float]]:
        """Per item, the log-likelihood of each ending (NaN where not scored), from this process's state."""
        loglik = (self.loglik / self.count).tolist()  # 0/0 = NaN for unscored endings
        return [row[:len(row) - int(self.lengths[i].isnan().sum())] for i, row in enumerate(loglik)]


def _as_items(items: Sequence[ChoiceItem] | str | Path) -> Sequence[ChoiceItem]:
    return read_jsonl(items) if isinstance(items, (str, Path)) else items


def shared_prefix(requests: Sequence[Request]) -> int:
    """How many input tokens all of an item's requests start with, up to the first scored position:
    the part a forward pass can run once for all of its choices."""
    inputs = [r.tokens[:-1] for r in requests]
    limit = min(len(r.tokens) - 1 - r.continuation for r in requests)
    length = 0
    while length < limit and all(x[length] == inputs[0][length] for x in inputs[1:]):
        length += 1
    return length


@dataclass(frozen=True)
class ItemTree:
    """One item laid out for a packed forward pass: its shared prefix once, then each choice's remaining
    input tokens. A choice's tokens continue the prefix's positions and see only the prefix and
    themselves, so each scored position gets the logits of its own (context + ending)."""

    tokens: tuple[int, ...]
    positions: tuple[int, ...]
    branch: tuple[int, ...]    # 0 on the prefix, k + 1 on the k-th choice's tokens
    labels: tuple[int, ...]    # the next token where a choice is scored, else IGNORE
    requests: tuple[Request, ...]
    owner: tuple[int, ...]     # at each scored position, the index in ``requests`` it adds to; -1 elsewhere


def item_tree(requests: Sequence[Request]) -> ItemTree:
    """The requests of one item as a tree: :func:`shared_prefix` once, then each request's rest."""
    n = shared_prefix(requests)
    tokens, positions = list(requests[0].tokens[:n]), list(range(n))
    branch, labels, owner = [0] * n, [IGNORE] * n, [-1] * n
    for k, r in enumerate(requests):
        rest = r.tokens[n:-1]
        unscored = len(rest) - r.continuation
        tokens += rest
        positions += range(n, n + len(rest))
        branch += [k + 1] * len(rest)
        labels += [IGNORE] * unscored + list(r.tokens[-r.continuation:])
        owner += [-1] * unscored + [k] * r.continuation
    return ItemTree(tuple(tokens), tuple(positions), tuple(branch), tuple(labels), tuple(requests), tuple(owner))


def item_trees(requests: Sequence[Request]) -> list[ItemTree]:
    """One :class:`ItemTree` per item, longest first (so that packing leaves little room unused)."""
    by_item: dict[int, list[Request]] = {}
    for r in requests:
        by_item.setdefault(r.item, []).append(r)
    return sorted((item_tree(rs) for rs in by_item.values()), key=lambda tree: -len(tree.tokens))


def pack_trees(trees: Sequence[ItemTree], tokens: int, requests: int) -> list[list[ItemTree]]:
    """Consecutive trees in packs of at most ``tokens`` tokens and ``requests`` requests (a tree larger
    than that is a pack of its own)."""
    packs: list[list[ItemTree]] = []
    size = count = 0
    for tree in trees:
        if packs and size + len(tree.tokens) <= tokens and count + len(tree.requests) <= requests:
            packs[-1].append(tree)
            size, count = size + len(tree.tokens), count + len(tree.requests)
        else:
            packs.append([tree])
            size, count = len(tree.tokens), len(tree.requests)
    return packs


def packed_inputs(trees: Sequence[ItemTree], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One sequence holding ``trees`` side by side: ``input_ids``, ``position_ids`` and a 4D additive
    ``attention_mask`` (0 where a token may attend, the dtype's minimum elsewhere: the same tree, not
    later, and the prefix or the token's own branch), plus ``labels`` and ``owner`` (a request's index
    in the pack, in the order of the trees' requests, at each scored position)."""
    offsets = [0]
    for tree in trees[:-1]:
        offsets.append(offsets[-1] + len(tree.requests))

    def joined(field: str) -> torch.Tensor:
        return torch.tensor([v for tree in trees for v in getattr(tree, field)], dtype=torch.long)

    tree_of = torch.cat([torch.full((len(tree.tokens),), i) for i, tree in enumerate(trees)])
    owner = torch.tensor([o + first if o >= 0 else -1 for tree, first in zip(trees, offsets) for o in tree.owner])
    branch, order = joined("branch"), torch.arange(len(tree_of))
    allowed = ((tree_of[:, None] == tree_of[None]) & (order[None] <= order[:, None])
               & ((branch[None] == 0) | (branch[None] == branch[:, None])))
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    return {"input_ids": joined("tokens")[None], "position_ids": joined("positions")[None],
            "attention_mask": mask[None, None], "labels": joined("labels"), "owner": owner}


def _forward_packed(model: nn.Module, trees: Sequence[ItemTree], device: torch.device) -> torch.Tensor:
    """The summed log-likelihood of every request of ``trees`` (in order), from one forward pass of
    the packed trees with the LM head run only on the scored positions."""
    dtype = next(model.parameters()).dtype
    packed = {k: v.to(device) for k, v in packed_inputs(trees, dtype).items()}
    scored = (packed["labels"] != IGNORE).nonzero().squeeze(1)
    logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                   attention_mask=packed["attention_mask"], use_cache=False, logits_to_keep=scored).logits[0]
    per_token = batch_loglikelihoods(logits[:, None], packed["labels"][scored, None])
    total = sum(len(tree.requests) for tree in trees)
    return torch.zeros(total, device=device).index_add_(0, packed["owner"][scored], per_token)


def _packs(model: nn.Module) -> bool:
    """Whether the model takes explicit positions, a 4D additive attention mask and the positions to
    keep logits for (a transformers causal LM with eager or SDPA attention)."""
    parameters = inspect.signature(model.forward).parameters
    attention = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return {"position_ids", "attention_mask", "logits_to_keep"} <= parameters.keys() and attention in ("sdpa", "eager")


@dataclass(frozen=True)
class Scoring:
    """How requests are batched and encoded: at most ``batch_size`` requests per forward pass and, packed,
    at most ``batch_tokens`` tokens (attention over a pack costs its length squared, so packs stay
    short); ``bos`` and ``max_length`` as :func:`encode` and :func:`build_requests`."""

    batch_size: int = 128
    batch_tokens: int = 512
    bos: bool | int | None = None
    max_length: int | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.batch_tokens < 1:
            raise ValueError(f"batch_tokens must be >= 1, got {self.batch_tokens}")


def _scored_batches(model: nn.Module, requests: Sequence[Request], scoring: Scoring,
                    device: torch.device) -> Iterator[tuple[list[Request], torch.Tensor]]:
    """Each forward pass's requests and their summed log-likelihoods: packed :class:`ItemTree` s for a
    model that takes them (:func:`_packs`), else whole requests, right-padded, longest first."""
    if _packs(model):
        for pack in pack_trees(item_trees(requests), scoring.batch_tokens, scoring.batch_size):
            yield [r for tree in pack for r in tree.requests], _forward_packed(model, pack, device)
        return
    trims_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
    for start in range(0, len(requests), scoring.batch_size):
        chunk = list(requests[start:start + scoring.batch_size])
        batch = {k: v.to(device) for k, v in collate_requests(chunk).items()}
        extra = {"logits_to_keep": logits_to_keep(batch["labels"])} if trims_logits else {}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                       **extra).logits
        yield chunk, batch_loglikelihoods(logits, batch["labels"])


@torch.no_grad()
def _score(model: nn.Module, tokenizer, items: Sequence[ChoiceItem], scoring: Scoring,
           progress: Callable[[int, int], None] | None = None) -> ChoiceAccuracy:
    """Score every request (model in eval mode for the duration) and fill a metric."""
    requests = build_requests(items, tokenizer, scoring.max_length or resolve_max_length(model, tokenizer),
                              scoring.bos)
    device = next(model.parameters()).device
    metric = ChoiceAccuracy(items).to(device)
    was_training = model.training
    model.eval()
    try:
        done = 0
        for batch, loglik in _scored_batches(model, requests, scoring, device):
            metric.update(torch.tensor([r.item for r in batch]), torch.tensor([r.choice for r in batch]), loglik)
            done += len(batch)
            if progress is not None:
                progress(done, len(requests))
    finally:
        model.train(was_training)
    return metric


def score_choices(model: nn.Module, tokenizer, items: Sequence[ChoiceItem] | str | Path, batch_size: int = 16,
                  bos: bool | int | None = None, max_length: int | None = None, *,
                  batch_tokens: int = 512) -> list[list[float]]:
    """Per item, the summed log-likelihood of each ending given the context (see :func:`evaluate_choices`)."""
    scoring = Scoring(batch_size, batch_tokens, bos, max_length)
    return _score(model, tokenizer, _as_items(items), scoring).item_loglikelihoods()


def evaluate_choices(model: nn.Module, tokenizer, items: Sequence[ChoiceItem] | str | Path, batch_size: int = 16,
                     bos: bool | int | None = None, max_length: int | None = None, *,
                     batch_tokens: int = 512) -> dict[str, float]:
    """``{"acc": ..., "acc_norm": ...}`` of a causal LM on multiple-choice items (or a JSONL path).

    At most ``batch_size`` requests (one per item and ending) and ``batch_tokens`` packed tokens per
    forward pass (:class:`Scoring`). ``bos``: see :func:`encode` (None: the tokenizer's special
    tokens, as lm-eval); ``max_length``: context length for left truncation (None:
    :func:`resolve_max_length`).
    """
    scoring = Scoring(batch_size, batch_tokens, bos, max_length)
    metric = _score(model, tokenizer, _as_items(items), scoring)
    return {name: float(value) for name, value in metric.compute().items()}


def evaluate_suite(model: nn.Module, tokenizer, tasks: Mapping[str, str] = PAPER_SUITE, *, limit: int | None = None,
                   batch_size: int = 128, batch_tokens: int = 512, bos: bool | int | None = None,
                   max_length: int | None = None,
                   progress: Callable[[str, int, int], None] | None = None) -> dict[str, dict]:
    """Zero-shot accuracy of a causal LM on lm-eval tasks read from local files, as lm-eval scores them.

    ``tasks``: ``{lm-eval task name: JSONL file in its hub row schema}`` (``assets:`` specs allowed;
    see :mod:`optima.tasks`); ``limit``: the first N items of each task (lm-eval's ``--limit``);
    ``batch_size`` and ``batch_tokens``: at most that many requests and (packed) tokens per forward
    pass; ``bos`` and ``max_length`` as in :func:`encode` and :func:`build_requests`;
    ``progress(task, done, total)`` after every batch.
    Per task: ``acc``, ``acc_stderr`` (lm-eval's sample standard error), ``acc_norm`` and
    ``acc_norm_stderr`` where lm-eval reports them, ``n``, ``metric`` (the one the suite mean takes),
    and per item ``hits`` (0/1 for each metric, for paired differences) and ``loglikelihoods``.
    """
    scoring = Scoring(batch_size, batch_tokens, bos, max_length)
    results = {}
    for name, source in tasks.items():
        spec = task(name)
        items = read_task(name, source, limit)
        report = None if progress is None else (lambda done, total, name=name: progress(name, done, total))
        metric = _score(model, tokenizer, items, scoring, report)
        hits = metric.item_hits()
        result: dict = {"n": len(items), "metric": spec.metric}
        for key in spec.metrics:
            result[key], result[f"{key}_stderr"] = mean_stderr(hits[key])
        result["hits"] = {key: hits[key] for key in spec.metrics}
        result["loglikelihoods"] = metric.item_loglikelihoods()
        results[name] = result
    return results


def suite_mean(results: Mapping[str, dict]) -> tuple[float, float]:
    """The suite's headline: the mean over its tasks of each task's ``metric``, and its standard error."""
    return combined_mean({name: (r[r["metric"]], r[f"{r['metric']}_stderr"]) for name, r in results.items()})


def suite_difference(before: Mapping[str, dict], after: Mapping[str, dict]) -> dict[str, tuple[float, float]]:
    """``after - before`` per task (each task's suite metric) and for the suite mean (key ``"mean"``), each
    with its paired standard error over the same items."""
    if before.keys() != after.keys():
        raise ValueError(f"different tasks: {sorted(before)} and {sorted(after)}")
    differences = {name: paired_difference(before[name]["hits"][before[name]["metric"]],
                                           after[name]["hits"][after[name]["metric"]]) for name in before}
    return {**differences, "mean": combined_mean(differences)}
