"""The error-correcting objective (target="dense") and true-sequential blocks."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import needs

from optima import prune_weight
from optima.config import OptionError, PruneConfig
from optima.hessian import damp_hessian, recorded_inputs
from optima.loading import load_model
from optima.model import find_blocks, layers_by_block, weight_rows
from optima.report import PruneReport, summary
from optima.solver import SolverOptions
from optima.target import DenseTarget
from optima.walk import layer_groups, prune_model

EXACT = SolverOptions(compile=False, dtype="float64", tol=1e-12)
DENSE = dict(target="dense", true_sequential=True)   # the dense target is fitted group by group
STORIES = ("stories260K/stories260K.bin",)


def _inputs(tokens: int, d: int, seed: int, dead: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """(X~, X): correlated pruned-model inputs with ``dead`` inputs never active, and the dense model's
    inputs of the same tokens (X~ plus an error, live on every input)."""
    g = torch.Generator().manual_seed(seed)
    x_dense = torch.randn(tokens, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g,
                                                                                       dtype=torch.float64)
    x_dense[:, 0] *= 20                                                   # an outlier feature
    x_pruned = x_dense + 0.3 * torch.randn(tokens, d, generator=g, dtype=torch.float64) @ torch.randn(
        d, d, generator=g, dtype=torch.float64)
    x_pruned[:, d - dead:] = 0
    return x_pruned, x_dense


def _target(x_pruned: torch.Tensor, x_dense: torch.Tensor) -> tuple[torch.Tensor, DenseTarget]:
    n = x_pruned.shape[0]
    return x_pruned.T @ x_pruned / n, DenseTarget(x_pruned.T @ x_dense / n, x_dense.T @ x_dense / n)


def _exact_dense_optimum(weight: torch.Tensor, hessian: torch.Tensor, target: DenseTarget, keep: torch.Tensor,
                         damp: float) -> torch.Tensor:
    """Per-row float64 optimum of ||X~ w' - X w||^2 + lambda ||w' - w||^2 with w'_P = 0, by
    torch.linalg.solve of (H~ + lambda I)_KK w'_K = (C w + lambda w)_K (a dead input keeps its weight)."""
    damped, damping = damp_hessian(hessian, damp)
    dead = hessian.diagonal() <= 0
    out = torch.zeros(weight.shape, dtype=torch.float64)
    for r in range(weight.shape[0]):
        rhs = target.cross @ weight[r] + damping.value * weight[r]
        rhs[dead] = damped.diagonal()[dead] * weight[r, dead]
        k = keep[r]
        out[r, k] = torch.linalg.solve(damped[k][:, k], rhs[k])
    return out


def _direct_objective(new: torch.Tensor, weight: torch.Tensor, x_pruned: torch.Tensor, x_dense: torch.Tensor) -> float:
    """||X~ W'^T - X W^T||^2 / tokens from the raw inputs."""
    return float(((x_pruned @ new.double().T - x_dense @ weight.double().T) ** 2).sum() / x_pruned.shape[0])


