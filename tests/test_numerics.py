"""Numerical trouble is handled and reported: outliers, NaN activations, half-precision models."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import correlated_hessian
from optima import SolverOptions, damp_hessian, prune_weight, reconstruction_objective
from optima.config import PruneConfig
from optima.walk import prune_model


def tiny_llama(dtype=torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(config).to(dtype)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 1e-4)])
def test_outlier_features_x1e4_still_exact(dtype, tol):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 128, generator=g, dtype=torch.float64)
    x[:, :4] *= 1e4
    hessian = x.T @ x / 600
    weight = torch.randn(16, 128, generator=g, dtype=torch.float64)
    for method in ("direct", "pcg"):
        solver = SolverOptions(method=method, dtype=str(dtype).removeprefix("torch."), compile=False)
        result = prune_weight(weight, hessian, PruneConfig(solver=solver))
        damped, _ = damp_hessian(hessian, 0.01)
        exact = torch.zeros_like(weight)
        for r in range(16):
            k = result.keep[r]
            exact[r, k] = torch.linalg.solve(damped[k][:, k], damped[k] @ weight[r])
        best = reconstruction_objective(exact, weight, damped)
        assert reconstruction_objective(result.weight, weight, damped) == pytest.approx(best, rel=tol)


def test_nan_activation_stops_the_run_naming_the_layer():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.weight[0, 0] = float("nan")
    batches = [torch.randint(0, 64, (2, 8))]
    with pytest.raises(FloatingPointError, match=r"model\.layers\.1\.self_attn\.o_proj"):
        prune_model(model, batches, lambda b: model(input_ids=b, use_cache=False),
                    PruneConfig(solver=SolverOptions(compile=False)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_prunes_in_float32_and_keeps_its_dtype(dtype):
    model = tiny_llama(dtype)
    batches = list(torch.randint(0, 64, (2, 24)).split(1))  # 48 tokens: fewer than down_proj's 64 inputs
    report = prune_model(model, batches, lambda b: model(input_ids=b, use_cache=False),
                         PruneConfig(solver=SolverOptions(compile=False)))
    for record in report.layers:
        assert record.stats.objective < record.stats.objective_none, record.name
        assert any("rank-deficient" in note for note in record.stats.notes) == (record.shape[1] == 64), record.name
    for name, keep in report.masks.items():
        weight = model.get_submodule(name).weight
        assert weight.dtype == dtype
        assert (weight[~keep.to(weight.device)] == 0).all() and torch.isfinite(weight).all()


def test_fewer_tokens_than_inputs_is_reported_and_finite():
    hessian = correlated_hessian(256, tokens=64, dead=0, seed=1)  # rank 64 of 256
    weight = torch.randn(32, 256)
    result = prune_weight(weight, hessian, PruneConfig(solver=SolverOptions(compile=False)))
    assert torch.isfinite(result.weight).all()
    assert result.stats.objective < result.stats.objective_none
    assert result.stats.unconverged_rows == 0
