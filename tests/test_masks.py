"""Mask selectors and patterns: exact counts in each selector's scope, exact N:M groups, the scores they claim."""

from __future__ import annotations

import pytest
import torch

from conftest import correlated_hessian
from optima import Pattern, parse_pattern, prune_weight
from optima.config import PruneConfig
from optima.masks import (MASK_SCOPES, MASK_SELECTORS, SCORES, check_mask, column_norms, magnitude_scores,
                          mask_from_scores, wanda_scores)
from optima.sparsegpt import sparsegpt, sparsegpt_rowwise


@pytest.fixture(scope="module", params=[128, 257], ids=["d128", "d257"])
def layer(request):
    d = request.param
    g = torch.Generator().manual_seed(d)
    return torch.randn(24, d, generator=g), correlated_hessian(d, seed=1, outlier_scale=10.0).float()


def lowest_are_pruned(scores: torch.Tensor, keep: torch.Tensor) -> bool:
    """Every pruned score of a row is <= every kept score of that row."""
    pruned_max = scores.masked_fill(keep, float("-inf")).max(-1).values
    kept_min = scores.masked_fill(~keep, float("inf")).min(-1).values
    return bool((pruned_max <= kept_min).all())


@pytest.mark.parametrize("mask", ["magnitude", "wanda", "sparsegpt", "sparsegpt-rowwise"])
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_unstructured_prunes_the_exact_count_in_its_scope(layer, mask, sparsity):
    """Wanda and row-wise SparseGPT: int(d * s) in every row; magnitude: int(numel * s) in the layer;
    SparseGPT: int(rows * i2 * s) - int(rows * i1 * s) in each block [i1, i2) of 128 columns."""
    weight, hessian = layer
    rows, d = weight.shape
    result = prune_weight(weight, hessian, PruneConfig(sparsity=sparsity, mask=mask, update="none"))
    pruned = ~result.keep
    scope = MASK_SCOPES[mask]
    if scope == "row":
        assert (pruned.sum(1) == int(d * sparsity)).all()
    else:
        blocks = range(0, d, 128) if scope == "block" else [0]
        ends = [min(i1 + 128, d) for i1 in blocks] if scope == "block" else [d]
        for i1, i2 in zip(blocks, ends):
            assert int(pruned[:, i1:i2].sum()) == int(rows * i2 * sparsity) - int(rows * i1 * sparsity)
        assert pruned.sum(1).unique().numel() > 1          # one threshold over many rows: rows differ
        with pytest.raises(AssertionError):
            check_mask(result.keep, parse_pattern("unstructured", sparsity), "row")
    assert int(pruned.sum()) == (rows * int(d * sparsity) if scope == "row" else int(rows * d * sparsity))
    assert (result.weight[~result.keep] == 0).all()
    assert torch.equal(result.weight[result.keep], weight[result.keep])
    assert result.stats.sparsity == pytest.approx(float(pruned.sum()) / weight.numel())
    check_mask(result.keep, parse_pattern("unstructured", sparsity), scope)


@pytest.mark.parametrize("mask", ["magnitude", "wanda", "sparsegpt", "sparsegpt-rowwise"])
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_nm_groups_are_exact(mask, pattern):
    weight = torch.randn(24, 128, generator=torch.Generator().manual_seed(3))
    hessian = correlated_hessian(128, seed=1, outlier_scale=10.0).float()
    n, m = map(int, pattern.split(":"))
    update = "sparsegpt" if mask.startswith("sparsegpt") else "optima"
    result = prune_weight(weight, hessian, PruneConfig(pattern=pattern, sparsity=None, mask=mask, update=update))
    groups = result.keep.reshape(24, 128 // m, m)
    assert (groups.sum(-1) == n).all()                                  # exactly N kept in every group
    assert (result.weight[~result.keep] == 0).all()
    assert ((result.weight.reshape(24, -1, m) != 0).sum(-1) <= n).all()
    assert result.stats.sparsity >= 1 - n / m
    check_mask(result.keep, parse_pattern(pattern, None))
    if mask == "magnitude":  # within each group the smallest |w| go
        assert lowest_are_pruned(weight.abs().reshape(24, -1, m), groups)
    if mask == "sparsegpt-rowwise":  # N:M has one rule: the row-wise variant is the same selector
        reference = prune_weight(weight, hessian, PruneConfig(pattern=pattern, sparsity=None, mask="sparsegpt",
                                                              update=update))
        assert torch.equal(result.keep, reference.keep) and torch.equal(result.weight, reference.weight)


def test_wanda_scores_are_weight_times_input_norm():
    g = torch.Generator().manual_seed(2)
    weight = torch.randn(16, 96, generator=g)
    x = torch.randn(300, 96, generator=g) * torch.logspace(-2, 2, 96)  # column norms over 4 decades
    x[:, 5] = 0.0                                                       # a dead input scores 0
    expected = weight.abs() * x.norm(dim=0)
    scores = wanda_scores(weight, column_norms(x.T @ x))
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=0.0)
    assert (scores[:, 5] == 0).all()
    result = prune_weight(weight, x.T @ x, PruneConfig(mask="wanda", update="none"))
    assert lowest_are_pruned(expected, result.keep)
    assert not result.keep[:, 5].any()
    assert torch.equal(result.keep, mask_from_scores(expected, parse_pattern("unstructured", 0.5)))


