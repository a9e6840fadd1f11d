"""Block-at-a-time offload (``RunOptions.execution_device``): each block visits the device only while it is
calibrated, pruned and run, and the weights are those of pruning in place."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import replace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from optima.config import OptionError, PruneConfig
from optima.solver import SolverOptions
from optima.walk import RunOptions, prune_model

OPTIONS = PruneConfig(solver=SolverOptions(compile=False, dtype="float64"), hessian_dtype="float64")


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))


def prune(model: LlamaForCausalLM, run: RunOptions | None = None, config: PruneConfig = OPTIONS) -> None:
    batches = list(torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(1)).split(4))
    prune_model(model, batches, lambda b: model(input_ids=b.to(model.device), use_cache=False), config, run)


def recording(to: Callable, block: int, events: list) -> Callable:
    """``to`` that first records ``("to", block, device)`` in ``events``."""
    def moved(device, *args, **kwargs):
        events.append(("to", block, torch.device(device)))
        return to(device, *args, **kwargs)
    return moved


def test_offload_moves_each_block_out_and_back_around_its_own_work_and_changes_no_bit():
    model = tiny_llama()
    twin = copy.deepcopy(model)
    prune(model)
    events: list = []
    for i, block in enumerate(twin.model.layers):
        block.to = recording(block.to, i, events)
    prune(twin, RunOptions(execution_device="cpu", on_block=lambda i, _n: events.append(("block", i)),
                           on_layer=lambda record: events.append(("layer", record.block))))
    cpu = torch.device("cpu")
    assert events == [e for i in range(3) for e in (("block", i), ("to", i, cpu), *[("layer", i)] * 7, ("to", i, cpu))]
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), name
    assert (twin.model.layers[2].mlp.down_proj.weight == 0).float().mean() == 0.5


def test_offload_of_the_dense_target_with_true_sequential_blocks_changes_no_bit():
    config = replace(OPTIONS, target="dense", true_sequential=True)
    model = tiny_llama()
    twin, plain = copy.deepcopy(model), copy.deepcopy(model)
    prune(model, config=config)
    prune(twin, RunOptions(execution_device="cpu"), config)
    prune(plain)
    for (name, a), b, c in zip(model.state_dict().items(), twin.state_dict().values(), plain.state_dict().values()):
        assert torch.equal(a, b), name
        if ".layers.2." in name and name.endswith("proj.weight"):   # and the options did change the result
            assert not torch.equal(a, c), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a real device move needs CUDA")
def test_offload_to_cuda_runs_each_block_there_and_brings_it_home():
    model = tiny_llama()
    twin = copy.deepcopy(model)
    prune(model)
    where: list[tuple[int, set[str]]] = []

    def on_layer(record) -> None:
        where.append((record.block, {p.device.type for p in twin.model.layers[record.block].parameters()}))
        others = [b for i, b in enumerate(twin.model.layers) if i != record.block]
        assert all(p.device.type == "cpu" for b in others for p in b.parameters())   # one block out at a time

    prune(twin, RunOptions(execution_device="cuda", on_layer=on_layer))
    assert where == [(i, {"cuda"}) for i in range(3) for _ in range(7)]
    assert all(p.device.type == "cpu" for p in twin.parameters())                   # every block went back home
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
        assert torch.equal(a == 0, b == 0), name


def test_the_one_pass_walk_refuses_an_execution_device():
    model = tiny_llama()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(OptionError, match="execution_device") as caught:
        prune(model, RunOptions(execution_device="cpu"), PruneConfig(sequential=False))
    assert caught.value.option == "execution_device"
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
