"""Mask refinement rounds: monotone objective, pattern kept, exact optimum for the final mask."""

from __future__ import annotations

import pytest
import torch
from conftest import correlated_hessian, damped_objective, exact_update, require_assets

from optima import reconstruction_objective
from optima.config import PruneConfig
from optima.hessian import damp_hessian
from optima.loading import assets_dir
from optima.masks import check_mask, magnitude_mask, parse_pattern, wanda_mask
from optima.problem import LayerProblem
from optima.prune import select_mask
from optima.refine import refine_mask
from optima.solver import SolverOptions, solve_pinned

DAMP = 0.01
PATTERNS = {"50%": parse_pattern("unstructured", 0.5), "60%": parse_pattern("unstructured", 0.6),
            "2:4": parse_pattern("2:4", None)}
STORIES = assets_dir() / "stories260K" / "stories260K.bin"
WIKI = assets_dir() / "wikitext-2" / "valid.txt"


def _refine(weight, hessian, keep, pattern, rounds=4, options=None):
    """OPTIMA solve of ``keep``, then ``rounds`` of refinement; returns (initial solution, result)."""
    options = options or SolverOptions(compile=False)
    problem = LayerProblem.build(weight, hessian, keep, pattern, damped=damp_hessian(hessian, DAMP))
    solved = (weight + problem.solve(options).delta) * keep
    return solved, refine_mask(problem, solved, options, rounds)


def _check(weight, hessian, keep, pattern, solved, result) -> None:
    """The invariants every refinement keeps, whatever it accepted."""
    objectives = result.objectives
    assert len(objectives) == len(result.accepted_rows) + 1
    assert all(b <= a for a, b in zip(objectives, objectives[1:])), objectives
    assert objectives[0] == pytest.approx(reconstruction_objective(solved, weight, hessian), rel=1e-12)
    assert objectives[-1] == pytest.approx(reconstruction_objective(result.weight, weight, hessian), rel=1e-12)
    assert torch.equal((~result.keep).sum(1), (~keep).sum(1))         # every row keeps its count
    if pattern.structured:
        check_mask(result.keep, pattern)
    assert (result.weight[~result.keep] == 0).all()
    unchanged = (result.keep == keep).all(1)                               # untouched rows: bit for bit as given
    assert torch.equal(result.weight[unchanged], solved.to(result.weight.dtype)[unchanged])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", list(PATTERNS))
def test_objective_never_rises_on_correlated_random_layers(name, seed):
    pattern = PATTERNS[name]
    hessian = correlated_hessian(64, seed=seed, outlier_scale=10.0, decay=1e-2).float()
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(seed))
    keep = wanda_mask(weight, hessian, pattern)
    solved, result = _refine(weight, hessian, keep, pattern)
    _check(weight, hessian, keep, pattern, solved, result)
    assert result.accepted_rows[0] > 0
    assert result.objectives[-1] < 0.85 * result.objectives[0]


