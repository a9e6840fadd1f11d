"""prune_weight: the layer contract. Exact zeros, options checked, trouble handled and reported."""

from __future__ import annotations

import pytest
import torch

from conftest import correlated_hessian, damped_objective, exact_update
from optima import SolverOptions, parse_pattern, prune_weight, reconstruction_objective
from optima.masks import MASK_SCOPES, check_mask

EAGER = SolverOptions(compile=False)


@pytest.fixture(scope="module")
def layer():
    g = torch.Generator().manual_seed(0)
    return torch.randn(12, 128, generator=g), correlated_hessian(128, seed=1, outlier_scale=10.0).float()


@pytest.mark.parametrize("mask,update", [(m, u) for m in ("magnitude", "wanda", "sparsegpt")
                                         for u in ("none", "optima")] + [("sparsegpt", "sparsegpt")])
@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.6), ("2:4", None)])
def test_pruned_entries_are_exact_zeros_and_stats_add_up(layer, mask, update, pattern, sparsity):
    weight, hessian = layer
    result = prune_weight(weight, hessian, sparsity=sparsity, pattern=pattern, mask=mask, update=update,
                          solver_options=EAGER)
    assert result.weight.shape == weight.shape and result.weight.dtype == weight.dtype
    assert (result.weight[~result.keep] == 0).all()
    assert torch.isfinite(result.weight).all()
    if update == "none":
        assert torch.equal(result.weight, weight * result.keep)
    stats = result.stats
    assert stats.sparsity == pytest.approx(float((result.weight == 0).float().mean()))
    check_mask(result.keep, parse_pattern(pattern, sparsity), MASK_SCOPES[mask])   # exact count in its scope
    assert stats.sparsity >= float((~result.keep).float().mean())
    assert stats.sparsity >= (int(0.6 * 128) / 128 if sparsity else 0.5) - 1e-9    # counts are floored
    assert stats.objective == pytest.approx(reconstruction_objective(result.weight, weight, hessian), rel=1e-9)
    assert stats.objective_none == pytest.approx(
        reconstruction_objective(weight * result.keep, weight, hessian), rel=1e-9)
    assert stats.dense_energy == pytest.approx(reconstruction_objective(torch.zeros_like(weight), weight, hessian))
    assert stats.objective <= stats.objective_none
    if update != "none":
        assert stats.objective < 0.9 * stats.objective_none   # the update does real work
    assert stats.seconds >= stats.seconds_update > 0 and stats.seconds_mask >= 0
    assert 0 < stats.relative_error <= stats.relative_error_none < 1


def test_a_given_keep_mask_is_used_as_is(layer):
    weight, hessian = layer
    keep = torch.rand(weight.shape, generator=torch.Generator().manual_seed(1)) > 0.3
    result = prune_weight(weight, hessian, keep=keep, solver_options=EAGER)
    assert torch.equal(result.keep, keep)
    assert (result.weight[~keep] == 0).all()
    best = exact_update(weight, hessian, keep, 0.01)
    assert damped_objective(result.weight, weight, hessian, 0.01) == pytest.approx(
        damped_objective(best, weight, hessian, 0.01), rel=1e-4)


@pytest.mark.parametrize("kwargs,match", [
    ({"sparsity": 0.0}, "sparsity must be in"),
    ({"sparsity": 1.0}, "sparsity must be in"),
    ({"sparsity": -0.5}, "sparsity must be in"),
    ({"sparsity": 1.5}, "sparsity must be in"),
    ({"sparsity": None}, "sparsity must be in"),
    ({"pattern": "banana"}, "unknown pattern"),
    ({"pattern": "2/4"}, "unknown pattern"),
    ({"pattern": "4:2", "sparsity": None}, "0 < N < M"),
    ({"pattern": "1:4"}, "implies sparsity 0.75"),            # default sparsity 0.5 conflicts
    ({"pattern": "2:4", "sparsity": 0.6}, "implies sparsity 0.5"),
    ({"pattern": "2:3", "sparsity": None}, "divisible by 3"),  # 128 inputs
    ({"pattern": "4:48", "sparsity": None}, "divisible by 48"),
    ({"mask": "random"}, "unknown mask selector"),
    ({"update": "magic"}, "unknown update"),
    ({"mask": "wanda", "update": "sparsegpt"}, "needs mask='sparsegpt'"),
    ({"mask": "magnitude", "update": "sparsegpt"}, "needs mask='sparsegpt'"),
    ({"damp": -0.01}, "damping must be >= 0"),
])
def test_bad_options_are_rejected(layer, kwargs, match):
    weight, hessian = layer
    with pytest.raises(ValueError, match=match):
        prune_weight(weight, hessian, solver_options=EAGER, **kwargs)


def test_bad_tensors_are_rejected(layer):
    weight, hessian = layer
    for bad_shape in (hessian[:64, :64], hessian[:, :64], hessian[0]):
        with pytest.raises(ValueError, match="does not match"):
            prune_weight(weight, bad_shape)
    for value in (float("nan"), float("inf")):
        bad = hessian.clone()
        bad[3, 7] = value
        with pytest.raises(FloatingPointError, match="Hessian"):
            prune_weight(weight, bad)
        bad = weight.clone()
        bad[0, 0] = value
        with pytest.raises(FloatingPointError, match="weight"):
            prune_weight(bad, hessian)


