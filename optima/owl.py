"""OWL layer budgets: blocks with more outlier Wanda scores are pruned less (Yin et al. 2023).

Outlier Weighed Layerwise sparsity scores every weight of a block with Wanda's metric
``|W_ij| * ||x_j||_2`` on the *dense* model, counts the fraction of the block's scores above
``m`` times their mean (all the block's linear layers pooled), and spreads the target sparsity
over the blocks so that the block with the most outliers keeps the most weights. The rule
follows the reference code (github.com/luuyin/OWL, ``lib/prune_all.py``: ``prune_wanda_outlier``
and ``check_outlier_mean``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from optima.masks import wanda_scores
from optima.model import weight_rows


@torch.no_grad()
def input_norms(model: nn.Module, batches: Iterable[Any], run_batch: Callable[[Any], Any],
                layers: dict[str, nn.Module], dtype: torch.dtype = torch.float32,
                reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """``||x_j||_2`` over all calibration tokens for every input channel ``j`` of each layer.

    One forward pass of the model as it is (call it on the dense model: OWL measures dense
    activations, while the sequential walk's Hessians see pruned upstream blocks, so they cannot
    be reused). Squares are summed in ``dtype`` (and over processes with ``reduce_sum``, when each
    feeds its own shard of batches); the model runs in eval mode; hooks are removed even if a batch fails.
    """
    sums = {name: torch.zeros(weight_rows(layer).shape[1], dtype=dtype, device=layer.weight.device)
            for name, layer in layers.items()}

    def hook(name: str, x: torch.Tensor) -> None:
        sums[name] += x.detach().reshape(-1, x.shape[-1]).to(dtype).square().sum(0)

    handles = [layer.register_forward_pre_hook(lambda _m, args, name=name: hook(name, args[0]))
               for name, layer in layers.items()]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            run_batch(batch)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    if reduce_sum is not None:
        sums = {name: reduce_sum(total) for name, total in sums.items()}
    for name, total in sums.items():
        if not torch.isfinite(total).all():
            raise FloatingPointError(f"{name}: calibration inputs contain NaN or Inf")
    return {name: total.sqrt() for name, total in sums.items()}


def outlier_ratio(weights: list[torch.Tensor], norms: list[torch.Tensor], m: float) -> float:
    """Fraction of the pooled Wanda scores of one block's layers above ``m`` times their pooled mean.

    ``check_outlier_mean`` in the reference (which reports it in percent; the scale cancels in
    ``owl_sparsities``). Scores are made one layer at a time, never concatenated.
    """
    total, count = 0.0, 0
    for weight, norm in zip(weights, norms):
        total += wanda_scores(weight, norm).sum(dtype=torch.float64).item()
        count += weight.numel()
    threshold = m * total / count
    above = sum(int((wanda_scores(w, n) > threshold).sum()) for w, n in zip(weights, norms))
    return above / count


def owl_sparsities(weights: dict[str, torch.Tensor], norms: dict[str, torch.Tensor], block_of: dict[str, int],
                   sparsity: float, owl_lambda: float = 0.08, owl_m: float = 5.0) -> dict[str, float]:
    """Per-layer sparsity by OWL: every layer gets its block's budget.

    ``weights`` are dense ``(out, in)`` weights, ``norms`` their inputs' ``||x_j||_2`` (from
    :func:`input_norms` on the dense model), ``block_of`` the block index of each layer. The
    reference pools every linear layer of a block, so pass them all, pruned or not.

    With ``D_b`` the outlier ratio of block ``b``, the reference's rule is
    ``keep_b = (D_b - min D) / (max D - min D) * 2 * owl_lambda``, shifted so that the mean of
    ``keep_b`` over blocks is ``1 - sparsity``; the block's sparsity is ``1 - keep_b``. The budgets
    span exactly ``2 * owl_lambda`` and their plain mean over blocks is ``sparsity``, so they lie
    within ``sparsity +- 2 * owl_lambda`` (within ``+- owl_lambda``, as the paper states, only when the
    ratios sit symmetrically about their mean). The parameter-weighted mean (the model's overall sparsity)
    equals ``sparsity`` only when the blocks have equal parameter counts. Equal ratios give the
    uniform budget (the reference divides by zero there).

    Raises ``ValueError`` for ``sparsity`` outside (0, 1), ``owl_lambda < 0``, ``owl_m <= 0``,
    mismatched inputs, or a budget outside (0, 1) (the reference would clip it to 0.01).
    """
    if not 0 < sparsity < 1:
        raise ValueError(f"OWL: sparsity must be in (0, 1), got {sparsity}")
    if not owl_lambda >= 0:
        raise ValueError(f"OWL: owl_lambda must be >= 0, got {owl_lambda}")
    if not owl_m > 0:
        raise ValueError(f"OWL: owl_m (outlier threshold, times the mean score) must be > 0, got {owl_m}")
    if not weights:
        raise ValueError("OWL: no layers given")
    if set(weights) != set(norms) or set(weights) != set(block_of):
        raise ValueError("OWL: weights, norms and block_of must name the same layers")
    for name, weight in weights.items():
        if weight.dim() != 2 or norms[name].shape != (weight.shape[1],):
            raise ValueError(f"OWL: {name} has weight {tuple(weight.shape)} but input norms "
                             f"{tuple(norms[name].shape)}; expected (out, in) and (in,)")
    blocks = sorted(set(block_of.values()))
    ratios = torch.tensor([outlier_ratio([w for n, w in weights.items() if block_of[n] == b],
                                         [norms[n] for n in weights if block_of[n] == b], owl_m) for b in blocks],
                          dtype=torch.float64)
    spread = ratios.max() - ratios.min()
    keep = (ratios - ratios.min()) / spread * 2 * owl_lambda if spread > 0 else torch.zeros_like(ratios)
    keep = keep - keep.mean() + (1 - sparsity)
    budget = {b: 1 - k for b, k in zip(blocks, keep.tolist())}
    for b, s in budget.items():
        if not 0 < s < 1:
            raise ValueError(f"OWL: block {b} would get sparsity {s:.4f}, outside (0, 1); "
                             f"lower owl_lambda ({owl_lambda}) or move the target sparsity ({sparsity}) away from "
                             "0 and 1")
    return {name: budget[block_of[name]] for name in weights}
