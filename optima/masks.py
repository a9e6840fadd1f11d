"""Mask selection: which weights of each row to zero.

A keep-mask is a boolean tensor shaped like the weight, True where the weight
survives. Two patterns exist: ``unstructured`` (the same number of weights pruned
in every row) and ``N:M`` (in every group of M consecutive inputs of a row at most
N are kept, NVIDIA's convention). Scores rank weights: the lowest are pruned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MASK_SELECTORS = ("magnitude", "wanda", "sparsegpt", "sparsegpt-rowwise", "thanos")


@dataclass(frozen=True)
class Pattern:
    """A sparsity pattern: ``n:m`` groups, or unstructured when ``m`` is None."""

    sparsity: float
    n: int | None = None
    m: int | None = None

    @property
    def structured(self) -> bool:
        return self.m is not None

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.structured else f"unstructured {self.sparsity:.0%}"

    def pruned_per_row(self, d_in: int) -> int:
        """How many weights every row loses."""
        if self.structured:
            return (d_in // self.m) * (self.m - self.n)
        return int(round(self.sparsity * d_in))

    def check(self, d_in: int) -> None:
        """Raise if this pattern cannot be applied to rows of width ``d_in``."""
        if self.structured and d_in % self.m:
            raise ValueError(f"pattern {self.n}:{self.m} needs d_in divisible by {self.m}, got {d_in}")


def parse_pattern(pattern: str, sparsity: float | None = 0.5) -> Pattern:
    """Parse ``"unstructured"`` or ``"N:M"`` and check it agrees with ``sparsity``.

    For N:M the sparsity is implied (1 - N/M); a different explicit value is an error.
    """
    if pattern == "unstructured":
        if sparsity is None or not 0.0 < sparsity < 1.0:
            raise ValueError(f"sparsity must be in (0, 1), got {sparsity}")
        return Pattern(float(sparsity))
    parts = pattern.split(":") if isinstance(pattern, str) else []
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"unknown pattern {pattern!r}: use 'unstructured' or 'N:M' such as '2:4'")
    n, m = int(parts[0]), int(parts[1])
    if not 0 < n < m:
        raise ValueError(f"pattern {pattern!r} needs 0 < N < M")
    implied = 1.0 - n / m
    if sparsity is not None and not math.isclose(sparsity, implied, abs_tol=1e-9):
        raise ValueError(f"pattern {pattern} implies sparsity {implied}, but sparsity={sparsity} was given")
    return Pattern(implied, n, m)


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """|W|: prune the smallest weights."""
    return weight.abs().float()


def wanda_scores(weight: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """Wanda's |W| * ||X_col||_2, with ||X_col||^2 read off diag(H)."""
    return weight.abs().float() * hessian.diagonal().clamp_min(0).sqrt().to(torch.float32)


def magnitude_mask(weight: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Keep-mask of the magnitude selector."""
    return mask_from_scores(magnitude_scores(weight), pattern)


def wanda_mask(weight: torch.Tensor, hessian: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Keep-mask of Wanda: lowest |W| * ||X_col|| pruned within each output row (or N:M group)."""
    return mask_from_scores(wanda_scores(weight, hessian), pattern)


def mask_from_scores(scores: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Keep-mask that prunes the lowest scores of every row (or of every N:M group)."""
    rows, d_in = scores.shape
    pattern.check(d_in)
    if pattern.structured:
        groups = scores.reshape(rows, d_in // pattern.m, pattern.m)
        drop = groups.topk(pattern.m - pattern.n, dim=-1, largest=False).indices
        keep = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, drop, False)
        return keep.reshape(rows, d_in)
    k = pattern.pruned_per_row(d_in)
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k:
        keep.scatter_(1, scores.topk(k, dim=1, largest=False).indices, False)
    return keep


def check_mask(keep: torch.Tensor, pattern: Pattern) -> None:
    """Raise if ``keep`` does not follow ``pattern`` exactly."""
    rows, d_in = keep.shape
    if pattern.structured:
        kept = keep.reshape(rows, d_in // pattern.m, pattern.m).sum(-1)
        if (kept > pattern.n).any():
            raise AssertionError(f"mask breaks the {pattern.n}:{pattern.m} pattern")
    elif ((~keep).sum(1) != pattern.pruned_per_row(d_in)).any():
        raise AssertionError("mask does not prune the same number of weights in every row")
