"""Block-at-a-time offload gives the same weights as pruning in place."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from optima.config import PruneConfig
from optima.solver import SolverOptions
from optima.walk import RunOptions, prune_model

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_offloaded_walk_matches_in_place_walk(device):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = LlamaForCausalLM(config)
    twin = copy.deepcopy(model)
    batches = list(torch.randint(0, 64, (8, 16)).split(4))
    options = PruneConfig(solver=SolverOptions(compile=False, dtype="float64"), hessian_dtype="float64")
    prune_model(model, batches, lambda b: model(input_ids=b, use_cache=False), options)
    prune_model(twin, batches, lambda b: twin(input_ids=b, use_cache=False), options,
                RunOptions(execution_device=device))
    assert all(p.device.type == "cpu" for p in twin.parameters())  # every block went back home
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
        assert torch.equal(a == 0, b == 0), name
    assert (twin.model.layers[2].mlp.down_proj.weight == 0).float().mean() == 0.5
