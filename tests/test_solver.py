"""The OPTIMA update is the exact per-row optimum: checked against float64 least squares.

References are computed here independently: per row, ``torch.linalg.solve`` of the damped
``H_KK`` system in float64 (``conftest.exact_update``). Objectives are measured with the
damped Hessian, the problem OPTIMA solves exactly.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch

import optima.cg as cg_module
import optima.solver as solver_module
from conftest import correlated_hessian, damped_objective, exact_update
from optima import SolverOptions, damp_hessian, prune_weight, solve_box_qp
from optima.block_ldl import keep_rate_order
from optima.config import OptionError, PruneConfig
from optima.solver import choose_method, solve_pinned

DAMP = 0.01
CONFIGS = [("direct", "ldl")] + [("pcg", p) for p in ("ldl", "hinv", "jacobi")]  # direct ignores the preconditioner
DTYPES = [(torch.float64, 1e-6), (torch.float32, 1e-4)]
KINDS = {  # x100 outliers (as in LLM activations), and an ill-conditioned spectrum with milder outliers
    "outliers": dict(outlier_scale=100.0),
    "illcond": dict(outlier_scale=10.0, decay=1e-3),
}


def options(method="direct", preconditioner="ldl", dtype=torch.float64, **kw) -> SolverOptions:
    """Solver options of the exactness tests: CG stops on the relative residual (tol 1e-6), the strict rule
    (the default gap rule has its own tests below)."""
    kw.setdefault("stop", "residual")
    return SolverOptions(method=method, preconditioner=preconditioner, dtype=str(dtype).removeprefix("torch."),
                         compile=False, **kw)


def config(solver: SolverOptions | None = None, **kw) -> PruneConfig:
    return PruneConfig(solver=solver or SolverOptions(), **kw)


@functools.cache
def random_problem(d: int, kind: str, sparsity: float = 0.5):
    """Weights, Hessian, Wanda mask and the float64 optimum of a random correlated layer (24 rows)."""
    hessian = correlated_hessian(d, seed=d, **KINDS[kind])
    weight = torch.randn(24, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    keep = prune_weight(weight, hessian, config(sparsity=sparsity, mask="wanda", update="none")).keep
    best = damped_objective(exact_update(weight, hessian, keep, DAMP), weight, hessian, DAMP)
    return weight, hessian, keep, best


@pytest.mark.parametrize("d", [64, 257, 512])
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("method,preconditioner", CONFIGS)
@pytest.mark.parametrize("dtype,tol", DTYPES, ids=["f64", "f32"])
def test_matches_exact_optimum_on_hard_random_hessians(d, kind, method, preconditioner, dtype, tol):
    weight, hessian, keep, best = random_problem(d, kind)
    result = prune_weight(weight, hessian, config(options(method, preconditioner, dtype), damp=DAMP), keep=keep)
    got = damped_objective(result.weight, weight, hessian, DAMP)
    assert abs(got - best) <= tol * best
    assert got <= damped_objective(weight * keep, weight, hessian, DAMP)
    assert result.stats.solver_method == method and result.stats.unconverged_rows == 0
    assert result.stats.dead_inputs == 1 and not result.stats.fell_back_to_none
    assert torch.equal(result.keep, keep) and (result.weight[~keep] == 0).all()
    if kind == "illcond":  # the problem is not trivial: no update is far from the optimum
        assert damped_objective(weight * keep, weight, hessian, DAMP) > 1.3 * best


@pytest.mark.parametrize("sparsity", [0.3, 0.7])  # 0.3: the direct path takes the pruned-set (OBS) form
@pytest.mark.parametrize("method,preconditioner", CONFIGS)
@pytest.mark.parametrize("dtype,tol", DTYPES, ids=["f64", "f32"])
def test_exact_at_other_sparsities(sparsity, method, preconditioner, dtype, tol):
    weight, hessian, keep, best = random_problem(257, "illcond", sparsity)
    result = prune_weight(weight, hessian, config(options(method, preconditioner, dtype), damp=DAMP), keep=keep)
    assert abs(damped_objective(result.weight, weight, hessian, DAMP) - best) <= tol * best


@pytest.fixture(scope="module")
def real_problems(minilm_layers):
    """Per real layer: 32 rows, the SparseGPT mask and update, and the float64 optimum on that mask."""
    out = {}
    for name, (weight, hessian) in minilm_layers.items():
        w = weight[:32]
        sgpt = prune_weight(w, hessian, config(mask="sparsegpt", update="sparsegpt", damp=DAMP))
        best = damped_objective(exact_update(w, hessian, sgpt.keep, DAMP), w, hessian, DAMP)
        out[name] = (w, hessian, sgpt, best)
    return out


@pytest.mark.parametrize("method,preconditioner", CONFIGS)
@pytest.mark.parametrize("dtype,tol", DTYPES, ids=["f64", "f32"])
def test_real_minilm_layers_exact_and_never_worse(real_problems, method, preconditioner, dtype, tol):
    for name, (w, hessian, sgpt, best) in real_problems.items():
        ours = prune_weight(w, hessian, config(options(method, preconditioner, dtype), mask="sparsegpt", damp=DAMP))
        assert torch.equal(ours.keep, sgpt.keep), name
        got = damped_objective(ours.weight, w, hessian, DAMP)
        assert abs(got - best) <= tol * best, name
        assert got <= damped_objective(sgpt.weight, w, hessian, DAMP), name
        assert got <= damped_objective(w * ours.keep, w, hessian, DAMP), name
        # the undamped (true) reconstruction error improves on SparseGPT's too
        assert ours.stats.objective < sgpt.stats.objective < sgpt.stats.objective_none, name
        assert ours.stats.unconverged_rows == 0 and ours.stats.kkt_residual_max < 1e-4, name
        assert (ours.weight[~ours.keep] == 0).all(), name


@pytest.mark.parametrize("mask,pattern", [("wanda", "unstructured"), ("magnitude", "unstructured"), ("wanda", "2:4")])
def test_real_minilm_layers_other_masks(minilm_layers, mask, pattern):
    sparsity = None if pattern == "2:4" else 0.5
    for name, (weight, hessian) in minilm_layers.items():
        w = weight[:16]
        none = prune_weight(w, hessian, config(sparsity=sparsity, pattern=pattern, mask=mask, update="none", damp=DAMP))
        best = damped_objective(exact_update(w, hessian, none.keep, DAMP), w, hessian, DAMP)
        for method in ("direct", "pcg"):
            ours = prune_weight(w, hessian, config(options(method, dtype=torch.float32), sparsity=sparsity,
                                                   pattern=pattern, mask=mask, damp=DAMP))
            assert torch.equal(none.keep, ours.keep), name
            got = damped_objective(ours.weight, w, hessian, DAMP)
            assert abs(got - best) <= 1e-4 * best, (name, method)
            assert got < damped_objective(none.weight, w, hessian, DAMP), (name, method)
            assert ours.stats.objective < 0.8 * none.stats.objective, (name, method)
            assert none.stats.objective == pytest.approx(ours.stats.objective_none)


def test_compiled_and_eager_solver_agree():
    hessian = correlated_hessian(64, seed=3, outlier_scale=10.0, decay=1e-2).float()
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    assert cg_module._step_for(True, torch.device("cpu")) is cg_module._compiled_cg_step()
    assert cg_module._step_for(False, torch.device("cpu")) is cg_module._cg_step
    assert cg_module._step_for(None, torch.device("cpu")) is cg_module._cg_step   # default: CUDA only
    runs = {}
    for compile in (False, True):
        solver = SolverOptions(method="pcg", compile=compile, stop="residual", block_size=16)  # 4 "ldl" blocks
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            runs[compile] = prune_weight(weight, hessian, config(solver))
        fallbacks = [w for w in caught if "torch.compile of the CG step failed" in str(w.message)]
        assert not fallbacks, fallbacks[0].message if fallbacks else None   # no silent fallback to eager
        assert solver.compile == compile
    torch.testing.assert_close(runs[True].weight, runs[False].weight, rtol=1e-5, atol=1e-6)
    assert runs[True].stats.cg_iterations_mean == pytest.approx(runs[False].stats.cg_iterations_mean, abs=1)
    assert runs[True].stats.cg_iterations_mean > 3 and runs[True].stats.unconverged_rows == 0


def test_a_failing_compile_warns_and_finishes_eagerly_without_touching_the_options(monkeypatch):
    hessian = correlated_hessian(64, seed=3, outlier_scale=10.0, decay=1e-2).float()
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    eager = prune_weight(weight, hessian, config(SolverOptions(method="pcg", compile=False)))
    attempts = []

    def broken_step(*args):
        attempts.append(1)
        raise RuntimeError("simulated compiler failure")

    monkeypatch.setattr(cg_module, "_compiled_cg_step", lambda: broken_step)
    solver = SolverOptions(method="pcg", compile=True)
    for run in (1, 2):   # the options are not changed: every solve tries the compiled step again
        with pytest.warns(RuntimeWarning, match=r"torch\.compile of the CG step failed \(RuntimeError: simulated "
                                                r"compiler failure\); running it eagerly"):
            result = prune_weight(weight, hessian, config(solver))
        assert solver.compile is True
        assert len(attempts) == run
        assert torch.equal(result.weight, eager.weight) and torch.equal(result.keep, eager.keep)
        assert result.stats.cg_iterations_mean == eager.stats.cg_iterations_mean
        assert result.stats.unconverged_rows == 0


def test_an_eager_step_error_is_not_swallowed(monkeypatch):
    def broken_step(*args):
        raise RuntimeError("a real bug")

    monkeypatch.setattr(cg_module, "_cg_step", broken_step)
    hessian = correlated_hessian(32, seed=3).float()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises(RuntimeError, match="a real bug"):
            prune_weight(torch.randn(4, 32), hessian, config(SolverOptions(method="pcg", compile=False)))


def test_row_batches_of_any_size_give_the_same_answer():
    weight, hessian, keep, _ = random_problem(257, "illcond")
    damped, damping = damp_hessian(hessian, DAMP)
    for method in ("direct", "pcg"):
        whole = solve_pinned(damped, weight, keep, damping, options(method))
        tiny = solve_pinned(damped, weight, keep, damping, options(method, memory_budget=1))  # one row a batch
        # rows are independent; only the rounding of a 1-row vs a 24-row matmul differs, which
        # moves CG (stopped at a 1e-6 relative residual) by about that much
        tol = 1e-12 if method == "direct" else 1e-5
        assert (torch.linalg.vector_norm(tiny.delta - whole.delta, dim=1)
                <= tol * torch.linalg.vector_norm(whole.delta, dim=1)).all()
        assert (tiny.cg_iterations - whole.cg_iterations).abs().max() <= 1


def test_rows_with_different_kept_counts_batch_together():
    hessian, damping = damp_hessian(correlated_hessian(80, seed=11, outlier_scale=10.0, decay=1e-2), DAMP)
    weight = torch.randn(10, 80, dtype=torch.float64)
    keep = torch.rand(10, 80, generator=torch.Generator().manual_seed(7)) > torch.linspace(0.05, 0.95, 10)[:, None]
    keep[0] = True  # a row with nothing pruned: no update at all
    deltas = {}
    for method in ("direct", "pcg"):
        result = solve_pinned(hessian, weight, keep, damping, options(method))
        assert result.converged.all() and (result.kkt_residual < 1e-5).all()
        assert ((weight + result.delta)[~keep] == 0).all()
        assert (result.delta[0] == 0).all()
        deltas[method] = result.delta
    for r in range(10):  # each row against its own float64 solve
        k = keep[r]
        expected = torch.linalg.solve(hessian[k][:, k], hessian[k][:, ~k] @ weight[r, ~k])
        torch.testing.assert_close(deltas["direct"][r, k], expected, rtol=1e-9, atol=1e-10)
        # CG stops at a 1e-6 relative residual: the error is small in norm, not entry by entry
        assert torch.linalg.vector_norm(deltas["pcg"][r, k] - expected) <= 1e-4 * torch.linalg.vector_norm(expected)


def test_cg_limit_is_reported_and_still_improves():
    weight, hessian, keep, best = random_problem(257, "illcond")
    result = prune_weight(weight, hessian, config(options("pcg", "jacobi", max_iter=3, check_every=1), damp=DAMP),
                          keep=keep)
    assert result.stats.unconverged_rows == weight.shape[0] and result.stats.cg_iterations_max == 3
    assert any("did not reach the CG tolerance" in note for note in result.stats.notes)
    got = damped_objective(result.weight, weight, hessian, DAMP)
    assert best < got < damped_objective(weight * keep, weight, hessian, DAMP)  # CG only lowers the error


def test_auto_method_follows_the_cost_rule():
    for d in (64, 512):
        weight, hessian, keep, _ = random_problem(d, "outliers")
        result = prune_weight(weight, hessian, config(options("auto")), keep=keep)
        assert result.stats.solver_method == choose_method(d, d // 2)
    assert choose_method(16, 8) == "direct" and choose_method(4096, 2048) == "pcg"


def test_solver_options_are_validated():
    for bad, option in ((dict(method="cholesky"), "solver.method"),
                        (dict(preconditioner="ilu"), "solver.preconditioner"),
                        (dict(dtype="bfloat16"), "solver.dtype"), (dict(dtype=torch.bfloat16), "solver.dtype"),
                        (dict(dtype=torch.float64), "solver.dtype"),   # a string now: "float64"
                        (dict(tol=0.0), "solver.tol"), (dict(max_iter=0), "solver.max_iter"),
                        (dict(max_newton=0), "solver.max_newton"), (dict(check_every=0), "solver.check_every")):
        with pytest.raises(OptionError) as caught:
            SolverOptions(**bad)
        assert caught.value.option == option
    assert SolverOptions(dtype="float64").torch_dtype == torch.float64
    assert SolverOptions().dtype == "float32" and SolverOptions().torch_dtype == torch.float32


# -- general box bounds ---------------------------------------------------------------------------

def box_problem(d: int, rows: int, seed: int):
    """Damped Hessian and bounds mixing pins, two-sided, one-sided and free entries."""
    hessian, _ = damp_hessian(correlated_hessian(d, dead=0, seed=seed, outlier_scale=10.0, decay=1e-2), DAMP)
    g = torch.Generator().manual_seed(seed)
    center = torch.randn(rows, d, generator=g, dtype=torch.float64)
    lower = center - 0.5 * torch.rand(rows, d, generator=g, dtype=torch.float64)
    upper = center + 0.5 * torch.rand(rows, d, generator=g, dtype=torch.float64)
    e = d // 8
    lower[:, :e] = upper[:, :e]                  # pinned
    lower[:, e:2 * e] = -float("inf")            # upper bound only
    upper[:, 2 * e:3 * e] = float("inf")         # lower bound only
    lower[:, -2:], upper[:, -2:] = -float("inf"), float("inf")  # free
    return hessian, lower, upper


def assert_kkt(x, hessian, lower, upper, tol):
    """Feasible, zero gradient on free entries, gradient pointing outward at active bounds."""
    assert ((x >= lower) & (x <= upper)).all()  # exactly feasible, no tolerance
    grad = x @ hessian
    scale = tol * grad.abs().max()
    at_lower, at_upper = x <= lower + 1e-9 * lower.abs(), x >= upper - 1e-9 * upper.abs()
    free = ~at_lower & ~at_upper
    assert grad[free].abs().max() <= scale
    assert (grad[at_lower & ~at_upper] >= -scale).all()   # at lower: may only rise
    assert (grad[at_upper & ~at_lower] <= scale).all()    # at upper: may only fall


def projected_gradient_reference(hessian, lower, upper, iterations=30000):
    """Accelerated projected gradient (FISTA) in float64: slow, simple, independent."""
    step = 1.0 / torch.linalg.eigvalsh(hessian).max()
    y = x = torch.zeros_like(lower).clamp(lower, upper)
    t = 1.0
    for _ in range(iterations):
        x_next = (y - step * (y @ hessian)).clamp(lower, upper)
        t_next = (1 + (1 + 4 * t * t) ** 0.5) / 2
        y = x_next + (t - 1) / t_next * (x_next - x)
        x, t = x_next, t_next
    return x


def scipy_reference(hessian, lower, upper):
    """Bounded least squares min ||L^T x||^2 by scipy's BVLS (an active-set method), pins eliminated."""
    from scipy import optimize
    factor = torch.linalg.cholesky(hessian).T
    out = lower.clone()
    for r in range(lower.shape[0]):
        pinned = lower[r] == upper[r]
        free = ~pinned
        fit = optimize.lsq_linear(factor[:, free].numpy(), -(factor[:, pinned] @ lower[r, pinned]).numpy(),
                                  bounds=(lower[r, free].numpy(), upper[r, free].numpy()), method="bvls",
                                  tol=1e-15)
        out[r, free] = torch.from_numpy(fit.x)
    return out


