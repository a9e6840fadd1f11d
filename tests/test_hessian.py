"""Streaming Hessian accumulation and damping."""

from __future__ import annotations

import pytest
import torch

from optima import HessianAccumulator, damp_hessian


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_streaming_equals_one_shot_product(dtype):
    g = torch.Generator().manual_seed(0)
    chunks = [torch.randn(3, 7, 16, generator=g), torch.randn(5, 16, generator=g),
              torch.randn(2, 2, 4, 16, generator=g).to(torch.bfloat16)]
    acc = HessianAccumulator(16, dtype=dtype)
    for chunk in chunks:
        acc.add(chunk)
    x = torch.cat([c.reshape(-1, 16).double() for c in chunks])
    assert acc.tokens == x.shape[0] == 42
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(acc.finalize().double(), x.T @ x / 42, rtol=tol, atol=tol)


def test_bad_inputs_name_the_layer():
    acc = HessianAccumulator(8, name="blocks.3.mlp.up")
    with pytest.raises(ValueError, match="blocks.3.mlp.up.*4 features"):
        acc.add(torch.randn(2, 4))
    x = torch.randn(5, 8)
    x[1, 2] = float("nan")
    with pytest.raises(FloatingPointError, match="blocks.3.mlp.up"):
        acc.add(x)
    with pytest.raises(RuntimeError, match="no calibration tokens"):
        acc.finalize()
    with pytest.raises(ValueError, match="float32 or float64"):
        HessianAccumulator(8, dtype=torch.bfloat16)


def test_reduce_sums_partial_hessians():
    x = torch.randn(10, 6, dtype=torch.float64)
    a, b = HessianAccumulator(6, torch.float64), HessianAccumulator(6, torch.float64)
    a.add(x[:4])
    b.add(x[4:])
    other_process = {2: b.sum, 0: torch.tensor(float(b.tokens), dtype=torch.float64)}  # by tensor rank
    a.reduce_(lambda t: t + other_process[t.dim()])  # a stand-in for a 2-process all-reduce(sum)
    assert a.tokens == 10
    torch.testing.assert_close(a.finalize(), x.T @ x / 10)


def test_damping_is_relative_and_decouples_dead_inputs():
    x = torch.randn(50, 6, dtype=torch.float64)
    x[:, 4] = 0
    h = x.T @ x
    damped, info = damp_hessian(h, 0.1)
    live = torch.tensor([0, 1, 2, 3, 5])
    mean = h.diagonal()[live].mean()
    assert info.dead_inputs == 1 and info.value == pytest.approx(0.1 * float(mean))
    torch.testing.assert_close(damped.diagonal()[live], h.diagonal()[live] + 0.1 * mean)
    assert damped[4, 4] == pytest.approx(1.1 * float(mean))
    assert (damped[4, live] == 0).all()
    assert torch.linalg.eigvalsh(damped).min() > 0
    with pytest.raises(ValueError):
        damp_hessian(h, -1.0)
