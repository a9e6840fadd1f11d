"""OWL layer budgets (optima/owl.py): the reference's rule by hand, its properties, and dense input norms."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from optima.owl import input_norms, outlier_ratio, owl_sparsities


def _blocks(n_blocks: int, seed: int = 0) -> tuple[dict, dict, dict]:
    """Random blocks, two layers each: Gaussian (out, in) weights, input norms in [0.5, 1.5] (few outliers)."""
    g = torch.Generator().manual_seed(seed)
    weights, norms, block_of = {}, {}, {}
    for b in range(n_blocks):
        for name, shape in (("attn", (32, 48)), ("mlp", (48, 32))):
            key = f"layers.{b}.{name}"
            weights[key] = torch.randn(shape, generator=g)
            norms[key] = torch.rand(shape[1], generator=g) + 0.5
            block_of[key] = b
    return weights, norms, block_of


def _per_block(budgets: dict[str, float], block_of: dict[str, int]) -> torch.Tensor:
    return torch.tensor([budgets[next(n for n in block_of if block_of[n] == b)]
                         for b in sorted(set(block_of.values()))], dtype=torch.float64)


def test_hand_computed_example():
    weights = {"b0": torch.ones(2, 2),                          # scores 1,1,1,1: none above 2 * mean
               "b1": torch.tensor([[1.0, 3.0], [1.0, 1.0]]),    # x norms (1, 3): 1,9,1,3; mean 3.5: 9 > 7
               "b2.a": torch.tensor([[10.0, 10.0]]),            # pooled with b2.b: mean 34/16, 10 > 4.25 twice
               "b2.b": torch.ones(1, 14)}
    norms = {"b0": torch.ones(2), "b1": torch.tensor([1.0, 3.0]), "b2.a": torch.ones(2), "b2.b": torch.ones(14)}
    block_of = {"b0": 0, "b1": 1, "b2.a": 2, "b2.b": 2}
    # ratios 0, 1/4, 2/16 -> keep (0, .2, .1) for owl_lambda .1 -> minus mean .1, plus 1 - .6 -> sparsity .7, .5, .6
    budgets = owl_sparsities(weights, norms, block_of, sparsity=0.6, owl_lambda=0.1, owl_m=2.0)
    assert budgets == pytest.approx({"b0": 0.7, "b1": 0.5, "b2.a": 0.6, "b2.b": 0.6}, abs=1e-12)
    # the threshold is the mean of the block's layers pooled, not each layer's own mean (that would give 0)
    assert outlier_ratio([weights["b2.a"], weights["b2.b"]], [norms["b2.a"], norms["b2.b"]], m=2.0) == 2 / 16
    assert outlier_ratio([weights["b2.a"]], [norms["b2.a"]], m=2.0) == 0.0


@pytest.mark.parametrize("sparsity,owl_lambda", [(0.5, 0.08), (0.7, 0.08), (0.3, 0.2)])
def test_budgets_average_to_target_and_span_two_lamda(sparsity, owl_lambda):
    weights, norms, block_of = _blocks(6)
    per_block = _per_block(owl_sparsities(weights, norms, block_of, sparsity, owl_lambda), block_of)
    assert per_block.mean().item() == pytest.approx(sparsity, abs=1e-9)
    assert (per_block.max() - per_block.min()).item() == pytest.approx(2 * owl_lambda, abs=1e-9)
    assert per_block.min() >= sparsity - 2 * owl_lambda - 1e-12 and per_block.max() <= sparsity + 2 * owl_lambda + 1e-12


def test_one_outlier_block_can_leave_the_paper_range():
    """The shift centres the mean, not the range: one outlier block among equal ones gets target - 1.5 owl_lambda."""
    weights, norms, block_of = _blocks(1)
    weights = {f"{n}.{b}": w for b in range(4) for n, w in weights.items()}
    norms = {f"{n}.{b}": v.clone() for b in range(4) for n, v in norms.items()}
    block_of = {n: int(n.rsplit(".", 1)[1]) for n in weights}
    norms["layers.0.attn.3"][:3] *= 100
    per_block = _per_block(owl_sparsities(weights, norms, block_of, 0.5, 0.08), block_of)
    assert per_block.tolist() == pytest.approx([0.54, 0.54, 0.54, 0.38], abs=1e-12)


@pytest.mark.parametrize("where", ["weights", "norms"])
def test_planted_outliers_get_less_sparsity(where):
    weights, norms, block_of = _blocks(5, seed=1)
    before = _per_block(owl_sparsities(weights, norms, block_of, 0.7), block_of)
    assert before.argmax().item() == 2                  # block 2 has the fewest outliers to begin with
    target = weights if where == "weights" else norms
    target["layers.2.mlp"][..., :3] *= 100              # three input channels: weight columns or activation norms
    budgets = owl_sparsities(weights, norms, block_of, 0.7)
    after = _per_block(budgets, block_of)
    assert after.argmin().item() == 2 and after[2].item() == pytest.approx(after.max().item() - 0.16, abs=1e-12)
    assert budgets["layers.2.attn"] == budgets["layers.2.mlp"]


def test_equal_ratios_give_uniform_budgets():
    weights, norms, block_of = _blocks(1)
    weights = {f"{n}.{b}": w * (b + 1) for b in range(3) for n, w in weights.items()}   # scale does not matter
    norms = {f"{n}.{b}": v for b in range(3) for n, v in norms.items()}
    block_of = {n: int(n.rsplit(".", 1)[1]) for n in weights}
    budgets = owl_sparsities(weights, norms, block_of, 0.6)
    assert list(budgets.values()) == [pytest.approx(0.6, abs=1e-15)] * 6


@pytest.mark.parametrize("kwargs,match", [
    ({"sparsity": 0.0}, "sparsity must be in"), ({"sparsity": 1.0}, "sparsity must be in"),
    ({"owl_lambda": -0.01}, "owl_lambda"), ({"owl_m": 0.0}, "owl_m "),
    ({"sparsity": 0.95, "owl_lambda": 0.08}, "outside"),
])
def test_bad_input_raises(kwargs, match):
    weights, norms, block_of = _blocks(3)
    with pytest.raises(ValueError, match=match):
        owl_sparsities(weights, norms, block_of, **{"sparsity": 0.5, **kwargs})


def test_mismatched_inputs_raise():
    weights, norms, block_of = _blocks(2)
    with pytest.raises(ValueError, match="same layers"):
        owl_sparsities(weights, {**norms, "extra": torch.ones(3)}, block_of, 0.5)
    norms["layers.0.attn"] = torch.ones(5)
    with pytest.raises(ValueError, match=r"expected \(out, in\)"):
        owl_sparsities(weights, norms, block_of, 0.5)


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_pre_hooks for m in model.modules())


def test_input_norms_equal_hand_computed_sequential():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Dropout(0.5), nn.Linear(5, 4)).train()
    batches = [torch.randn(3, 7, 6), torch.randn(2, 7, 6) * 3]
    norms = input_norms(model, batches, model, {"0": model[0], "3": model[3]}, dtype=torch.float64)
    x = torch.cat([b.reshape(-1, 6) for b in batches]).double()
    h = torch.relu(x @ model[0].weight.double().T + model[0].bias.double())   # eval mode: dropout is identity
    assert torch.allclose(norms["0"], (x.T @ x).diagonal().sqrt(), rtol=1e-12)
    assert torch.allclose(norms["3"], (h.T @ h).diagonal().sqrt(), rtol=1e-6)
    assert model.training and _no_hooks(model)


def _tiny_llama(blocks: int) -> nn.Module:
    import transformers
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=blocks,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


def test_input_norms_on_tiny_llama_and_hooks_removed_on_error():
    model = _tiny_llama(2)
    batches = [torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (1, 16))]
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}
    norms = input_norms(model, batches, lambda ids: model(input_ids=ids), layers, dtype=torch.float64)
    block0 = model.model.layers[0]
    x = torch.cat([block0.input_layernorm(model.model.embed_tokens(b)).reshape(-1, 32) for b in batches]).double()
    expected = (x.T @ x).diagonal().sqrt()
    for proj in ("q_proj", "k_proj", "v_proj"):
        assert torch.allclose(norms[f"model.layers.0.self_attn.{proj}"], expected, rtol=1e-6)
    assert norms["model.layers.1.mlp.down_proj"].shape == (64,) and len(norms) == 14
    assert _no_hooks(model)

    def fail(ids):
        model(input_ids=ids)
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        input_norms(model, batches, fail, layers)
    assert _no_hooks(model)


def test_prune_model_with_owl_budgets_prunes_each_layer_to_its_block_budget():
    from optima.config import PruneConfig
    from optima.model import LayerSelection, layers_by_block, weight_rows
    from optima.solver import SolverOptions
    from optima.walk import prune_model

    model = _tiny_llama(3)
    batches = [torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    run = lambda ids: model(input_ids=ids)  # noqa: E731
    every = layers_by_block(model, LayerSelection())
    layers = {n: m for block in every for n, m in block.items()}
    expected = owl_sparsities({n: weight_rows(m).detach().clone() for n, m in layers.items()},
                              input_norms(model, batches, run, layers),
                              {n: i for i, block in enumerate(every) for n in block}, 0.5, 0.1, 5.0)
    report = prune_model(model, batches, run, PruneConfig(sparsity=0.5, layer_budgets="owl", owl_lambda=0.1,
                                                          solver=SolverOptions(compile=False)))
    assert len(set(expected.values())) == 3   # (which block gets what: the unit tests above)
    for record in report.layers:
        assert record.target_sparsity == expected[record.name]
        keep = report.masks[record.name]
        assert (keep.sum(1) == keep.shape[1] - int(keep.shape[1] * expected[record.name])).all()  # Wanda: per row
    assert abs(sum(set(expected.values())) / 3 - 0.5) < 1e-12


@pytest.mark.parametrize("kwargs, option", [(dict(pattern="2:4", sparsity=None), "layer_budgets"),
                                            (dict(layer_sparsity={"q_proj": 0.3}), "layer_budgets"),
                                            (dict(owl_lambda=0.3), "owl_lambda"), (dict(owl_m=0.0), "owl_m")])
def test_owl_options_are_checked(kwargs, option):
    from optima.config import OptionError, PruneConfig

    with pytest.raises(OptionError) as caught:
        PruneConfig(layer_budgets="owl", **kwargs)
    assert caught.value.option == option
