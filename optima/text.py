"""Calibration and evaluation text as fixed-length token windows.

Text comes from a local file (``assets:REL`` for the offline assets folder) or, for users with a network, a datasets dataset named
``dataset:NAME[:CONFIG]:SPLIT`` (e.g. ``dataset:wikitext:wikitext-2-raw-v1:test``).
Calibration draws ``samples`` random windows with a fixed seed; evaluation cuts the
concatenated text into consecutive non-overlapping windows (the WikiText-2 protocol).
Windows start the way the model saw sequences in training: with the tokenizer's BOS token
when its plain encode adds one (Llama, Gemma), with text alone when it does not (GPT-2, SmolLM2).
"""

from __future__ import annotations

from pathlib import Path

import torch

from optima.config import OptionError
from optima.loading import resolve_path


def check_source(source: str) -> None:
    """Raise now, before any work, if a local text file does not exist."""
    if not source.startswith("dataset:") and not Path(resolve_path(source)).is_file():
        raise FileNotFoundError(f"text file not found: {source}")


def read_text(source: str) -> str:
    """The whole text of a local file or of a datasets split (its ``text`` column joined)."""
    check_source(source)
    if source.startswith("dataset:"):
        import datasets

        parts = source.split(":")[1:]
        if len(parts) not in (2, 3):
            raise ValueError(f"dataset source must be dataset:NAME[:CONFIG]:SPLIT, got {source!r}")
        name, config, split = (parts[0], None, parts[1]) if len(parts) == 2 else parts
        return "\n\n".join(datasets.load_dataset(name, config, split=split)["text"])
    return Path(resolve_path(source)).read_text(encoding="utf-8")


def tokenize(text: str, tokenizer) -> torch.Tensor:
    """All token ids of ``text`` as one long 1-D tensor (no special tokens)."""
    # verbose=False: the whole text is longer than the model's context on purpose (it is windowed next)
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def read_tokens(option: str, source: str, tokenizer, seq_len: int, bos: int | None) -> torch.Tensor:
    """The token ids of ``source``; ``OptionError`` naming ``option`` and the source when they cannot
    fill one window of ``seq_len`` positions (the BOS, when ``bos`` is set, takes the first one)."""
    ids = tokenize(read_text(source), tokenizer)
    needed = seq_len - (bos is not None)
    if ids.numel() < needed:
        note = f" (the BOS token takes one of its {seq_len} positions)" if bos is not None else ""
        raise OptionError(option, f"{source} has {ids.numel()} tokens; one window of seq_len={seq_len} needs "
                                  f"{needed}{note}: use a longer text or a smaller --data.init_args.seq_len")
    return ids


def bos_token_id(tokenizer) -> int | None:
    """The BOS id the tokenizer puts in front of a plain ``tokenizer(text)``, or None if it adds none."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    return bos if ids and ids[0] == bos and ids[1:] == bare else None


def prefix_token(windows: torch.Tensor, token: int | None) -> torch.Tensor:
    """Put ``token`` in front of every window (no change when ``token`` is None)."""
    if token is None:
        return windows
    return torch.cat([torch.full((windows.shape[0], 1), token, dtype=windows.dtype), windows], dim=1)


def random_windows(ids: torch.Tensor, seq_len: int, samples: int, seed: int) -> torch.Tensor:
    """``samples`` windows of ``seq_len`` tokens at seeded random offsets."""
    if ids.numel() < seq_len:
        raise ValueError(f"calibration text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (samples,), generator=generator)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


def encoder_windows(ids: torch.Tensor, tokenizer, seq_len: int, samples: int, seed: int) -> torch.Tensor:
    """Random windows of real text framed as ``[CLS] ... [SEP]``, ``seq_len`` tokens in all (no padding)."""
    windows = random_windows(ids, seq_len - 2, samples, seed)
    cls = torch.full((samples, 1), tokenizer.cls_token_id)
    sep = torch.full((samples, 1), tokenizer.sep_token_id)
    return torch.cat([cls, windows, sep], dim=1)


def consecutive_windows(ids: torch.Tensor, seq_len: int, limit: int | None = None) -> torch.Tensor:
    """Non-overlapping windows covering the text from the start (a short tail is dropped)."""
    n = ids.numel() // seq_len
    if n == 0:
        raise ValueError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    if limit is not None:
        n = min(n, limit)
    return ids[: n * seq_len].reshape(n, seq_len)
