"""Mask selection: which weights of each row to zero.

A keep-mask is a boolean tensor shaped like the weight, True where the weight
survives. Two patterns exist: ``unstructured`` (a sparsity ratio) and ``N:M`` (in
every group of M consecutive inputs of a row at most N are kept, NVIDIA's
convention). Scores rank weights: the lowest are pruned.

An unstructured selector compares its scores within a *scope*, as the method's
reference code does: ``"row"`` (every output row loses int(d_in * sparsity),
Wanda), ``"layer"`` (one threshold over the whole weight, int(numel * sparsity)
pruned, magnitude in the Wanda code) or ``"block"`` (one threshold over all rows of
each block of columns, SparseGPT). Counts are floored, as the references do.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

MASK_SELECTORS = ("magnitude", "wanda", "sparsegpt", "sparsegpt-rowwise", "thanos", "admm")
Scope = Literal["row", "block", "layer"]
# Where each selector compares its scores for unstructured sparsity (N:M is always per group of a row).
MASK_SCOPES: dict[str, Scope] = {"magnitude": "layer", "wanda": "row", "sparsegpt": "block",
                                 "sparsegpt-rowwise": "row", "thanos": "layer", "admm": "layer"}


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

    def pruned_count(self, n: int) -> int:
        """How many of ``n`` weights compared together an unstructured selection prunes: int(n * sparsity)."""
        return int(n * self.sparsity)

    def pruned_per_row(self, d_in: int) -> int:
        """How many weights a row loses under an N:M pattern or a per-row unstructured selection."""
        if self.structured:
            return (d_in // self.m) * (self.m - self.n)
        return self.pruned_count(d_in)

    def pruned_per_block(self, rows: int, d_in: int, mask_block: int) -> list[int]:
        """How many weights each block of ``mask_block`` columns (all rows together) loses.

        Block ``[i1, i2)`` loses ``pruned_count(rows * i2) - pruned_count(rows * i1)``: every
        block its floored or ceiled share, the whole layer exactly ``pruned_count(rows * d_in)``.
        """
        return [self.pruned_count(rows * min(i1 + mask_block, d_in)) - self.pruned_count(rows * i1)
                for i1 in range(0, d_in, mask_block)]

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


def column_norms(hessian: torch.Tensor) -> torch.Tensor:
    """Each input's ||X_col||_2, read off diag(H) = ||X_col||^2 (in the Hessian's dtype)."""
    return hessian.diagonal().clamp_min(0).sqrt()


def wanda_scores(weight: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """Wanda's |W| * ||X_col||_2 in float32, from the inputs' norms (``column_norms(H)``, or measured)."""
    return weight.detach().abs().float() * norms.float().to(weight.device)


# The selectors that rank weights by a score alone: name -> score(weight, hessian). A new selector of this
# kind is a function here, its entry in SCORES, MASK_SELECTORS and MASK_SCOPES, and its name in config.Mask.
SCORES: dict[str, Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]] = {
    "magnitude": lambda weight, _hessian: magnitude_scores(weight),
    "wanda": lambda weight, hessian: wanda_scores(weight, column_norms(hessian)),
}


def score_mask(selector: str, weight: torch.Tensor, hessian: torch.Tensor | None, pattern: Pattern) -> torch.Tensor:
    """Keep-mask of a score selector (``SCORES``): its lowest scores pruned within its ``MASK_SCOPES`` scope
    (or within each N:M group)."""
    return mask_from_scores(SCORES[selector](weight, hessian), pattern, scope=MASK_SCOPES[selector])


def magnitude_mask(weight: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Keep-mask of the magnitude selector: lowest |W| of the whole layer (or of each N:M group)."""
    return score_mask("magnitude", weight, None, pattern)


def wanda_mask(weight: torch.Tensor, hessian: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Keep-mask of Wanda: lowest |W| * ||X_col|| pruned within each output row (or N:M group)."""
    return score_mask("wanda", weight, hessian, pattern)


def prune_lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Keep-mask pruning the ``count`` lowest scores along the last dimension (ties: lower index first)."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if count:
        keep.scatter_(-1, scores.argsort(dim=-1, stable=True)[..., :count], False)
    return keep


def prune_nm(scores: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Keep-mask pruning the ``M - N`` lowest scores of every group of ``M`` consecutive inputs of a row."""
    rows, d_in = scores.shape
    groups = scores.reshape(rows, d_in // pattern.m, pattern.m)
    drop = groups.topk(pattern.m - pattern.n, dim=-1, largest=False).indices
    return torch.ones_like(groups, dtype=torch.bool).scatter_(-1, drop, False).reshape(rows, d_in)


def mask_from_scores(scores: torch.Tensor, pattern: Pattern, scope: Literal["row", "layer"] = "row") -> torch.Tensor:
    """Keep-mask that prunes the lowest scores of every row or of the whole layer (or of every N:M group)."""
    rows, d_in = scores.shape
    pattern.check(d_in)
    if pattern.structured:
        return prune_nm(scores, pattern)
    if scope == "row":
        return prune_lowest(scores, pattern.pruned_per_row(d_in))
    if scope == "layer":
        return prune_lowest(scores.reshape(-1), pattern.pruned_count(scores.numel())).reshape(rows, d_in)
    raise ValueError(f"unknown scope {scope!r} for a score mask; use 'row' or 'layer'")


def check_mask(keep: torch.Tensor, pattern: Pattern, scope: Scope = "row", mask_block: int = 128) -> None:
    """Raise if ``keep`` does not follow ``pattern`` exactly in ``scope`` (see the module docstring).

    ``mask_block`` is the column block of the ``"block"`` scope. N:M masks are checked per group.
    """
    rows, d_in = keep.shape
    pruned = ~keep
    if pattern.structured:
        kept = keep.reshape(rows, d_in // pattern.m, pattern.m).sum(-1)
        if (kept > pattern.n).any():
            raise AssertionError(f"mask breaks the {pattern.n}:{pattern.m} pattern")
    elif scope == "row":
        if (pruned.sum(1) != pattern.pruned_per_row(d_in)).any():
            raise AssertionError(f"mask does not prune {pattern.pruned_per_row(d_in)} weights in every row")
    elif scope == "layer":
        if int(pruned.sum()) != pattern.pruned_count(keep.numel()):
            raise AssertionError(f"mask prunes {int(pruned.sum())} weights, not {pattern.pruned_count(keep.numel())}")
    elif scope == "block":
        counts = [int(pruned[:, i1:i1 + mask_block].sum()) for i1 in range(0, d_in, mask_block)]
        expected = pattern.pruned_per_block(rows, d_in, mask_block)
        if counts != expected:
            raise AssertionError(f"mask prunes {counts} weights per block of {mask_block} columns, not {expected}")
    else:
        raise ValueError(f"unknown scope {scope!r}; use 'row', 'block' or 'layer'")