@pytest.fixture(scope="module")
def stories_layers() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(weight, Hessian) of two real stories260K layers from 8 x 128 tokens of WikiText-2 valid."""
    require_assets("stories260K/stories260K.bin", "wikitext-2/valid.txt")
    from optima.hessian import HessianAccumulator
    from optima.llama2c import load_llama2c, load_llama2c_tokenizer
    from optima.text import random_windows, tokenize

    model = load_llama2c(STORIES).eval()
    tokenizer = load_llama2c_tokenizer(STORIES.parent / "tok512.bin")
    ids = random_windows(tokenize(WIKI.read_text()[:40000], tokenizer), 128, 8, seed=0)
    names = ("model.layers.1.self_attn.o_proj", "model.layers.1.mlp.down_proj")
    modules = dict(model.named_modules())
    accumulators = {name: HessianAccumulator(modules[name].in_features, name=name) for name in names}
    handles = [modules[name].register_forward_pre_hook(lambda _m, args, acc=acc: acc.add(args[0]))
               for name, acc in accumulators.items()]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for handle in handles:
        handle.remove()
    return {name: (modules[name].weight.detach().clone(), acc.finalize()) for name, acc in accumulators.items()}


@pytest.mark.parametrize("mask", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("name", ["50%", "2:4"])
def test_refinement_on_real_stories260k_layers(stories_layers, mask, name):
    pattern = PATTERNS[name]
    for weight, hessian in stories_layers.values():
        keep, _, _ = select_mask(weight, hessian, pattern, PruneConfig(mask=mask))
        solved, result = _refine(weight, hessian, keep, pattern)
        _check(weight, hessian, keep, pattern, solved, result)
        assert result.objectives[-1] < 0.95 * result.objectives[0]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", ["50%", "2:4"])
def test_refined_weights_are_the_exact_optimum_of_the_final_mask(name, dtype):
    pattern = PATTERNS[name]
    hessian = correlated_hessian(64, seed=3, outlier_scale=10.0, decay=1e-2)
    weight = torch.randn(24, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    keep = wanda_mask(weight, hessian, pattern)
    options = SolverOptions(compile=False, dtype=dtype)
    _, result = _refine(weight.to(options.torch_dtype), hessian.to(options.torch_dtype), keep, pattern,
                        options=options)
    assert sum(result.accepted_rows) > 0
    exact = exact_update(weight, hessian, result.keep, DAMP)
    optimum = damped_objective(exact, weight, hessian, DAMP)
    assert damped_objective(result.weight, weight, hessian, DAMP) == pytest.approx(optimum, rel=1e-6)


def test_a_bad_mask_is_strongly_improved():
    """Magnitude ignores the inputs' energy: a few loud inputs' small weights are pruned, at great cost."""
    hessian = correlated_hessian(64, outliers=4, outlier_scale=30.0, seed=4).float()
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(4))
    pattern = PATTERNS["50%"]
    keep = magnitude_mask(weight, pattern)
    _, result = _refine(weight, hessian, keep, pattern, rounds=3)
    assert result.accepted_rows[0] >= 16
    assert result.objectives[1] < 0.1 * result.objectives[0]
    assert result.objectives[-1] < 0.05 * result.objectives[0]


def test_stops_once_nothing_is_left_to_try_and_zero_rounds_change_nothing():
    hessian = correlated_hessian(32, seed=5, outlier_scale=10.0).float()
    weight = torch.randn(8, 32, generator=torch.Generator().manual_seed(5))
    pattern = PATTERNS["2:4"]
    keep = wanda_mask(weight, hessian, pattern)
    solved, result = _refine(weight, hessian, keep, pattern, rounds=0)
    assert torch.equal(result.keep, keep) and torch.equal(result.weight, solved)
    assert len(result.objectives) == 1 and result.accepted_rows == []
    _, result = _refine(weight, hessian, keep, pattern, rounds=200)
    assert len(result.objectives) < 100


def test_weight_range_bounds_the_refined_weights():
    hessian = correlated_hessian(64, seed=6, outlier_scale=10.0, decay=1e-2).float()
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(6))
    pattern = PATTERNS["50%"]
    keep = wanda_mask(weight, hessian, pattern)
    low, high = weight.amin(1), weight.amax(1)
    options = SolverOptions(compile=False, method="pcg")
    problem = LayerProblem.build(weight, hessian, keep, pattern, damped=damp_hessian(hessian, DAMP), keep_row_range=True)
    damped, damping = damp_hessian(hessian, DAMP)
    direct = solve_pinned(damped, weight, keep, damping, options, weight_range=(low, high))
    assert torch.equal(problem.solve(options).delta, direct.delta)
    solved = (weight + direct.delta) * keep
    result = refine_mask(problem, solved, options, 3)
    _check(weight, hessian, keep, pattern, solved, result)
    assert sum(result.accepted_rows) > 0
    assert ((result.weight >= low[:, None]) & (result.weight <= high[:, None])).all()


@pytest.mark.parametrize("name", ["50%", "2:4"])
def test_prune_weight_with_mask_rounds_lowers_the_layer_error_and_keeps_the_pattern(name):
    from optima.config import OptionError
    from optima.prune import prune_weight

    pattern = parse_pattern("unstructured", 0.5) if name == "50%" else parse_pattern("2:4", None)
    hessian = correlated_hessian(128, seed=5, outlier_scale=30.0, decay=1e-2)
    weight = torch.randn(32, 128, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    solver = SolverOptions(compile=False)
    plain = prune_weight(weight, hessian, PruneConfig(mask="wanda", solver=solver), pattern=pattern)
    refined = prune_weight(weight, hessian, PruneConfig(mask="wanda", mask_rounds=3, solver=solver), pattern=pattern)
    s = refined.stats
    assert s.objective < 0.95 * plain.stats.objective                       # measured about 0.7x
    assert s.mask_round_objectives[0] == pytest.approx(plain.stats.objective, rel=1e-6)
    assert all(b <= a for a, b in zip(s.mask_round_objectives, s.mask_round_objectives[1:]))
    assert s.objective == pytest.approx(s.mask_round_objectives[-1], rel=1e-9)
    assert torch.equal(refined.keep.sum(1), plain.keep.sum(1)) and not torch.equal(refined.keep, plain.keep)
    check_mask(refined.keep, pattern, "row")
    assert (refined.weight[~refined.keep] == 0).all() and any("mask refined" in n for n in s.notes)
    for bad in (dict(mask_rounds=-1), dict(mask_rounds=2, update="none"), dict(mask_rounds=1.5)):
        with pytest.raises(OptionError) as caught:
            PruneConfig(**bad)
        assert caught.value.option == "mask_rounds"
