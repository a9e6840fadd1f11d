"""The selectors named after published methods follow their reference code's rule.

Each rule is re-implemented here from the papers' algorithms, as plainly as possible
(column loops, sorts, the OBS inverse-Hessian elimination, float64), and compared with
the toolkit; only the damping of H is shared (``damp_hessian``, not a rule under test):

- SparseGPT (IST-DASLab/sparsegpt ``fasterprune``): columns visited left to right; at
  the start of each block of 128 columns, ONE threshold over all rows of the block on
  the OBS saliency w^2 / [inv(H[j:, j:])]_00 of the weights as updated so far; every
  pruned weight's error goes into the columns to its right (sequential OBS). N:M: the
  M - N lowest of each group of M in a row, chosen when the group is reached.
- Magnitude (locuslab/wanda ``prune_magnitude``): one threshold on |W| over the layer.
- Wanda (locuslab/wanda ``prune_wanda``): |W| * ||X_col|| compared within each row,
  int(d_in * sparsity) pruned per row.

Counts are the toolkit's exact ones: int(n * sparsity) lowest (the reference's
``<= sorted[int(n * sparsity)]`` prunes one more, ties aside); a block [i1, i2) of
SparseGPT prunes int(rows * i2 * s) - int(rows * i1 * s), so the layer total is exact.
"""

from __future__ import annotations

import pytest
import torch

from conftest import correlated_hessian, exact_update
from optima import SolverOptions, prune_weight
from optima.config import PruneConfig
from optima.hessian import damp_hessian

F64 = SolverOptions(dtype="float64", compile=False)
SHAPES = [(24, 200), (12, 384)]           # 200: a last block of 72 columns; 384: three full blocks
DAMP = 0.01


