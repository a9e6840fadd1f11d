"""Block and layer discovery across architectures, GPT-2's transposed Conv1D included."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

from optima.config import PruneConfig
from optima.model import LayerSelection, find_blocks, linear_layers, weight_rows
from optima.solver import SolverOptions
from optima.walk import prune_model


def gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32))


def qwen2():
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))


@pytest.mark.parametrize("build,blocks_name,per_block", [(gpt2, "transformer.h", 4), (qwen2, "model.layers", 7)])
def test_prunes_every_block_linear_exactly(build, blocks_name, per_block):
    torch.manual_seed(0)
    model = build()
    name, blocks = find_blocks(model)
    assert name == blocks_name and len(blocks) == 2
    layers = linear_layers(model, LayerSelection())
    assert len(layers) == 2 * per_block and not any("lm_head" in n for n in layers)
    batches = list(torch.randint(0, 64, (8, 16)).split(4))
    report = prune_model(model, batches, lambda b: model(input_ids=b, use_cache=False),
                         PruneConfig(solver=SolverOptions(compile=False)))
    for record in report.layers:
        rows = weight_rows(layers[record.name])
        assert tuple(rows.shape) == record.shape
        assert ((rows == 0).sum(1) == rows.shape[1] // 2).all(), record.name  # per row of (out, in)
        assert record.stats.objective < record.stats.objective_none, record.name
