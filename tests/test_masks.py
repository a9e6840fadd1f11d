"""Mask selectors and patterns: exact counts, exact N:M groups, the scores they claim."""

from __future__ import annotations

import pytest
import torch

from conftest import correlated_hessian
from optima import parse_pattern, prune_weight
from optima.masks import check_mask, magnitude_scores, mask_from_scores, wanda_scores
from optima.sparsegpt import sparsegpt


@pytest.fixture
def layer():
    g = torch.Generator().manual_seed(0)
    return torch.randn(24, 128, generator=g), correlated_hessian(128, seed=1).float()


@pytest.mark.parametrize("mask", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.6])
def test_unstructured_prunes_the_same_count_in_every_row(layer, mask, sparsity):
    weight, hessian = layer
    result = prune_weight(weight, hessian, sparsity=sparsity, mask=mask, update="none")
    assert ((~result.keep).sum(1) == round(sparsity * 128)).all()
    assert (result.weight[~result.keep] == 0).all()
    assert torch.equal(result.weight[result.keep], weight[result.keep])
    assert result.stats.sparsity == pytest.approx(round(sparsity * 128) / 128)


@pytest.mark.parametrize("mask", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_nm_groups_are_exact(layer, mask, pattern):
    weight, hessian = layer
    n, m = map(int, pattern.split(":"))
    result = prune_weight(weight, hessian, pattern=pattern, mask=mask, update="optima" if mask != "sparsegpt"
                          else "sparsegpt")
    groups = result.keep.reshape(24, 128 // m, m)
    assert (groups.sum(-1) == n).all()
    assert ((result.weight.reshape(24, -1, m) != 0).sum(-1) <= n).all()
    check_mask(result.keep, parse_pattern(pattern, None))


def test_wanda_scores_are_weight_times_input_norm(layer):
    weight, hessian = layer
    x = torch.randn(300, 128, generator=torch.Generator().manual_seed(2))
    h = x.T @ x
    expected = weight.abs() * x.norm(dim=0)
    torch.testing.assert_close(wanda_scores(weight, h), expected, rtol=1e-5, atol=1e-6)
    keep = mask_from_scores(expected, parse_pattern("unstructured", 0.5))
    pruned_max = (expected * ~keep).max(1).values
    kept_min = expected.masked_fill(~keep, float("inf")).min(1).values
    assert (pruned_max <= kept_min).all()


def test_magnitude_prunes_the_smallest_weights(layer):
    weight, hessian = layer
    keep = prune_weight(weight, hessian, mask="magnitude", update="none").keep
    assert ((weight.abs() * ~keep).max(1).values <= weight.abs().masked_fill(~keep, float("inf")).min(1).values).all()
    torch.testing.assert_close(magnitude_scores(weight), weight.abs())


def test_sparsegpt_update_beats_no_update_on_its_mask(layer):
    weight, hessian = layer
    updated, keep, damping = sparsegpt(weight, hessian, parse_pattern("unstructured", 0.5))
    assert damping.dead_inputs == 1
    none = prune_weight(weight, hessian, mask="sparsegpt", update="none")
    ours = prune_weight(weight, hessian, mask="sparsegpt", update="sparsegpt")
    assert torch.equal(none.keep, keep) and torch.equal(ours.keep, keep)
    assert ours.stats.objective < none.stats.objective
    torch.testing.assert_close(ours.weight, updated)


@pytest.mark.parametrize("kwargs,match", [
    ({"sparsity": 0.0}, "sparsity must be in"),
    ({"sparsity": 1.0}, "sparsity must be in"),
    ({"sparsity": 1.5}, "sparsity must be in"),
    ({"pattern": "banana"}, "unknown pattern"),
    ({"pattern": "4:2"}, "0 < N < M"),
    ({"pattern": "1:4"}, "implies sparsity 0.75"),
    ({"pattern": "2:3", "sparsity": None}, "divisible by 3"),
    ({"mask": "random"}, "unknown mask selector"),
    ({"update": "magic"}, "unknown update"),
    ({"mask": "wanda", "update": "sparsegpt"}, "needs mask='sparsegpt'"),
])
def test_bad_options_are_rejected(layer, kwargs, match):
    weight, hessian = layer
    with pytest.raises(ValueError, match=match):
        prune_weight(weight, hessian, **kwargs)


def test_bad_tensors_are_rejected(layer):
    weight, hessian = layer
    with pytest.raises(ValueError, match="does not match"):
        prune_weight(weight, hessian[:64, :64])
    bad = hessian.clone()
    bad[3, 3] = float("nan")
    with pytest.raises(FloatingPointError, match="Hessian"):
        prune_weight(weight, bad)
    bad = weight.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="weight"):
        prune_weight(bad, hessian)