def layer(rows: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A float64 weight and a correlated, ill-conditioned Hessian with outliers and one dead input."""
    weight = torch.randn(rows, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return weight, correlated_hessian(d, seed=seed + 1, outlier_scale=10.0, decay=1e-2)


def prune_below_threshold(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Pruned-mask of the entries at or below the ``count``-th smallest score (one threshold for all)."""
    if count == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    threshold = torch.sort(scores.flatten()).values[count - 1]
    return scores <= threshold


def nm_pruned(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Pruned-mask of the m - n smallest scores in each group of m consecutive entries of each row."""
    groups = scores.reshape(scores.shape[0], -1, m)
    thresholds = torch.sort(groups, dim=-1).values[..., m - n - 1: m - n]
    return (groups <= thresholds).reshape(scores.shape)


def obs_inverse_rows(h: torch.Tensor) -> list[torch.Tensor]:
    """Row j of inv(H[j:, j:]) for every j: eliminate columns one by one from H^-1 (OBS)."""
    hinv = torch.linalg.inv(h)
    rows = []
    for j in range(h.shape[0]):
        rows.append(hinv[j, j:].clone())
        hinv = hinv - torch.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
    return rows


def reference_sparsegpt(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float | None = None,
                        nm: tuple[int, int] | None = None, rowwise: bool = False,
                        blocksize: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequential OBS with SparseGPT's selection; returns (updated weight, keep)."""
    h = damp_hessian(hessian, DAMP)[0]
    rows, d = weight.shape
    w = weight.clone()
    pruned = torch.zeros(rows, d, dtype=torch.bool)
    hinv_first = obs_inverse_rows(h)
    diag = torch.stack([row[0] for row in hinv_first])
    for j in range(d):
        if nm is None and j % blocksize == 0:
            i1, i2 = j, min(j + blocksize, d)
            saliency = w[:, i1:i2] ** 2 / diag[i1:i2]
            if rowwise:
                count = int(i2 * sparsity) - int(i1 * sparsity)
                pruned[:, i1:i2] = torch.stack([prune_below_threshold(s, count) for s in saliency])
            else:
                count = int(rows * i2 * sparsity) - int(rows * i1 * sparsity)
                pruned[:, i1:i2] = prune_below_threshold(saliency, count)
        if nm is not None and j % nm[1] == 0:
            saliency = w[:, j:j + nm[1]] ** 2 / diag[j:j + nm[1]]
            pruned[:, j:j + nm[1]] = nm_pruned(saliency, *nm)
        err = torch.where(pruned[:, j], w[:, j] / hinv_first[j][0], 0.0)
        w[:, j:] -= err[:, None] * hinv_first[j][None, :]
    return w * ~pruned, ~pruned


def reference_magnitude(weight: torch.Tensor, sparsity: float | None = None,
                        nm: tuple[int, int] | None = None) -> torch.Tensor:
    """Keep-mask: |W| against one threshold for the layer, or per N:M group."""
    if nm is not None:
        return ~nm_pruned(weight.abs(), *nm)
    return ~prune_below_threshold(weight.abs(), int(weight.numel() * sparsity))


def reference_wanda(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float | None = None,
                    nm: tuple[int, int] | None = None) -> torch.Tensor:
    """Keep-mask: |W| * ||X_col|| (= sqrt(diag H)) compared within each row, or per N:M group."""
    metric = weight.abs() * hessian.diagonal().sqrt()
    if nm is not None:
        return ~nm_pruned(metric, *nm)
    count = int(weight.shape[1] * sparsity)
    return ~torch.stack([prune_below_threshold(row, count) for row in metric])


def pattern_args(pattern: str) -> dict:
    return {"sparsity": float(pattern)} if pattern[0] == "0" else {"nm": tuple(map(int, pattern.split(":")))}


def toolkit_args(pattern: str) -> dict:
    return {"sparsity": float(pattern)} if pattern[0] == "0" else {"pattern": pattern, "sparsity": None}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("pattern", ["0.5", "0.7", "2:4", "4:8"])
def test_sparsegpt_follows_the_reference_rule(shape, pattern):
    weight, hessian = layer(*shape, seed=shape[1])
    expected, keep = reference_sparsegpt(weight, hessian, **pattern_args(pattern))
    ours = prune_weight(weight, hessian, PruneConfig(mask="sparsegpt", update="sparsegpt", damp=DAMP, solver=F64,
                                                     **toolkit_args(pattern)))
    assert torch.equal(ours.keep, keep)
    torch.testing.assert_close(ours.weight, expected, rtol=1e-6, atol=1e-8)
    if pattern[0] == "0":  # one threshold per block: the rows differ, the layer total is exact
        assert (~keep).sum(1).unique().numel() > 1
        assert int((~keep).sum()) == int(weight.numel() * float(pattern))


@pytest.mark.parametrize("shape", [(16, 257)], ids=["16x257"])
def test_sparsegpt_rowwise_keeps_its_per_row_rule(shape):
    weight, hessian = layer(*shape, seed=shape[1])
    expected, keep = reference_sparsegpt(weight, hessian, sparsity=0.6, rowwise=True)
    ours = prune_weight(weight, hessian, PruneConfig(sparsity=0.6, mask="sparsegpt-rowwise", update="sparsegpt",
                                                     damp=DAMP, solver=F64))
    assert torch.equal(ours.keep, keep)
    assert ((~keep).sum(1) == int(257 * 0.6)).all()
    torch.testing.assert_close(ours.weight, expected, rtol=1e-6, atol=1e-8)
    block_rule = prune_weight(weight, hessian, PruneConfig(sparsity=0.6, mask="sparsegpt", update="none", solver=F64))
    assert not torch.equal(block_rule.keep, keep)


@pytest.mark.parametrize("shape,pattern", [(s, p) for s in SHAPES for p in ("0.5", "0.7", "2:4", "4:8")]
                         + [((16, 257), "0.5"), ((16, 257), "0.7")], ids=lambda v: v if isinstance(v, str) else
                         f"{v[0]}x{v[1]}")
@pytest.mark.parametrize("mask", ["magnitude", "wanda"])
def test_score_selectors_follow_the_reference_rule(shape, pattern, mask):
    weight, hessian = layer(*shape, seed=shape[1] + 7)
    args = pattern_args(pattern)
    keep = reference_magnitude(weight, **args) if mask == "magnitude" else reference_wanda(weight, hessian, **args)
    ours = prune_weight(weight, hessian, PruneConfig(mask=mask, update="none", solver=F64, **toolkit_args(pattern)))
    assert torch.equal(ours.keep, keep)
    if mask == "magnitude" and pattern[0] == "0":
        assert (~keep).sum(1).unique().numel() > 1      # one layer threshold: rows differ


@pytest.mark.parametrize("method", ["pcg", "direct"])
@pytest.mark.parametrize("mask,sparsity", [("sparsegpt", 0.5), ("magnitude", 0.3), ("magnitude", 0.7)])
def test_optima_update_is_exact_on_unevenly_pruned_rows(mask, sparsity, method):
    """Rows with different kept counts: both solver paths reach the float64 per-row optimum."""
    weight, hessian = layer(24, 200, seed=11)
    # weights within 1e-6 of the optimum: CG stops on the residual (the gap rule bounds the objective instead)
    options = SolverOptions(method=method, dtype="float64", tol=1e-12, stop="residual", compile=False)
    result = prune_weight(weight, hessian, PruneConfig(sparsity=sparsity, mask=mask, update="optima", damp=DAMP,
                                                       solver=options))
    counts = (~result.keep).sum(1)
    assert counts.unique().numel() > 1 and int(counts.sum()) == int(weight.numel() * sparsity)
    assert result.stats.solver_method == method and not result.stats.fell_back_to_none
    best = exact_update(weight, hessian, result.keep, DAMP)
    torch.testing.assert_close(result.weight, best, rtol=0.0, atol=1e-6)