@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.5), ("unstructured", 0.8), ("2:4", None)])
def test_magnitude_prunes_the_smallest_weights(layer, pattern, sparsity):
    weight, hessian = layer
    d = weight.shape[1] // 4 * 4   # N:M needs d divisible by M
    weight, hessian = weight[:, :d], hessian[:d, :d]
    result = prune_weight(weight, hessian, PruneConfig(pattern=pattern, sparsity=sparsity, mask="magnitude",
                                                       update="none"))
    groups = weight.numel() if pattern == "unstructured" else 4   # one threshold over the whole layer
    assert lowest_are_pruned(weight.abs().reshape(-1, groups), result.keep.reshape(-1, groups))
    if pattern == "unstructured":
        assert int((~result.keep).sum()) == int(weight.numel() * sparsity)
    torch.testing.assert_close(magnitude_scores(weight), weight.abs())


def test_sparsegpt_mask_uses_obs_saliency_in_its_first_block():
    """The first block's mask is chosen before any update: lowest w^2 / [chol(H^-1)]_jj^2 go,
    over the whole block (one threshold for all rows), or within each row for the row-wise variant."""
    weight = torch.randn(12, 64, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    hessian = correlated_hessian(64, dead=0, seed=5, outlier_scale=10.0)
    pattern = parse_pattern("unstructured", 0.5)
    _, keep, damping = sparsegpt(weight, hessian, pattern, mask_block=64, damp=0.01)
    damped = hessian + damping.value * torch.eye(64, dtype=torch.float64)
    upper = torch.linalg.cholesky(torch.linalg.inv(damped), upper=True)
    saliency = weight.pow(2) / upper.diagonal().pow(2)
    assert lowest_are_pruned(saliency.reshape(1, -1), keep.reshape(1, -1))
    assert int((~keep).sum()) == 12 * 32 and (~keep).sum(1).unique().numel() > 1
    _, keep_rows, _ = sparsegpt_rowwise(weight, hessian, pattern, mask_block=64, damp=0.01)
    assert lowest_are_pruned(saliency, keep_rows)
    assert ((~keep_rows).sum(1) == 32).all()


def test_sparsegpt_update_beats_no_update_on_its_mask(layer):
    weight, hessian = layer
    updated, keep, damping = sparsegpt(weight, hessian, parse_pattern("unstructured", 0.5))
    assert damping.dead_inputs == 1
    none = prune_weight(weight, hessian, PruneConfig(mask="sparsegpt", update="none"))
    ours = prune_weight(weight, hessian, PruneConfig(mask="sparsegpt", update="sparsegpt"))
    assert torch.equal(none.keep, keep) and torch.equal(ours.keep, keep)
    assert ours.stats.objective < none.stats.objective
    torch.testing.assert_close(ours.weight, updated)


@pytest.mark.parametrize("pattern,sparsity,scope", [("unstructured", 0.5, "block"), ("unstructured", 0.5, "row"),
                                                    ("2:4", None, "block")])
def test_sparsegpt_update_matches_sequential_obs_reference(pattern, sparsity, scope):
    """Column by column, a pruned weight's error goes only into the columns to its right, through
    the inverse of H restricted to the columns not yet visited (OBS, written without Cholesky)."""
    d = 64
    weight = torch.randn(8, d, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    hessian = correlated_hessian(d, dead=0, seed=7, outlier_scale=10.0, decay=1e-2)
    updated, keep, damping = sparsegpt(weight, hessian, parse_pattern(pattern, sparsity), mask_block=16, damp=0.01,
                                       scope=scope)
    damped = hessian + damping.value * torch.eye(d, dtype=torch.float64)
    expected = weight.clone()
    for j in range(d):
        hinv = torch.linalg.inv(damped[j:, j:])
        err = torch.where(keep[:, j], 0.0, expected[:, j] / hinv[0, 0])
        expected[:, j:] -= err[:, None] * hinv[0][None, :]
    assert (expected[~keep].abs() < 1e-9).all()
    torch.testing.assert_close(updated, expected * keep, rtol=1e-8, atol=1e-10)
    if pattern == "2:4":  # lazy batching is exact: the block size changes nothing
        again, keep_again, _ = sparsegpt(weight, hessian, parse_pattern(pattern, sparsity), mask_block=64)
        assert torch.equal(keep_again, keep)
        torch.testing.assert_close(again, updated, rtol=1e-10, atol=1e-12)


def test_parse_pattern_and_counts():
    assert parse_pattern("2:4", None) == Pattern(0.5, 2, 4) == parse_pattern(" 2 : 4 ", 0.5)
    assert parse_pattern("1:4", 0.75).pruned_per_row(64) == 48
    assert parse_pattern("unstructured", 0.3).pruned_per_row(257) == int(0.3 * 257) == 77
    assert parse_pattern("unstructured", 0.7).pruned_per_row(5) == 3          # floored like Wanda: int(3.5)
    assert parse_pattern("unstructured", 0.3).pruned_count(3 * 257) == 231
    assert parse_pattern("unstructured", 0.3).pruned_per_block(3, 257, 128) == [115, 115, 1]   # sums to 231
    assert parse_pattern("unstructured", 0.5).pruned_per_block(1, 10, 4) == [2, 2, 1]
    assert not parse_pattern("unstructured", 0.3).structured and parse_pattern("4:8", None).structured
    for bad, sparsity in [("2:4:8", None), ("a:b", None), ("", None), ("4:4", None), (None, 0.5),
                          ("2:4", 0.6), ("unstructured", None), ("unstructured", float("nan"))]:
        with pytest.raises(ValueError):
            parse_pattern(bad, sparsity)
    with pytest.raises(ValueError, match="divisible by 8"):
        parse_pattern("4:8", None).check(20)


def test_check_mask_catches_broken_masks():
    pattern = parse_pattern("2:4", None)
    keep = torch.tensor([[True, True, False, False, True, False, True, False]])
    check_mask(keep, pattern)
    with pytest.raises(AssertionError, match="2:4"):
        check_mask(torch.tensor([[True, True, True, False, True, False, True, False]]), pattern)
    half = parse_pattern("unstructured", 0.5)
    uneven = torch.tensor([[False, False, True, True], [True, True, True, False]])   # 3 of 8 pruned
    with pytest.raises(AssertionError, match="in every row"):
        check_mask(torch.tensor([[True, False], [True, True]]), half)
    with pytest.raises(AssertionError, match="in every row"):
        check_mask(uneven, half, "row")
    with pytest.raises(AssertionError, match="prunes 3 weights, not 4"):
        check_mask(uneven, half, "layer")
    check_mask(uneven & torch.tensor([[True, True, True, True], [True, True, False, True]]), half, "layer")
    balanced = torch.tensor([[False, False, True, True], [False, True, False, True]])  # blocks of 2: 3 and 1
    with pytest.raises(AssertionError, match=r"\[3, 1\] weights per block of 2 columns, not \[2, 2\]"):
        check_mask(balanced, half, "block", mask_block=2)
    check_mask(balanced, half, "block", mask_block=4)
    check_mask(balanced, half, "layer")
    with pytest.raises(ValueError, match="unknown scope"):
        check_mask(balanced, half, "column")


def test_every_selector_is_either_a_score_or_a_greedy_selector_with_a_scope():
    from optima.prune import GREEDY_SELECTORS

    assert sorted([*SCORES, *GREEDY_SELECTORS]) == sorted(MASK_SELECTORS) == sorted(MASK_SCOPES)
