"""Post-pruning evaluation: per-block output error against the dense model."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from conftest import needs

from optima.callbacks import OptimaPruning
from optima.callbacks.lm import CausalLM, TextData
from optima.config import PruneConfig
from optima.evaluate import block_output_errors
from optima.solver import SolverOptions



@needs("stories260K/stories260K.bin", "stories260K/tok512.bin", "wikitext-2/valid.txt", "wikitext-2/test.txt")
def test_block_errors_zero_for_dense_and_grow_along_the_pruned_stack():
    module = CausalLM("assets:stories260K/stories260K.bin", compare_dense=True)
    data = TextData("assets:stories260K/tok512.bin", "assets:wikitext-2/valid.txt", "assets:wikitext-2/test.txt",
                    seq_len=64, calibration_samples=16, batch_size=8, eval_windows=4)
    trainer = L.Trainer(max_epochs=0, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[OptimaPruning(PruneConfig(solver=SolverOptions(compile=False)),
                                                 calibration_samples=16, progress=False)])
    dense_metrics = trainer.validate(module, datamodule=data, verbose=False)[0]
    assert all(dense_metrics[f"val/block{i}_rel_error"] == 0 for i in range(5))
    trainer.fit(module, datamodule=data)
    metrics = trainer.validate(module, datamodule=data, verbose=False)[0]
    errors = [metrics[f"val/block{i}_rel_error"] for i in range(5)]
    assert all(0 < e < 1 for e in errors)
    assert errors[-1] > errors[0]  # errors accumulate along the stack
    assert metrics["val/sparsity"] == pytest.approx(0.5)
    assert metrics["val/perplexity"] > dense_metrics["val/perplexity"]


def test_block_output_errors_match_a_direct_computation():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2))
    pruned = copy.deepcopy(dense)
    with torch.no_grad():
        pruned.model.layers[1].mlp.down_proj.weight[:, ::2] = 0  # only block 1 changes
    ids = torch.randint(0, 64, (2, 12))
    run = lambda m, b: m(input_ids=b, use_cache=False)  # noqa: E731
    errors = block_output_errors(dense, pruned, [ids], run)
    assert errors[0] == 0.0
    with torch.no_grad():
        d = dense(input_ids=ids, output_hidden_states=True).hidden_states
        p = pruned(input_ids=ids, output_hidden_states=True).hidden_states
    # hidden_states[2] is block 1's output (the last entry would be after the final norm)
    expected = float((p[2] - d[2]).double().pow(2).sum() / d[2].double().pow(2).sum())
    assert errors[1] == pytest.approx(expected, rel=1e-6)
