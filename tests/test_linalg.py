"""The shared linear algebra: one damping-escalation policy, the upper factor of H^-1, per-row solves."""

from __future__ import annotations

import pytest
import torch
from conftest import correlated_hessian

from optima.linalg import Damping, cholesky, escalating, inverse_upper_factor, solve_rows


def test_inverse_upper_factor_is_upper_and_factors_the_inverse():
    h = correlated_hessian(24, seed=1, dead=0)
    upper = inverse_upper_factor(h)
    assert torch.equal(upper, upper.triu())
    torch.testing.assert_close(upper.T @ upper, torch.linalg.inv(h), rtol=1e-9, atol=1e-9)
    assert inverse_upper_factor(-torch.eye(3, dtype=torch.float64)) is None


def test_escalation_multiplies_the_damping_by_ten_and_reports_it():
    h = torch.zeros(4, 4, dtype=torch.float64)
    h[0, 0] = 1.0                                   # singular: needs damping to factor
    factor, used, damping = escalating(cholesky, h, Damping(0.0, 0.0, 0))
    assert damping.value > 0 and damping.escalated_rows == 0
    torch.testing.assert_close(used, h + damping.value * torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close(factor @ factor.T, used)
    _, _, once = escalating(cholesky, h + 1e-3 * torch.eye(4, dtype=torch.float64), Damping(0.01, 1e-3, 0))
    assert once.value == 1e-3                       # factors as given: nothing added
    with pytest.raises(torch.linalg.LinAlgError, match="not positive definite"):
        escalating(cholesky, -torch.eye(3), Damping(0.0, 0.0, 0), tries=3)


def test_row_solves_match_one_solve_per_row_and_escalate_only_the_rows_that_need_it():
    g = torch.Generator().manual_seed(3)
    h = correlated_hessian(16, seed=2, dead=0)
    members = torch.rand(9, 16, generator=g, dtype=torch.float64) < 0.5
    members[0] = False                              # an empty set: zero solution
    rhs = torch.randn(9, 16, generator=g, dtype=torch.float64)
    for budget in (1, 1 << 30):                     # one row a batch, or all of a size at once
        x, escalated = solve_rows(h, members, rhs, budget)
        assert escalated == 0 and (x[~members] == 0).all()
        for r in range(1, 9):
            s = members[r]
            torch.testing.assert_close(x[r, s], torch.linalg.solve(h[s][:, s], rhs[r, s]))
    singular = torch.zeros(16, 16, dtype=torch.float64)
    singular[:8, :8] = h[:8, :8]                    # inputs 8.. have no curvature
    members = torch.zeros(2, 16, dtype=torch.bool)
    members[0, :4], members[1, 6:10] = True, True  # row 0 factors, row 1 needs damping of its own
    x, escalated = solve_rows(singular, members, torch.ones(2, 16, dtype=torch.float64), 1 << 30)
    assert escalated == 1 and torch.isfinite(x).all()
    torch.testing.assert_close(x[0, :4], torch.linalg.solve(h[:4, :4], torch.ones(4, dtype=torch.float64)))