@pytest.mark.parametrize("method", ["direct", "pcg"])
@pytest.mark.parametrize("damp", [0.01, 0.0])
def test_dead_inputs_and_rank_deficiency_stay_finite(method, damp):
    hessian = correlated_hessian(96, tokens=40, dead=5, seed=7, outlier_scale=10.0)  # 40 tokens < 96 inputs
    weight = torch.randn(16, 96, generator=torch.Generator().manual_seed(5))
    result = prune_weight(weight, hessian, damp=damp, solver_options=SolverOptions(method=method, compile=False))
    assert torch.isfinite(result.weight).all()
    assert (result.weight[~result.keep] == 0).all()
    assert result.stats.dead_inputs == 5
    assert any("5 dead inputs" in note for note in result.stats.notes)
    assert result.stats.objective < 0.9 * result.stats.objective_none
    dead = slice(91, 96)
    kept_dead = result.keep[:, dead]
    assert torch.equal(result.weight[:, dead][kept_dead], weight[:, dead][kept_dead])  # left unchanged


def test_all_dead_and_zero_weight_layers_are_harmless():
    weight = torch.randn(4, 32)
    for method in ("direct", "pcg"):
        result = prune_weight(weight, torch.zeros(32, 32), solver_options=SolverOptions(method=method, compile=False))
        assert result.stats.dead_inputs == 32 and torch.equal(result.weight, weight * result.keep)
        zero = prune_weight(torch.zeros(4, 32), correlated_hessian(32), solver_options=SolverOptions(method=method,
                                                                                                    compile=False))
        assert not zero.weight.any() and zero.stats.objective == 0.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mask,update", [("wanda", "optima"), ("sparsegpt", "sparsegpt")])
def test_half_precision_weight_keeps_dtype_and_exact_zeros(dtype, mask, update):
    hessian = correlated_hessian(64, seed=9, outlier_scale=10.0).float()
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(3)).to(dtype)
    result = prune_weight(weight, hessian, pattern="2:4", sparsity=None, mask=mask, update=update,
                          solver_options=EAGER)
    assert result.weight.dtype == dtype and result.keep.dtype == torch.bool
    assert (result.weight[~result.keep] == 0).all()
    assert ((result.weight.reshape(32, 16, 4) != 0).sum(-1) <= 2).all()
    assert torch.isfinite(result.weight).all()
    assert result.stats.objective < 0.9 * result.stats.objective_none
    # the returned half-precision weight is still better than no update, after rounding
    rounded = reconstruction_objective(result.weight, weight, hessian)
    assert rounded < reconstruction_objective(weight * result.keep, weight, hessian)


@pytest.mark.parametrize("method", ["direct", "pcg"])
def test_damp_zero_on_full_rank_hessian_is_the_undamped_optimum(method):
    hessian = correlated_hessian(48, dead=0, seed=8, outlier_scale=10.0, decay=1e-1)
    weight = torch.randn(8, 48, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    result = prune_weight(weight, hessian, damp=0.0,
                          solver_options=SolverOptions(method=method, dtype=torch.float64, compile=False))
    assert result.stats.damping == 0.0 and not result.stats.notes
    best = exact_update(weight, hessian, result.keep, 0.0)
    assert result.stats.objective == pytest.approx(reconstruction_objective(best, weight, hessian), rel=1e-9)
    for r in range(8):  # zero gradient on the kept set
        k = result.keep[r]
        grad = (result.weight[r] - weight[r]) @ hessian
        assert grad[k].abs().max() < 1e-6 * (weight[r] @ hessian).abs().max()


def test_a_worse_update_is_replaced_by_no_update(monkeypatch):
    import optima.prune as prune_module

    real = prune_module.solve_pinned

    def broken(*args, **kwargs):
        result = real(*args, **kwargs)
        result.delta = result.delta * 5.0  # numerical trouble, simulated
        return result

    monkeypatch.setattr(prune_module, "solve_pinned", broken)
    hessian = correlated_hessian(32, seed=10)
    weight = torch.randn(4, 32, dtype=torch.float64)
    result = prune_weight(weight, hessian, solver_options=SolverOptions(compile=False, dtype=torch.float64))
    assert result.stats.fell_back_to_none
    assert any("kept the masked weights" in note for note in result.stats.notes)
    assert torch.equal(result.weight, weight * result.keep)
    assert result.stats.objective == result.stats.objective_none


def test_float64_hessian_with_float32_solver_and_float64_solver_agree(layer):
    weight, hessian = layer
    runs = [prune_weight(weight, hessian.double(), solver_options=SolverOptions(compile=False, dtype=dtype))
            for dtype in (torch.float32, torch.float64)]
    assert torch.equal(runs[0].keep, runs[1].keep)
    assert runs[0].weight.dtype == runs[1].weight.dtype == torch.float32
    assert runs[0].stats.objective == pytest.approx(runs[1].stats.objective, rel=1e-4)


def test_a_given_mask_cannot_go_with_sparsegpts_own_update(layer):
    weight, hessian = layer
    keep = torch.ones_like(weight, dtype=torch.bool)
    with pytest.raises(ValueError, match="cannot take a given keep mask"):
        prune_weight(weight, hessian, keep=keep, mask="sparsegpt", update="sparsegpt")