def objective(x, hessian):
    return 0.5 * (x.double() * (x.double() @ hessian)).sum(1)


def test_general_box_bounds_match_projected_gradient_on_tiny_problems():
    hessian, lower, upper = box_problem(12, 6, seed=6)
    result = solve_box_qp(hessian, lower, upper, options("pcg"))
    assert_kkt(result.delta, hessian, lower, upper, 1e-8)
    assert result.converged.all() and (result.kkt_residual < 1e-6).all() and result.newton_iterations > 1
    assert torch.equal(result.delta[:, :1], lower[:, :1])  # pins are exact
    reference = projected_gradient_reference(hessian, lower, upper)
    f, f_ref = objective(result.delta, hessian), objective(reference, hessian)
    assert ((f - f_ref).abs() <= 1e-9 * f_ref).all()
    torch.testing.assert_close(result.delta, reference, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("preconditioner", ["ldl", "hinv", "jacobi"])
@pytest.mark.parametrize("dtype,tol", DTYPES, ids=["f64", "f32"])
def test_general_box_bounds_match_an_active_set_solver(preconditioner, dtype, tol):
    hessian, lower, upper = box_problem(64, 8, seed=7)
    result = solve_box_qp(hessian, lower, upper, options("pcg", preconditioner, dtype))
    x = result.delta
    assert x.dtype == dtype and result.newton_iterations > 1
    assert_kkt(x.double(), hessian, lower.to(dtype).double(), upper.to(dtype).double(), 1e-5 if tol > 1e-5 else 1e-8)
    assert torch.equal(x[:, :8], lower[:, :8].to(dtype))
    reference = scipy_reference(hessian, lower, upper)
    f, f_ref = objective(x, hessian), objective(reference, hessian)
    assert ((f - f_ref).abs() <= tol * f_ref).all()
    assert torch.linalg.vector_norm(x.double() - reference) <= 100 * tol * torch.linalg.vector_norm(reference)


def test_general_box_bounds_report_an_unfinished_newton_run():
    hessian, lower, upper = box_problem(64, 8, seed=7)
    result = solve_box_qp(hessian, lower, upper, options("pcg", max_newton=2))
    assert result.newton_iterations == 2
    assert torch.equal(result.converged, result.kkt_residual <= 1e-6) and not result.converged.all()
    assert ((result.delta >= lower) & (result.delta <= upper)).all()  # still feasible


def test_inactive_bounds_reduce_to_the_pinned_problem():
    weight, hessian, keep, _ = random_problem(64, "illcond")
    damped, damping = damp_hessian(hessian, DAMP)
    pinned = solve_pinned(damped, weight, keep, damping, options("direct"))
    far = pinned.delta.abs().max() * 10
    lower = torch.where(keep, -far, -weight)
    upper = torch.where(keep, far, -weight)
    boxed = solve_box_qp(damped, lower, upper, options("pcg"))
    assert (torch.linalg.vector_norm(boxed.delta - pinned.delta, dim=1)
            <= 1e-5 * torch.linalg.vector_norm(pinned.delta, dim=1)).all()
    with pytest.raises(ValueError, match="lower bound above upper"):
        solve_box_qp(damped, upper, lower - 1, options("pcg"))


# ------------------------------------------------------------------------------------ the default gap rule
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("preconditioner", ["ldl", "hinv"])
def test_gap_rule_bounds_the_true_gap_and_stops_earlier_on_real_layers(minilm_layers, dtype, preconditioner):
    """With the ldl or hinv preconditioner r^T z bounds each row's objective gap: the reported bound is never below
    the gap to the float64 optimum, every row ends under tol, and CG needs fewer iterations than the residual rule."""
    for name, (weight, hessian) in minilm_layers.items():
        w = weight[:32].double()
        keep = prune_weight(w, hessian, config(mask="wanda", update="none", damp=DAMP)).keep
        damped, damping = damp_hessian(hessian.double(), DAMP)

        def objective(delta: torch.Tensor) -> torch.Tensor:  # per row, damped, float64
            return (delta.double() * (delta.double() @ damped)).sum(1)

        best = objective(exact_update(w, hessian, keep, DAMP) - w)
        masked = objective(-w * ~keep)
        gap_rule = solve_pinned(damped, w, keep, damping, options("pcg", preconditioner, dtype, stop="gap"))
        residual_rule = solve_pinned(damped, w, keep, damping, options("pcg", preconditioner, dtype))
        true_gap = (objective(gap_rule.delta) - best) / masked
        floor = 1e-12 if dtype == torch.float64 else 2e-8       # float32 arithmetic cannot resolve smaller gaps
        assert (true_gap <= gap_rule.gap_bound.double() + floor).all(), name
        assert (gap_rule.gap_bound <= 1e-6).all() and gap_rule.converged.all(), name
        assert true_gap.max() > 1e-10 or dtype == torch.float32, name   # it stopped early, not at the optimum
        assert gap_rule.cg_iterations.float().mean() < 0.8 * residual_rule.cg_iterations.float().mean(), name


def test_gap_rule_is_the_default_with_ldl_or_hinv_and_needs_one():
    assert SolverOptions().stop_rule == "gap" and SolverOptions(preconditioner="hinv").stop_rule == "gap"
    assert SolverOptions(preconditioner="jacobi").stop_rule == "residual"
    assert SolverOptions().preconditioner_on(torch.device("cpu")) == "ldl"      # the default: by device
    assert SolverOptions().preconditioner_on(torch.device("cuda")) == "hinv"
    assert SolverOptions(preconditioner="jacobi").preconditioner_on(torch.device("cpu")) == "jacobi"
    with pytest.raises(OptionError, match="solver.stop.*needs preconditioner 'ldl' or 'hinv'"):
        SolverOptions(preconditioner="jacobi", stop="gap")
    weight, hessian, keep, best = random_problem(257, "illcond")
    result = prune_weight(weight, hessian, config(SolverOptions(method="pcg", compile=False), damp=DAMP), keep=keep)
    assert result.stats.gap_bound_max is not None and result.stats.gap_bound_max <= 1e-6
    # relative to the masked-only objective, the damped objective is within the bound of the optimum
    masked = damped_objective(weight * keep, weight, hessian, DAMP)
    assert damped_objective(result.weight, weight, hessian, DAMP) - best <= 1e-6 * masked


def test_no_proven_gap_bound_when_the_preconditioner_needs_extra_damping():
    x = torch.randn(12, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    hessian = x.T @ x / 12                                   # rank 12 of 32: singular, undamped below
    weight = torch.randn(8, 32, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    result = prune_weight(weight, hessian, config(SolverOptions(method="pcg", dtype="float64", compile=False),
                                                  damp=0.0))
    assert result.stats.gap_bound_max is None
    assert any("bounds the objective gap only approximately" in note for note in result.stats.notes)
    assert result.stats.objective <= result.stats.objective_none


@pytest.mark.parametrize("stop", ["gap", "residual"])
def test_bfloat16_matmuls_with_refinement_reach_the_float64_optimum_on_real_layers(minilm_layers, stop):
    """CG in bfloat16 plus iterative refinement in float32 ends as exact as full precision: every row's
    gap to the float64 optimum is under tol (and under its reported bound), or its residual is."""
    for name, (weight, hessian) in minilm_layers.items():
        w = weight[:16].double()
        keep = prune_weight(w, hessian, config(mask="wanda", update="none", damp=DAMP)).keep
        damped, damping = damp_hessian(hessian.double(), DAMP)
        objective = lambda delta: (delta.double() * (delta.double() @ damped)).sum(1)  # noqa: E731
        best, masked = objective(exact_update(w, hessian, keep, DAMP) - w), objective(-w * ~keep)
        # float32 cannot reach a 1e-6 relative residual on these layers; refinement in float64 can
        dtype = torch.float32 if stop == "gap" else torch.float64
        result = solve_pinned(damped, w, keep, damping, options("pcg", dtype=dtype, stop=stop, matmul="bfloat16"))
        assert result.converged.all(), name
        true_gap = (objective(result.delta) - best) / masked
        if stop == "gap":
            assert (true_gap <= result.gap_bound.double() + 2e-8).all() and (result.gap_bound <= 1e-6).all(), name
        else:
            assert (result.kkt_residual <= 2e-6).all() and true_gap.max() < 1e-10, name  # (unscaled residual)


def test_bfloat16_cg_alone_is_not_exact_so_refinement_is_needed():
    """CG run entirely on the bfloat16 matrices stops far from the float64 optimum (so the test above can
    fail); the refined solve on the same problem ends within tol."""
    weight, hessian, keep, best = random_problem(257, "illcond")
    damped, damping = damp_hessian(hessian, DAMP)
    low = options("pcg", dtype=torch.float32, stop="gap", matmul="bfloat16")
    masked = damped_objective(weight * keep, weight, hessian, DAMP)
    refined = solve_pinned(damped, weight, keep, damping, low)
    assert damped_objective(weight + refined.delta, weight, hessian, DAMP) - best <= 1e-6 * masked
    order = keep_rate_order(keep)   # scaled coordinates in the solver's input order, as solve_pinned
    problem = solver_module._scaled_problem(damped, low, damping, order)
    w, kept = weight[:, order].float() / problem.scale, keep[:, order]
    free = kept.float()
    start = (w * ~kept) @ problem.operator.matrix
    x, *_ = cg_module.pcg(problem.operator.low_matrix, -(start * free), free, problem.operator.low_precond,
                          options("pcg", dtype=torch.float32, stop="gap", max_iter=500).cg,
                          ((w * ~kept) * start).sum(1))
    delta = torch.empty_like(x)
    delta[:, order] = torch.where(kept, x * problem.scale, -weight[:, order].float())
    assert damped_objective(weight + delta.double(), weight, hessian, DAMP) - best > 1e-4 * masked


def test_tf32_option_leaves_the_global_matmul_precision_as_it_was():
    weight, hessian, keep, _ = random_problem(64, "outliers")
    damped, damping = damp_hessian(hessian, DAMP)
    before = torch.get_float32_matmul_precision()
    result = solve_pinned(damped, weight, keep, damping, options("pcg", dtype=torch.float32, stop="gap", matmul="tf32"))
    assert result.converged.all() and torch.get_float32_matmul_precision() == before
    with pytest.raises(OptionError, match="solver.matmul"):
        SolverOptions(matmul="fp8")


def test_rows_that_stop_leave_the_cg_batch(monkeypatch):
    """Eager CG drops converged rows from its matmuls; every row still gets the answer it gets alone."""
    weight, hessian, keep, _ = random_problem(257, "illcond")
    keep = keep.clone()
    keep[:6] = True                     # rows with nothing pruned stop before the first iteration
    damped, damping = damp_hessian(hessian, DAMP)
    batch_rows = []
    step = cg_module._cg_step

    def recording_step(state, system):
        batch_rows.append(state.x.shape[0])
        return step(state, system)

    monkeypatch.setattr(cg_module, "_cg_step", recording_step)
    whole = solve_pinned(damped, weight, keep, damping, options("pcg"))
    assert batch_rows[0] == 24 - 6 and batch_rows[-1] < batch_rows[0]          # the batch shrinks as rows stop
    assert sum(batch_rows) == int(whole.cg_iterations.sum())                  # and only running rows are multiplied
    batch_rows.clear()
    alone = solve_pinned(damped, weight, keep, damping, options("pcg", memory_budget=1))   # one row a batch
    assert (whole.delta[:6] == 0).all() and (whole.cg_iterations[:6] == 0).all()
    assert (torch.linalg.vector_norm(alone.delta - whole.delta, dim=1)
            <= 1e-5 * torch.linalg.vector_norm(whole.delta, dim=1).clamp_min(1e-30)).all()
    # a 1-row matmul rounds differently from a many-row one: a row may stop one iteration apart
    assert (alone.cg_iterations - whole.cg_iterations).abs().max() <= 1 and whole.converged.all()
