"""Post-pruning measurements on plain modules: sparsity and per-block output error."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from optima.model import LayerSelection, find_blocks, linear_layers, weight_rows


def layer_sparsity(model: nn.Module, selection: LayerSelection = LayerSelection()) -> dict[str, float]:
    """Fraction of exact zeros in each selected linear layer's weight."""
    return {name: float((weight_rows(m) == 0).float().mean()) for name, m in linear_layers(model, selection).items()}


def overall_sparsity(model: nn.Module, selection: LayerSelection = LayerSelection()) -> float:
    """Fraction of exact zeros over all selected linear weights together."""
    layers = linear_layers(model, selection).values()
    zeros = sum(int((m.weight == 0).sum()) for m in layers)
    return zeros / max(1, sum(m.weight.numel() for m in layers))


@torch.no_grad()
def block_output_errors(dense: nn.Module, pruned: nn.Module, batches: Iterable[Any],
                        run: Callable[[nn.Module, Any], Any]) -> list[float]:
    """Relative output error of each block, ||y_pruned - y_dense||^2 / ||y_dense||^2.

    Both models see the same batches; each block's error is measured on its inputs as
    they arrive in each model (so errors accumulate along the stack, as in use).
    """
    _, dense_blocks = find_blocks(dense)
    _, pruned_blocks = find_blocks(pruned)
    n = len(dense_blocks)
    diff, energy = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    for batch in batches:
        outputs: dict[str, list[torch.Tensor]] = {"dense": [], "pruned": []}
        handles = []
        for key, blocks in (("dense", dense_blocks), ("pruned", pruned_blocks)):
            for block in blocks:
                handles.append(block.register_forward_hook(
                    lambda _m, _a, out, key=key: outputs[key].append(
                        (out[0] if isinstance(out, (tuple, list)) else out).double())))
        try:
            run(dense, batch)
            run(pruned, batch)
        finally:
            for h in handles:
                h.remove()
        for i, (d, p) in enumerate(zip(outputs["dense"], outputs["pruned"])):
            diff[i] += (p - d).pow(2).sum().cpu()
            energy[i] += d.pow(2).sum().cpu()
    return (diff / energy.clamp_min(1e-300)).tolist()
