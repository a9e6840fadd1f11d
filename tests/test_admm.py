"""ADMM (Boza 2024): its fixed point is the exact optimum of its mask, its masks follow the pattern and its
schedule, and prune_weight runs it alone and under OPTIMA."""

from __future__ import annotations

import pytest
import torch

from conftest import correlated_hessian
from optima import SolverOptions, prune_weight
from optima.admm import _mask, admm
from optima.config import OptionError, PruneConfig
from optima.masks import check_mask, parse_pattern, wanda_mask
from optima.prune import reconstruction_objective


def jacobi_damped_optimum(weight: torch.Tensor, hessian: torch.Tensor, keep: torch.Tensor, damp: float) -> torch.Tensor:
    """Per-row float64 optimum of (w' - w)^T (H + c diag H) (w' - w) with w'_P = 0, c = damp * mean(diag of the
    unit-diagonal H): the problem ADMM's iteration converges to for a fixed mask."""
    h = hessian.double()
    norm = h.diagonal().sqrt() + 1e-8
    c = damp * (h / norm[:, None] / norm[None, :]).diagonal().mean()
    h = h + torch.diag(c * norm ** 2)
    out = torch.zeros(weight.shape, dtype=torch.float64)
    for r in range(weight.shape[0]):
        k = keep[r]
        out[r, k] = torch.linalg.solve(h[k][:, k], h[k] @ weight[r].double())
    return out


def test_with_its_mask_fixed_admm_reaches_the_exact_optimum_of_that_mask() -> None:
    h = correlated_hessian(48, outliers=2, dead=0, seed=3)
    w = torch.randn(12, 48, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    new, keep, _ = admm(w, h, parse_pattern("unstructured", 0.5), iterations=100, mask_iterations=1)
    exact = jacobi_damped_optimum(w, h, keep, 0.1)
    assert torch.equal(new == 0, ~keep)
    assert (new - exact).norm() <= 1e-6 * exact.norm()


@pytest.mark.parametrize("spec", ["unstructured", "2:4", "4:8"])
def test_masks_follow_the_pattern_and_pruned_weights_are_zero(spec: str) -> None:
    h = correlated_hessian(64, seed=0).float()
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    pattern = parse_pattern(spec, 0.6 if spec == "unstructured" else None)
    new, keep, damping = admm(w, h, pattern)
    assert new.dtype == h.dtype and bool((new[~keep] == 0).all()) and torch.isfinite(new).all()
    check_mask(keep, pattern, scope="layer")
    if not pattern.structured:
        assert int((~keep).sum()) == int(w.numel() * 0.6)
    assert damping.frac == 0.1 and damping.dead_inputs == 1


def test_n_m_schedule_prunes_gradually_and_never_a_groups_largest() -> None:
    score = torch.rand(8, 32, generator=torch.Generator().manual_seed(0))
    pattern = parse_pattern("2:4", None)
    groups = score.reshape(8, 8, 4)
    largest = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(2, -1).indices, True).reshape(8, 32)
    pruned = []
    for step in range(15):
        keep = _mask(score, pattern, step, 15)
        assert bool(keep[largest].all())
        pruned.append(int((~keep).sum()))
    fractions = [0.5 * (1 - (1 - (t + 1) / 15) ** 3) for t in range(15)]
    assert pruned == [int(score.numel() * f) for f in fractions]
    assert pruned == sorted(pruned) and pruned[-1] == score.numel() // 2


@pytest.mark.parametrize("spec", ["unstructured", "2:4"])
def test_admm_beats_wanda_without_update_and_the_exact_solve_of_its_mask_beats_admm(spec: str) -> None:
    h = correlated_hessian(96, outliers=3, seed=5)
    w = torch.randn(24, 96, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    pattern = parse_pattern(spec, 0.5 if spec == "unstructured" else None)
    new, keep, _ = admm(w, h, pattern)
    wanda = w * wanda_mask(w, h, pattern)
    exact = jacobi_damped_optimum(w, h, keep, 1e-12)
    assert reconstruction_objective(new, w, h) < 0.7 * reconstruction_objective(wanda, w, h)
    assert reconstruction_objective(exact, w, h) <= reconstruction_objective(new, w, h)


def test_bad_options_are_refused() -> None:
    h, w = torch.eye(8), torch.ones(2, 8)
    pattern = parse_pattern("unstructured", 0.5)
    with pytest.raises(ValueError, match="mask_iterations"):
        admm(w, h, pattern, iterations=5, mask_iterations=6)
    with pytest.raises(ValueError, match="rho"):
        admm(w, h, pattern, rho=0.0)


@pytest.mark.parametrize("spec", ["unstructured", "2:4"])
def test_prune_weight_runs_admm_alone_and_optima_on_its_mask(spec: str) -> None:
    h = correlated_hessian(64, seed=7)
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    pattern = {"pattern": spec, "sparsity": 0.5 if spec == "unstructured" else None}
    direct = SolverOptions(method="direct", dtype="float64", compile=False)
    own = prune_weight(w, h, PruneConfig(mask="admm", update="admm", solver=direct, **pattern))  # float64
    # next to no damping, OPTIMA's optimum of ADMM's mask is the undamped one the objective measures
    exact = prune_weight(w, h, PruneConfig(mask="admm", update="optima", solver=direct, damp=1e-9, **pattern))
    alone, keep, _ = admm(w, h, parse_pattern(spec, pattern["sparsity"]))
    assert torch.equal(own.keep, keep) and torch.equal(exact.keep, keep)
    torch.testing.assert_close(own.weight, alone)
    assert exact.stats.objective < own.stats.objective < own.stats.objective_none
    assert not any("raised" in note for note in own.stats.notes)  # its own damping is no escalation


def test_admm_update_needs_the_admm_mask_and_its_damping_is_checked() -> None:
    with pytest.raises(OptionError, match="mask='admm'"):
        PruneConfig(mask="wanda", update="admm")
    with pytest.raises(OptionError, match="admm_damp"):
        PruneConfig(mask="admm", update="admm", admm_damp=-1.0)
