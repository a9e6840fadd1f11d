"""The OPTIMA update is the exact per-row optimum: checked against float64 least squares."""

from __future__ import annotations

import pytest
import torch

from conftest import correlated_hessian
from optima import SolverOptions, damp_hessian, prune_weight, reconstruction_objective, solve_box_qp
from optima.solver import solve_pinned

DAMP = 0.01


def exact_update(weight: torch.Tensor, hessian: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Per-row float64 optimum: w'_P = 0, H_KK w'_K = H_KK w_K + H_KP w_P (damped H)."""
    h, _ = damp_hessian(hessian.double(), DAMP)
    out = torch.zeros_like(weight, dtype=torch.float64)
    for r in range(weight.shape[0]):
        k, w = keep[r], weight[r].double()
        out[r, k] = torch.linalg.solve(h[k][:, k], h[k] @ w)
    return out


def damped_objective(new: torch.Tensor, weight: torch.Tensor, hessian: torch.Tensor) -> float:
    return reconstruction_objective(new, weight, damp_hessian(hessian.double(), DAMP)[0])


def optima(weight, hessian, method="direct", preconditioner="hinv", dtype=torch.float64, **kw):
    options = SolverOptions(method=method, preconditioner=preconditioner, dtype=dtype, compile=False)
    return prune_weight(weight, hessian, damp=DAMP, solver_options=options, **kw)


@pytest.mark.parametrize("d", [64, 257, 512])
@pytest.mark.parametrize("method,preconditioner", [("direct", "hinv"), ("pcg", "hinv"), ("pcg", "jacobi")])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 1e-4)])
def test_matches_exact_optimum_on_hard_random_hessians(d, method, preconditioner, dtype, tol):
    hessian = correlated_hessian(d, seed=d)
    weight = torch.randn(24, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    result = optima(weight, hessian, method, preconditioner, dtype, mask="wanda")
    reference = exact_update(weight, hessian, result.keep)
    best = damped_objective(reference, weight, hessian)
    got = damped_objective(result.weight, weight, hessian)
    assert abs(got - best) <= tol * best
    assert result.stats.solver_method == method
    assert result.stats.dead_inputs == 1
    assert (result.weight[~result.keep] == 0).all()


@pytest.mark.parametrize("method", ["direct", "pcg"])
def test_real_minilm_layers_exact_and_never_worse(minilm_layers, method):
    for name, (weight, hessian) in minilm_layers.items():
        w = weight[:48]
        sgpt = prune_weight(w, hessian, mask="sparsegpt", update="sparsegpt", damp=DAMP)
        ours = optima(w, hessian, method, dtype=torch.float32, mask="sparsegpt")
        assert torch.equal(ours.keep, sgpt.keep), name
        best = damped_objective(exact_update(w, hessian, ours.keep), w, hessian)
        got = damped_objective(ours.weight, w, hessian)
        assert abs(got - best) <= 1e-4 * best, name
        assert got <= damped_objective(sgpt.weight, w, hessian), name
        assert got <= damped_objective(w * ours.keep, w, hessian), name
        # the undamped (true) reconstruction error improves on SparseGPT's too
        assert ours.stats.objective < sgpt.stats.objective < sgpt.stats.objective_none, name
        assert ours.stats.unconverged_rows == 0 and ours.stats.kkt_residual_max < 1e-3


def test_wanda_and_magnitude_masks_on_real_layer_improve(minilm_layers):
    weight, hessian = minilm_layers["encoder.layer.0.attention.self.query"]
    for mask in ("magnitude", "wanda"):
        none = prune_weight(weight, hessian, mask=mask, update="none")
        ours = optima(weight, hessian, dtype=torch.float32, mask=mask)
        assert torch.equal(none.keep, ours.keep)
        assert ours.stats.objective < 0.8 * none.stats.objective
        assert none.stats.objective == pytest.approx(ours.stats.objective_none)


def test_compiled_and_eager_solver_agree():
    hessian = correlated_hessian(64, seed=3).float()
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    runs = {}
    for compile in (False, True):
        options = SolverOptions(method="pcg", compile=compile)
        runs[compile] = prune_weight(weight, hessian, solver_options=options)
    torch.testing.assert_close(runs[True].weight, runs[False].weight, rtol=1e-5, atol=1e-6)
    assert runs[True].stats.cg_iterations_mean > 0


def test_nm_patterns_solve_exactly():
    hessian = correlated_hessian(128, seed=5)
    weight = torch.randn(8, 128, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for pattern in ("2:4", "4:8"):
        result = optima(weight, hessian, "pcg", mask="wanda", pattern=pattern)
        best = damped_objective(exact_update(weight, hessian, result.keep), weight, hessian)
        assert damped_objective(result.weight, weight, hessian) == pytest.approx(best, rel=1e-6)


def test_general_box_bounds_reach_a_kkt_point():
    g = torch.Generator().manual_seed(4)
    d, rows = 12, 6
    hessian, _ = damp_hessian(correlated_hessian(d, dead=0, seed=6), DAMP)
    center = torch.randn(rows, d, generator=g, dtype=torch.float64)
    lower, upper = center - 0.3, center + 0.3
    lower[:, :2] = upper[:, :2]  # pinned entries too
    result = solve_box_qp(hessian, lower, upper, SolverOptions(dtype=torch.float64, compile=False))
    x = result.delta
    assert ((x >= lower - 1e-12) & (x <= upper + 1e-12)).all()
    grad = x @ hessian
    free = (x > lower + 1e-9) & (x < upper - 1e-9)
    assert grad[free].abs().max() < 1e-6 * grad.abs().max()
    assert (grad[(x <= lower + 1e-9) & ~free & (lower < upper)] >= -1e-6).all()   # at lower: may only rise
    assert (grad[(x >= upper - 1e-9) & ~free & (lower < upper)] <= 1e-6).all()    # at upper: may only fall
    assert (result.kkt_residual < 1e-6).all() and result.newton_iterations > 1
    # compare with a long projected-gradient run (float64): same optimum
    y = torch.zeros_like(center).clamp(lower, upper)
    step = 1.0 / torch.linalg.eigvalsh(hessian).max()
    for _ in range(20000):
        y = (y - step * (y @ hessian)).clamp(lower, upper)
    f = lambda v: 0.5 * (v * (v @ hessian)).sum(1)  # noqa: E731
    assert (f(x) <= f(y) + 1e-10).all()


def test_dead_inputs_and_rank_deficiency_stay_finite():
    hessian = correlated_hessian(96, tokens=40, dead=5, seed=7)  # 40 tokens < 96 inputs
    weight = torch.randn(16, 96, generator=torch.Generator().manual_seed(5))
    for method in ("direct", "pcg"):
        for damp in (0.01, 0.0):
            result = prune_weight(weight, hessian, damp=damp,
                                  solver_options=SolverOptions(method=method, compile=False))
            assert torch.isfinite(result.weight).all()
            assert result.stats.dead_inputs == 5
            assert result.stats.objective <= result.stats.objective_none
            assert any("dead inputs" in note for note in result.stats.notes)
            dead = slice(91, 96)
            kept_dead = result.keep[:, dead]
            assert torch.equal(result.weight[:, dead][kept_dead], weight[:, dead][kept_dead])  # left unchanged


def test_damp_zero_on_full_rank_hessian_is_exact():
    hessian = correlated_hessian(48, dead=0, seed=8)
    weight = torch.randn(8, 48, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    result = prune_weight(weight, hessian, damp=0.0,
                          solver_options=SolverOptions(method="direct", dtype=torch.float64, compile=False))
    h = hessian
    for r in range(8):
        k = result.keep[r]
        grad = (result.weight[r] - weight[r]) @ h
        assert grad[k].abs().max() < 1e-8 * (weight[r] @ h).abs().max()


def test_bf16_weight_keeps_dtype_and_exact_zeros():
    hessian = correlated_hessian(64, seed=9).float()
    weight = torch.randn(32, 64).to(torch.bfloat16)
    result = prune_weight(weight, hessian, pattern="2:4", solver_options=SolverOptions(compile=False))
    assert result.weight.dtype == torch.bfloat16
    assert (result.weight[~result.keep] == 0).all()
    assert result.stats.objective < result.stats.objective_none


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
    assert torch.equal(result.weight, weight * result.keep)
    assert result.stats.objective == result.stats.objective_none


def test_rows_with_different_kept_counts_batch_together():
    hessian, damping = damp_hessian(correlated_hessian(80, seed=11), DAMP)
    weight = torch.randn(10, 80, dtype=torch.float64)
    keep = torch.rand(10, 80, generator=torch.Generator().manual_seed(7)) > 0.4
    deltas = {}
    for method in ("direct", "pcg"):
        result = solve_pinned(hessian, weight, keep, damping,
                              SolverOptions(method=method, dtype=torch.float64, compile=False))
        assert result.converged.all() and (result.kkt_residual < 1e-5).all()
        assert ((weight + result.delta)[~keep] == 0).all()
        deltas[method] = result.delta
    for r in range(10):  # each row against its own float64 solve
        k = keep[r]
        expected = torch.linalg.solve(hessian[k][:, k], hessian[k][:, ~k] @ weight[r, ~k])
        torch.testing.assert_close(deltas["direct"][r, k], expected, rtol=1e-9, atol=1e-10)
        # CG stops at a 1e-6 relative residual: the error is small in norm, not entry by entry
        assert torch.linalg.vector_norm(deltas["pcg"][r, k] - expected) <= 1e-4 * torch.linalg.vector_norm(expected)
