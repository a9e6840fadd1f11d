"""Where to prune in a model: its stack of blocks and the linear layers inside them.

Transformers keep their blocks in one ``nn.ModuleList`` (OPT ``decoder.layers``,
Llama/Qwen/Gemma ``model.layers``, GPT-2 ``h``, BERT ``encoder.layer``). We find it
from the module tree instead of a per-architecture table: the longest ModuleList
whose entries contain linear layers. GPT-2's ``Conv1D`` (a transposed linear) counts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

ATTENTION_NAMES = re.compile(r"(^|\.)(self_attn|attn|attention|q_proj|k_proj|v_proj|o_proj|query|key|value|"
                             r"c_attn|qkv_proj|out_proj)(\.|$)")


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, or transformers' Conv1D (weight stored as d_in x d_out)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def weight_rows(module: nn.Module) -> torch.Tensor:
    """The weight as (out_features, in_features), whatever the layer's storage."""
    return module.weight.T if type(module).__name__ == "Conv1D" else module.weight


def set_weight_rows(module: nn.Module, rows: torch.Tensor) -> None:
    """Write a (out_features, in_features) weight back in the layer's own layout."""
    target = module.weight
    target.data.copy_(rows.T if type(module).__name__ == "Conv1D" else rows)


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's stack of transformer blocks: (qualified name, the ModuleList)."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if any(is_linear(m) for m in module[0].modules()):
                if best is None or len(module) > len(best[1]):
                    best = (name, module)
    if best is None:
        raise ValueError(f"no stack of blocks with linear layers found in {type(model).__name__}")
    return best


@dataclass(frozen=True)
class LayerSelection:
    """Which linear layers of each block to prune (regexes match names within the model)."""

    targets: tuple[str, ...] = ()           # keep only names matching one of these (empty: all)
    ignore: tuple[str, ...] = ()            # drop names matching one of these
    skip_attention: bool = False            # drop attention projections

    def select(self, block: nn.Module, prefix: str) -> dict[str, nn.Module]:
        """Linear layers of ``block`` to prune, keyed by full name (``prefix.`` + local name)."""
        chosen = {}
        for local, module in block.named_modules():
            if not local or not is_linear(module):
                continue
            name = f"{prefix}.{local}"
            if self.targets and not any(re.search(t, name) for t in self.targets):
                continue
            if any(re.search(i, name) for i in self.ignore):
                continue
            if self.skip_attention and ATTENTION_NAMES.search(local):
                continue
            chosen[name] = module
        return chosen


def layers_by_block(model: nn.Module, selection: LayerSelection) -> list[dict[str, nn.Module]]:
    """The selected linear layers of each block, in block order (a block may have none)."""
    prefix, blocks = find_blocks(model)
    per_block = [selection.select(block, f"{prefix}.{i}" if prefix else str(i)) for i, block in enumerate(blocks)]
    if not any(per_block):
        raise ValueError("no linear layer matches the targets/ignore settings")
    return per_block


def linear_layers(model: nn.Module, selection: LayerSelection) -> dict[str, nn.Module]:
    """Every selected linear layer of every block, in block order."""
    return {name: layer for layers in layers_by_block(model, selection) for name, layer in layers.items()}
