"""prune_weight: the layer contract. Exact zeros, options checked, trouble handled and reported."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from conftest import correlated_hessian, damped_objective, exact_update
from optima import SolverOptions, parse_pattern, prune_weight, reconstruction_objective
from optima.config import OptionError, PruneConfig
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
    result = prune_weight(weight, hessian, PruneConfig(sparsity=sparsity, pattern=pattern, mask=mask, update=update,
                                                       solver=EAGER))
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
    result = prune_weight(weight, hessian, PruneConfig(solver=EAGER), keep=keep)
    assert torch.equal(result.keep, keep)
    assert (result.weight[~keep] == 0).all()
    best = exact_update(weight, hessian, keep, 0.01)
    assert damped_objective(result.weight, weight, hessian, 0.01) == pytest.approx(
        damped_objective(best, weight, hessian, 0.01), rel=1e-4)


@pytest.mark.parametrize("kwargs,option,match", [
    ({"sparsity": 0.0}, "sparsity", "sparsity must be in"),
    ({"sparsity": 1.0}, "sparsity", "sparsity must be in"),
    ({"sparsity": -0.5}, "sparsity", "sparsity must be in"),
    ({"sparsity": 1.5}, "sparsity", "sparsity must be in"),
    ({"sparsity": None}, "sparsity", "sparsity must be in"),
    ({"pattern": "banana"}, "pattern", "unknown pattern"),
    ({"pattern": "2/4"}, "pattern", "unknown pattern"),
    ({"pattern": "4:2", "sparsity": None}, "pattern", "0 < N < M"),
    ({"pattern": "1:4"}, "pattern", "implies sparsity 0.75"),            # default sparsity 0.5 conflicts
    ({"pattern": "2:4", "sparsity": 0.6}, "pattern", "implies sparsity 0.5"),
    ({"mask": "random"}, "mask", "got 'random'; choose from"),
    ({"update": "magic"}, "update", "got 'magic'; choose from"),
    ({"mask": "wanda", "update": "sparsegpt"}, "update", "needs mask='sparsegpt'"),
    ({"mask": "magnitude", "update": "sparsegpt"}, "update", "needs mask='sparsegpt'"),
    ({"damp": -0.01}, "damp", "must be >= 0"),
])
def test_bad_options_are_rejected(kwargs, option, match):
    with pytest.raises(OptionError, match=match) as caught:
        PruneConfig(solver=EAGER, **kwargs)
    assert caught.value.option == option
    assert str(caught.value).startswith(f"{option}: ")


@pytest.mark.parametrize("pattern,match", [("2:3", "divisible by 3"), ("4:48", "divisible by 48")])  # 128 inputs
def test_a_pattern_the_layer_width_does_not_fit_is_rejected(layer, pattern, match):
    weight, hessian = layer
    with pytest.raises(ValueError, match=match):
        prune_weight(weight, hessian, PruneConfig(pattern=pattern, sparsity=None, solver=EAGER))


@pytest.mark.parametrize("kwargs,option", [
    ({"sparsity": 1.5}, "sparsity"),
    ({"pattern": "5:4", "sparsity": None}, "pattern"),
    ({"mask": "x"}, "mask"),
    ({"mask": "wanda", "update": "sparsegpt"}, "update"),
    ({"damp": -1}, "damp"),
    ({"keep_row_range": True, "update": "none"}, "keep_row_range"),
    ({"keep_row_range": True, "solver": SolverOptions(method="direct")}, "keep_row_range"),
    ({"layer_sparsity": {"mlp": 1.2}}, "layer_sparsity['mlp']"),
    ({"layer_sparsity": {"(": 0.5}}, "layer_sparsity"),
    ({"targets": ["["]}, "targets"),
    ({"ignore": ["("]}, "ignore"),
    ({"mask_block": 0}, "mask_block"),
    ({"hessian_dtype": "float16"}, "hessian_dtype"),
])
def test_prune_config_errors_name_the_option(kwargs, option):
    with pytest.raises(OptionError) as caught:
        PruneConfig(**kwargs)
    assert isinstance(caught.value, ValueError)
    assert caught.value.option == option
    assert str(caught.value).startswith(f"{option}: ")


def test_solver_option_errors_name_the_option():
    for kwargs, option in [({"method": "cholesky"}, "solver.method"), ({"dtype": "float16"}, "solver.dtype"),
                           ({"preconditioner": "ilu"}, "solver.preconditioner"), ({"tol": 0.0}, "solver.tol")]:
        with pytest.raises(OptionError) as caught:
            SolverOptions(**kwargs)
        assert caught.value.option == option


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
    result = prune_weight(weight, hessian, PruneConfig(damp=damp, solver=SolverOptions(method=method, compile=False)))
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
        config = PruneConfig(solver=SolverOptions(method=method, compile=False))
        result = prune_weight(weight, torch.zeros(32, 32), config)
        assert result.stats.dead_inputs == 32 and torch.equal(result.weight, weight * result.keep)
        zero = prune_weight(torch.zeros(4, 32), correlated_hessian(32), config)
        assert not zero.weight.any() and zero.stats.objective == 0.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mask,update", [("wanda", "optima"), ("sparsegpt", "sparsegpt")])
def test_half_precision_weight_keeps_dtype_and_exact_zeros(dtype, mask, update):
    hessian = correlated_hessian(64, seed=9, outlier_scale=10.0).float()
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(3)).to(dtype)
    result = prune_weight(weight, hessian, PruneConfig(pattern="2:4", sparsity=None, mask=mask, update=update,
                                                       solver=EAGER))
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
    result = prune_weight(weight, hessian, PruneConfig(damp=0.0, solver=SolverOptions(method=method, dtype="float64", stop="residual",
                                                                                       compile=False)))
    assert result.stats.damping == 0.0 and not result.stats.notes
    best = exact_update(weight, hessian, result.keep, 0.0)
    assert result.stats.objective == pytest.approx(reconstruction_objective(best, weight, hessian), rel=1e-9)
    for r in range(8):  # zero gradient on the kept set
        k = result.keep[r]
        grad = (result.weight[r] - weight[r]) @ hessian
        assert grad[k].abs().max() < 1e-6 * (weight[r] @ hessian).abs().max()


def test_a_worse_update_is_replaced_by_no_update(monkeypatch):
    import optima.problem as problem_module

    real = problem_module.solve_pinned

    def broken(*args, **kwargs):
        result = real(*args, **kwargs)
        result.delta = result.delta * 5.0  # numerical trouble, simulated
        return result

    monkeypatch.setattr(problem_module, "solve_pinned", broken)
    hessian = correlated_hessian(32, seed=10)
    weight = torch.randn(4, 32, dtype=torch.float64)
    result = prune_weight(weight, hessian, PruneConfig(solver=SolverOptions(compile=False, dtype="float64")))
    assert result.stats.fell_back_to_none
    assert any("kept the masked weights" in note for note in result.stats.notes)
    assert torch.equal(result.weight, weight * result.keep)
    assert result.stats.objective == result.stats.objective_none


def test_float64_hessian_with_float32_solver_and_float64_solver_agree(layer):
    weight, hessian = layer
    runs = [prune_weight(weight, hessian.double(), PruneConfig(solver=SolverOptions(compile=False, dtype=dtype)))
            for dtype in ("float32", "float64")]
    assert torch.equal(runs[0].keep, runs[1].keep)
    assert runs[0].weight.dtype == runs[1].weight.dtype == torch.float32
    assert runs[0].stats.objective == pytest.approx(runs[1].stats.objective, rel=1e-4)


def test_a_given_mask_cannot_go_with_sparsegpts_own_update(layer):
    weight, hessian = layer
    keep = torch.ones_like(weight, dtype=torch.bool)
    with pytest.raises(ValueError, match="cannot take a given keep mask"):
        prune_weight(weight, hessian, PruneConfig(mask="sparsegpt", update="sparsegpt"), keep=keep)


def test_a_given_pattern_overrides_the_configs_own(layer):
    weight, hessian = layer
    config = PruneConfig(sparsity=0.3, mask="wanda", update="none")
    result = prune_weight(weight, hessian, config, pattern=parse_pattern("2:4", None))
    check_mask(result.keep, parse_pattern("2:4", None))
    default = prune_weight(weight, hessian, config)
    check_mask(default.keep, parse_pattern("unstructured", 0.3), "row")


# -- keep_row_range: the box-bounded OPTIMA update ---------------------------------------------------

def bounded_reference(weight: torch.Tensor, hessian: torch.Tensor, keep: torch.Tensor, low: torch.Tensor,
                      high: torch.Tensor) -> torch.Tensor:
    """Per row, min (v - w)^T H (v - w) s.t. v_P = 0, low <= v_K <= high, by enumerating active sets (float64).

    Every kept entry is free, at ``low`` or at ``high``; for each assignment the free entries are the
    unconstrained minimizer with the others fixed. The optimum is the best assignment whose free entries
    land inside the box (H positive definite: the optimum's own active set gives the optimum itself).
    """
    h = hessian.double().numpy()
    out = np.zeros(tuple(weight.shape))
    for r in range(weight.shape[0]):
        w = weight[r].double().numpy()
        kept = np.flatnonzero(keep[r].numpy())
        lo, hi = float(low[r]), float(high[r])
        hw = h @ w
        best = np.inf
        for states in itertools.product((0, 1, 2), repeat=len(kept)):
            states = np.array(states)
            v = np.zeros_like(w)
            v[kept[states == 1]], v[kept[states == 2]] = lo, hi
            free = kept[states == 0]
            if len(free):
                fixed = np.setdiff1d(np.arange(len(w)), free)
                v[free] = np.linalg.solve(h[np.ix_(free, free)], hw[free] - h[np.ix_(free, fixed)] @ v[fixed])
                if (v[free] < lo).any() or (v[free] > hi).any():
                    continue
            objective = (v - w) @ h @ (v - w)
            if objective < best:
                best, out[r] = objective, v
    return torch.from_numpy(out)


def row_objectives(new: torch.Tensor, weight: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    diff = new.double() - weight.double()
    return (diff * (diff @ hessian.double())).sum(1)


def test_keep_row_range_is_the_exact_box_bounded_optimum():
    hessian = correlated_hessian(16, dead=0, seed=20, outlier_scale=10.0, decay=1e-2)   # full rank: damp 0 is exact
    weight = torch.randn(6, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    solver = SolverOptions(method="pcg", dtype="float64", tol=1e-10, compile=False, stop="residual")
    bounded = prune_weight(weight, hessian, PruneConfig(sparsity=0.5, damp=0.0, keep_row_range=True, solver=solver))
    free = prune_weight(weight, hessian, PruneConfig(sparsity=0.5, damp=0.0, solver=solver))
    keep = bounded.keep
    assert torch.equal(keep, free.keep)                               # the bound changes the update, not the mask
    low, high = weight.amin(1), weight.amax(1)
    new = bounded.weight
    assert (new[~keep] == 0).all()
    assert ((new >= low[:, None]) & (new <= high[:, None])).all()     # exactly inside each row's original range
    stats = bounded.stats
    assert stats.solver_method == "pcg" and stats.unconverged_rows == 0 and not stats.fell_back_to_none
    # the bounds bind: the unbounded optimum leaves the range in some rows (and not in all of them)
    unbounded = exact_update(weight, hessian, keep, 0.0)
    outside = ((unbounded < low[:, None]) | (unbounded > high[:, None])).any(1)
    assert 0 < int(outside.sum()) < weight.shape[0]
    best_unbounded = reconstruction_objective(unbounded, weight, hessian)
    assert best_unbounded <= stats.objective <= stats.objective_none
    assert stats.objective > best_unbounded * (1 + 1e-3)
    assert free.stats.objective == pytest.approx(best_unbounded, rel=1e-9)
    # against the exact per-row box-constrained optimum
    reference = bounded_reference(weight, hessian, keep, low, high)
    assert (reference[~keep] == 0).all()
    got, want = row_objectives(new, weight, hessian), row_objectives(reference, weight, hessian)
    assert ((got - want).abs() <= 1e-8 * want).all()
    assert stats.objective == pytest.approx(float(want.sum()), rel=1e-8)
    unbounded_rows = row_objectives(unbounded, weight, hessian)
    assert ((got - unbounded_rows)[~outside].abs() <= 1e-8 * unbounded_rows[~outside]).all()  # inactive bounds
    assert (got[outside] > unbounded_rows[outside]).all()
    torch.testing.assert_close(new, reference, rtol=0, atol=1e-8)