@pytest.mark.parametrize("mask, pattern", [("wanda", "unstructured"), ("sparsegpt", "2:4"), ("magnitude", "unstructured")])
def test_dense_target_update_is_the_float64_optimum_and_reports_its_own_objective(mask, pattern):
    x_pruned, x_dense = _inputs(400, 48, seed=1)
    weight = torch.randn(20, 48, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    hessian, target = _target(x_pruned, x_dense)
    config = PruneConfig(mask=mask, pattern=pattern, **DENSE, solver=EXACT)
    result = prune_weight(weight, hessian, config, target=target)
    exact = _exact_dense_optimum(weight, hessian, target, result.keep, config.damp)
    damped = damp_hessian(hessian, config.damp)[0]

    def damped_objective(new):   # what the update minimises: the objective + lambda ||w' - w||^2
        lam = damped[0, 0] - hessian[0, 0]
        return _direct_objective(new, weight, x_pruned, x_dense) + float(lam * ((new - weight) ** 2).sum())

    gap = (damped_objective(result.weight) - damped_objective(exact)) / result.stats.objective_none
    assert abs(gap) <= 1e-6
    torch.testing.assert_close(result.weight, exact, rtol=1e-4, atol=1e-5)   # (the kept sets can be ill-conditioned)
    assert torch.equal(result.weight == 0, ~result.keep)
    # the report measures the objective that was optimised, on the raw inputs
    assert result.stats.target == "dense"
    assert result.stats.objective == pytest.approx(_direct_objective(result.weight, weight, x_pruned, x_dense), rel=1e-9)
    assert result.stats.objective_none == pytest.approx(
        _direct_objective(weight * result.keep, weight, x_pruned, x_dense), rel=1e-9)
    assert result.stats.dense_energy == pytest.approx(float((x_dense @ weight.T).pow(2).sum() / 400), rel=1e-9)
    assert result.stats.objective < result.stats.objective_none


def test_dense_target_beats_the_self_target_on_the_dense_objective():
    x_pruned, x_dense = _inputs(400, 48, seed=3)
    weight = torch.randn(20, 48, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    hessian, target = _target(x_pruned, x_dense)
    keep = torch.rand(20, 48, generator=torch.Generator().manual_seed(5)) > 0.5
    dense = prune_weight(weight, hessian, PruneConfig(**DENSE, solver=EXACT), keep=keep, target=target)
    own = prune_weight(weight, hessian, PruneConfig(solver=EXACT), keep=keep)
    on_dense = [_direct_objective(r.weight, weight, x_pruned, x_dense) for r in (dense, own)]
    assert on_dense[0] < 0.97 * on_dense[1]
    # and the self target stays the better fit of its own objective
    assert own.stats.objective < float(((x_pruned @ (dense.weight - weight).T) ** 2).sum() / 400)


def test_with_the_dense_inputs_equal_to_the_pruned_ones_the_dense_target_is_the_self_target():
    x, _ = _inputs(400, 48, seed=6)
    weight = torch.randn(20, 48, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    hessian, target = _target(x, x)
    for mask in ("wanda", "sparsegpt"):
        dense = prune_weight(weight, hessian, PruneConfig(mask=mask, **DENSE, solver=EXACT), target=target)
        own = prune_weight(weight, hessian, PruneConfig(mask=mask, solver=EXACT))
        assert torch.equal(dense.keep, own.keep), mask
        torch.testing.assert_close(dense.weight, own.weight, rtol=1e-8, atol=1e-10)
        assert dense.stats.objective == pytest.approx(own.stats.objective, rel=1e-7)


def test_mask_refinement_under_the_dense_target_lowers_the_dense_objective():
    x_pruned, x_dense = _inputs(400, 48, seed=8)
    weight = torch.randn(20, 48, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    hessian, target = _target(x_pruned, x_dense)
    plain = prune_weight(weight, hessian, PruneConfig(**DENSE, solver=EXACT), target=target)
    refined = prune_weight(weight, hessian, PruneConfig(**DENSE, mask_rounds=3, solver=EXACT), target=target)
    rounds = refined.stats.mask_round_objectives
    assert rounds[0] == pytest.approx(plain.stats.objective, rel=1e-9)
    assert all(b <= a for a, b in zip(rounds, rounds[1:])) and rounds[-1] < rounds[0]
    assert refined.stats.objective == pytest.approx(_direct_objective(refined.weight, weight, x_pruned, x_dense),
                                                    rel=1e-9)
    assert (refined.keep.sum(1) == plain.keep.sum(1)).all()


def _block_inputs(model, batches, layer: str) -> torch.Tensor:
    with recorded_inputs({layer: model.get_submodule(layer)}) as seen:
        parts = []
        for ids in batches:
            model(input_ids=ids, use_cache=False)
            parts.append(seen[layer].reshape(-1, seen[layer].shape[-1]).double())
    return torch.cat(parts)


@needs(*STORIES)
@torch.no_grad()
def test_dense_target_is_exact_on_a_real_layer_fed_by_a_pruned_block():
    dense = load_model("assets:stories260K/stories260K.bin").eval()
    pruned = copy.deepcopy(dense)
    for layer in layers_by_block(pruned, PruneConfig().selection)[0].values():   # block 0 pruned by magnitude
        w = weight_rows(layer)
        w.mul_(w.abs() > w.abs().median())
    batches = list(torch.randint(0, 512, (16, 64), generator=torch.Generator().manual_seed(0)).split(4))
    name = "model.layers.1.mlp.down_proj"
    x_pruned, x_dense = _block_inputs(pruned, batches, name), _block_inputs(dense, batches, name)
    weight = weight_rows(dense.get_submodule(name)).double()
    hessian, target = _target(x_pruned, x_dense)
    result = prune_weight(weight, hessian, PruneConfig(mask="sparsegpt", **DENSE, solver=EXACT), target=target)
    exact = _exact_dense_optimum(weight, hessian, target, result.keep, 0.01)
    lam = float(damp_hessian(hessian, 0.01)[1].value)
    objective = [_direct_objective(new, weight, x_pruned, x_dense) + lam * float(((new - weight) ** 2).sum())
                 for new in (result.weight, exact)]
    assert abs(objective[0] - objective[1]) / result.stats.objective_none <= 1e-6
    assert result.stats.objective == pytest.approx(_direct_objective(result.weight, weight, x_pruned, x_dense),
                                                   rel=1e-8)


@needs(*STORIES)
def test_llama_blocks_fall_into_the_true_sequential_groups():
    model = load_model("assets:stories260K/stories260K.bin")
    _, blocks = find_blocks(model)
    layers = layers_by_block(model, PruneConfig().selection)[0]
    calls = []
    handle = blocks[0].register_forward_pre_hook(lambda _m, args, kwargs: calls.append((args, kwargs)),
                                                 with_kwargs=True)
    with torch.no_grad():
        model(input_ids=torch.randint(0, 512, (2, 16)), use_cache=False)
    handle.remove()
    groups = [[name.rsplit(".", 1)[1] for name in group] for group in layer_groups(blocks[0], layers, calls[0])]
    assert groups == [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]


def _prune_stories(**options) -> tuple[dict[str, torch.Tensor], list]:
    model = load_model("assets:stories260K/stories260K.bin")
    batches = list(torch.randint(0, 512, (16, 64), generator=torch.Generator().manual_seed(0)).split(4))
    config = PruneConfig(mask="sparsegpt", hessian_dtype="float64", solver=EXACT, **options)
    report = prune_model(model, batches, lambda b: model(input_ids=b, use_cache=False), config)
    return {n: p.detach().clone() for n, p in model.named_parameters()}, report.layers


@needs(*STORIES)
def test_the_walk_feeds_the_dense_stream_and_the_groups_their_pruned_inputs():
    plain, _ = _prune_stories()
    grouped, grouped_records = _prune_stories(true_sequential=True)
    dense, dense_records = _prune_stories(target="dense", true_sequential=True)
    block0 = [n for n in plain if ".layers.0." in n and n.endswith("proj.weight")]
    first = [n for n in block0 if any(p in n for p in ("q_proj", "k_proj", "v_proj"))]
    later = [n for n in plain if ".layers.3." in n and n.endswith("proj.weight")]
    # block 0's q/k/v see the same inputs in both models: the dense target changes nothing there
    for name in first:
        assert torch.equal(dense[name] == 0, grouped[name] == 0), name
        torch.testing.assert_close(dense[name], grouped[name], rtol=1e-5, atol=1e-7)
    for a, b in zip(dense_records, grouped_records):
        if a.name in {n.removesuffix(".weight") for n in first}:
            assert a.stats.objective == pytest.approx(b.stats.objective, rel=1e-6), a.name
    # the groups after them, and later blocks, are fitted to the dense model's outputs, and say so
    assert all(not torch.allclose(dense[n], grouped[n]) for n in later + [n for n in block0 if n not in first])
    assert {r.stats.target for r in dense_records} == {"dense"} and {r.stats.target for r in grouped_records} == {"self"}
    assert summary(PruneReport(layers=dense_records))["objective"].startswith("dense: ||X~ W'^T - X W^T||^2")
    for record in dense_records:
        assert record.stats.objective <= record.stats.objective_none, record.name
    # true-sequential: q/k/v come first and see what they saw before; o_proj sees the pruned q/k/v
    for name in block0:
        same = any(p in name for p in ("q_proj", "k_proj", "v_proj"))
        assert torch.equal(grouped[name], plain[name]) == same, name
    for name, value in grouped.items():
        if name.endswith("proj.weight"):
            assert (value == 0).float().mean() == 0.5, name


def test_dense_target_and_true_sequential_options_are_checked():
    with pytest.raises(OptionError, match="target"):
        PruneConfig(target="dense", sequential=False)
    with pytest.raises(OptionError, match="needs true_sequential=True"):
        PruneConfig(target="dense")
    with pytest.raises(OptionError, match="target"):
        PruneConfig(**DENSE, update="none")
    with pytest.raises(OptionError, match="target"):
        PruneConfig(**DENSE, keep_row_range=True)
    with pytest.raises(OptionError, match="true_sequential"):
        PruneConfig(true_sequential=True, sequential=False)
    with pytest.raises(OptionError, match="target"):
        PruneConfig(target="outputs")
    weight, hessian = torch.randn(4, 8), torch.eye(8)
    with pytest.raises(ValueError, match="needs the layer's DenseTarget"):
        prune_weight(weight, hessian, PruneConfig(**DENSE))
    with pytest.raises(ValueError, match="takes no DenseTarget"):
        prune_weight(weight, hessian, PruneConfig(), target=DenseTarget(hessian, hessian))
