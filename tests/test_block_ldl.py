"""The "ldl" preconditioner: what it applies, that it never understates a gap, and that it pays on real layers.

References are dense float64 formulas built here per row: M^-1 r = L_KK^-T (D^-1)_KK L_KK^-1 r from
the explicit block factors, and (H_KK)^-1 r by ``torch.linalg.solve``.
"""

from __future__ import annotations

import pytest
import torch

from conftest import correlated_hessian
from optima import PruneConfig, SolverOptions, damp_hessian, prune_weight
from optima.block_ldl import BlockLDL, keep_rate_order
from optima.solver import solve_pinned

DAMP = 0.01


def random_spd(d: int, seed: int) -> torch.Tensor:
    x = torch.randn(d, 3 * d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x @ x.T / d + 0.05 * torch.eye(d, dtype=torch.float64)


def dense_preconditioner(h: torch.Tensor, block: int, kept: torch.Tensor) -> torch.Tensor:
    """(M_KK)^-1 for one row, from explicitly formed L (unit block-lower) and block-diagonal D."""
    d = h.shape[0]
    c = torch.linalg.cholesky(h)
    lower, d_inv = c.clone(), torch.zeros_like(h)
    for start in range(0, d, block):
        b = slice(start, min(start + block, d))
        lower[:, b] = c[:, b] @ torch.linalg.inv(c[b, b])
        d_inv[b, b] = torch.linalg.inv(c[b, b] @ c[b, b].T)
    l_kk = lower[kept][:, kept]
    return torch.linalg.solve(l_kk.T, d_inv[kept][:, kept] @ torch.linalg.inv(l_kk))


@pytest.mark.parametrize("block", [1, 5, 16, 40, 64])   # 40 = d: one block; 64 > d
def test_apply_matches_the_dense_formula_and_stays_on_the_free_set(block):
    d, rows = 40, 6
    h = random_spd(d, seed=block)
    free = (torch.rand(rows, d, generator=torch.Generator().manual_seed(1)) < 0.5).double()
    r = torch.randn(rows, d, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * free
    z = BlockLDL.from_cholesky(torch.linalg.cholesky(h), block).apply(r, free)
    assert (z[free == 0] == 0).all()
    for i in range(rows):
        kept = free[i].bool()
        expected = dense_preconditioner(h, block, kept) @ r[i, kept]
        torch.testing.assert_close(z[i, kept], expected, rtol=1e-10, atol=1e-12)


def test_one_block_is_the_hinv_preconditioner():
    d = 30
    h = random_spd(d, seed=7)
    free = (torch.rand(4, d, generator=torch.Generator().manual_seed(3)) < 0.6).double()
    r = torch.randn(4, d, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * free
    z = BlockLDL.from_cholesky(torch.linalg.cholesky(h), d).apply(r, free)
    torch.testing.assert_close(z, free * (r @ torch.linalg.inv(h)), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("block", [1, 8, 20])   # 20: a last block of 8
def test_r_z_never_understates_the_energy_norm_of_the_error(block):
    """r^T M^-1 r >= r^T (H_KK)^-1 r for every row and residual: M <= H_KK, the property the gap bound needs."""
    d, rows = 48, 32
    h = correlated_hessian(d, seed=block, outlier_scale=30.0, decay=1e-3, dead=0)
    h = h + 1e-3 * torch.eye(d, dtype=torch.float64)
    free = (torch.rand(rows, d, generator=torch.Generator().manual_seed(5)) < 0.5).double()
    r = torch.randn(rows, d, generator=torch.Generator().manual_seed(6), dtype=torch.float64) * free
    z = BlockLDL.from_cholesky(torch.linalg.cholesky(h), block).apply(r, free)
    bound = (r * z).sum(1)
    exact = torch.stack([r[i, f] @ torch.linalg.solve(h[f][:, f], r[i, f]) for i, f in enumerate(free.bool())])
    assert (bound >= exact * (1 - 1e-10)).all()
    assert (bound < 100 * exact).all()          # and a useful approximation, not a loose one


def test_to_changes_the_precision_of_every_factor():
    ldl = BlockLDL.from_cholesky(torch.linalg.cholesky(random_spd(20, seed=1)), 8)
    low = ldl.to(torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in low.forward + low.backward + low.block_inverse)
    r = torch.randn(3, 20, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    free = torch.ones_like(r)
    z_low, z = low.apply(r, free), ldl.apply(r, free)
    assert z_low.dtype == torch.float64
    assert 0 < (z_low - z).norm() <= 0.1 * z.norm()      # rounded, but the same operator


@pytest.mark.parametrize("block", [1, 7, 64, 4096])
def test_pruning_with_ldl_reaches_the_float64_optimum_at_any_block_size(block):
    hessian = correlated_hessian(96, seed=11, outlier_scale=100.0)
    weight = torch.randn(12, 96, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    keep = prune_weight(weight, hessian, PruneConfig(mask="wanda", update="none")).keep
    damped, damping = damp_hessian(hessian, DAMP)
    solver = SolverOptions(method="pcg", preconditioner="ldl", block_size=block, dtype="float64", stop="residual",
                           tol=1e-10, compile=False)
    delta = solve_pinned(damped, weight, keep, damping, solver).delta
    exact = torch.zeros_like(weight)
    for i, kept in enumerate(keep):
        pruned = ~kept
        exact[i, kept] = torch.linalg.solve(damped[kept][:, kept], damped[kept][:, pruned] @ weight[i, pruned])
    exact[~keep] = -weight[~keep]
    torch.testing.assert_close(delta, exact, rtol=1e-7, atol=1e-9)


def test_fewer_cg_iterations_than_hinv_on_real_layers(minilm_layers):
    """The point of "ldl": on real Hessians CG needs clearly fewer iterations than with "hinv" (bench/README.md
    has the times), every row to the same proven gap bound."""
    for name, (weight, hessian) in minilm_layers.items():
        w = weight[:24]
        keep = prune_weight(w, hessian, PruneConfig(mask="wanda", update="none", damp=DAMP)).keep
        damped, damping = damp_hessian(hessian.float(), DAMP)
        runs = {p: solve_pinned(damped, w, keep, damping, SolverOptions(method="pcg", preconditioner=p, compile=False))
                for p in ("ldl", "hinv")}
        assert all(run.converged.all() and (run.gap_bound <= 1e-6).all() for run in runs.values()), name
        ratio = runs["ldl"].cg_iterations.float().mean() / runs["hinv"].cg_iterations.float().mean()
        assert ratio < 0.8, (name, float(ratio))


def test_keep_rate_order_puts_the_inputs_most_rows_keep_first():
    keep = torch.tensor([[1, 0, 1, 0], [1, 0, 0, 1], [1, 1, 0, 0]], dtype=torch.bool)
    assert keep_rate_order(keep).tolist() == [0, 1, 2, 3]     # ties stay in input order
    assert keep_rate_order(keep[:, [3, 0, 2, 1]]).tolist() == [1, 0, 2, 3]


def test_the_keep_rate_order_saves_iterations_on_a_sparsegpt_mask(minilm_layers):
    """With SparseGPT's mask (counts differ by row and input) the input order matters: the keep-rate order
    needs fewer CG iterations than the natural one on MiniLM's output.dense (bench/README.md has all layers)."""
    weight, hessian = minilm_layers["encoder.layer.0.output.dense"]
    w = weight[:64]
    keep = prune_weight(w, hessian, PruneConfig(mask="sparsegpt", update="none", damp=DAMP)).keep
    damped, damping = damp_hessian(hessian.float(), DAMP)
    solver = SolverOptions(method="pcg", compile=False)
    by_rate = solve_pinned(damped, w, keep, damping, solver)
    natural = solve_pinned(damped, w, keep, damping, solver, order=torch.arange(w.shape[1]))
    assert by_rate.converged.all() and natural.converged.all()
    assert by_rate.cg_iterations.float().mean() < 0.9 * natural.cg_iterations.float().mean()


def test_a_share_of_rows_solved_in_the_layer_order_is_solved_as_in_the_whole_layer():
    """What the row split across processes relies on: rows 5..11 alone, given the layer's order, get the same
    answer and the same iterations as inside the whole solve."""
    hessian = correlated_hessian(80, seed=21, outlier_scale=30.0).float()
    weight = torch.randn(16, 80, generator=torch.Generator().manual_seed(22))
    keep = prune_weight(weight, hessian, PruneConfig(mask="sparsegpt", update="none")).keep
    damped, damping = damp_hessian(hessian, DAMP)
    solver = SolverOptions(method="pcg", block_size=16, compile=False)
    whole = solve_pinned(damped, weight, keep, damping, solver)
    part = solve_pinned(damped, weight[5:12], keep[5:12], damping, solver, order=keep_rate_order(keep))
    torch.testing.assert_close(part.delta, whole.delta[5:12], rtol=1e-5, atol=1e-7)
    assert torch.equal(part.cg_iterations, whole.cg_iterations[5:12])


def test_a_bad_order_is_refused_and_the_report_names_the_preconditioner():
    hessian = correlated_hessian(40, seed=31).float()
    weight = torch.randn(6, 40, generator=torch.Generator().manual_seed(32))
    keep = prune_weight(weight, hessian, PruneConfig(mask="wanda", update="none")).keep
    damped, damping = damp_hessian(hessian, DAMP)
    solver = SolverOptions(method="pcg", compile=False)
    for order in (torch.arange(39), torch.cat([torch.arange(39), torch.zeros(1, dtype=torch.long)])):
        with pytest.raises(ValueError, match="permutation of the 40 inputs"):
            solve_pinned(damped, weight, keep, damping, solver, order=order)
    as_int32 = solve_pinned(damped, weight, keep, damping, solver, order=keep_rate_order(keep).int())
    torch.testing.assert_close(as_int32.delta, solve_pinned(damped, weight, keep, damping, solver).delta)
    stats = prune_weight(weight, hessian, PruneConfig(mask="wanda", solver=solver)).stats
    assert (stats.solver_method, stats.solver_preconditioner) == ("pcg", "ldl")
