"""Streaming Hessian accumulation, damping, and escalating Cholesky."""

from __future__ import annotations

import pytest
import torch

from conftest import MINILM_LAYERS, MINILM_SEQ_LEN, MINILM_SEQUENCES
from torch import nn

from optima import HessianAccumulator, damp_hessian
from optima.hessian import PANEL, hessian_hooks
from optima.linalg import Damping, cholesky_escalating


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_streaming_over_any_leading_shape_equals_one_shot_product(dtype):
    g = torch.Generator().manual_seed(0)
    chunks = [torch.randn(3, 7, 16, generator=g), torch.randn(5, 16, generator=g),
              torch.randn(2, 2, 4, 16, generator=g).to(torch.bfloat16),
              torch.randn(16, 6, generator=g, dtype=torch.float64).T,    # non-contiguous
              torch.randn(16, generator=g) * 50]                          # a single token, large
    acc = HessianAccumulator(16, dtype=dtype)
    for chunk in chunks:
        acc.add(chunk)
    x = torch.cat([c.reshape(-1, 16).double() for c in chunks])
    assert acc.tokens == x.shape[0] == 3 * 7 + 5 + 2 * 2 * 4 + 6 + 1
    expected = x.T @ x / x.shape[0]
    result = acc.finalize()
    assert result.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(result.double(), expected, rtol=tol, atol=tol * float(expected.abs().max()))
    torch.testing.assert_close(acc.sum.double(), x.T @ x, rtol=tol, atol=tol * float((x.T @ x).abs().max()))


def test_bad_inputs_name_the_layer():
    acc = HessianAccumulator(8, name="blocks.3.mlp.up")
    with pytest.raises(ValueError, match="blocks.3.mlp.up.*4 features"):
        acc.add(torch.randn(2, 4))
    for bad in (float("nan"), float("inf")):
        x = torch.randn(5, 8)
        x[1, 2] = bad
        with pytest.raises(FloatingPointError, match="blocks.3.mlp.up"):
            acc.add(x)
    assert acc.tokens == 0 and not acc.sum.any()  # rejected batches left no trace
    with pytest.raises(RuntimeError, match="no calibration tokens"):
        acc.finalize()
    with pytest.raises(ValueError, match="float32 or float64"):
        HessianAccumulator(8, dtype=torch.bfloat16)


def test_hessian_hooks_accumulate_each_layers_inputs_and_are_removed_on_exit():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    x = torch.randn(4, 7, 6)
    with hessian_hooks({"first": net[0], "last": net[2]}, torch.float64) as accumulators:
        with torch.no_grad():
            net(x[:2])
            net(x[2:])
    assert set(accumulators) == {"first", "last"}
    assert accumulators["first"].name == "first" and accumulators["first"].sum.dtype == torch.float64
    inputs = {"first": x.reshape(-1, 6).double(), "last": net[1](net[0](x)).detach().reshape(-1, 5).double()}
    for name, acc in accumulators.items():
        assert acc.tokens == 28
        torch.testing.assert_close(acc.finalize(), inputs[name].T @ inputs[name] / 28, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        net(x)                                                  # after the block: no hook left behind
    assert all(acc.tokens == 28 for acc in accumulators.values())
    assert not net[0]._forward_pre_hooks and not net[2]._forward_pre_hooks


def test_reduce_sums_partial_hessians():
    x = torch.randn(10, 6, dtype=torch.float64)
    a, b = HessianAccumulator(6, torch.float64), HessianAccumulator(6, torch.float64)
    a.add(x[:4])
    b.add(x[4:])
    other_process = {2: b.lower, 0: torch.tensor(float(b.tokens), dtype=torch.float64)}  # by tensor rank
    a.reduce_(lambda t: t + other_process[t.dim()])  # a stand-in for a 2-process all-reduce(sum)
    assert a.tokens == 10
    torch.testing.assert_close(a.finalize(), x.T @ x / 10)


def test_damping_is_relative_and_decouples_dead_inputs():
    x = torch.randn(50, 6, dtype=torch.float64)
    x[:, 4] = 0
    h = x.T @ x
    original = h.clone()
    damped, info = damp_hessian(h, 0.1)
    assert torch.equal(h, original)  # works on a copy
    live = torch.tensor([0, 1, 2, 3, 5])
    mean = h.diagonal()[live].mean()
    assert info.dead_inputs == 1 and info.value == pytest.approx(0.1 * float(mean))
    torch.testing.assert_close(damped.diagonal()[live], h.diagonal()[live] + 0.1 * mean)
    off = ~torch.eye(6, dtype=torch.bool)
    assert torch.equal(damped[off], h[off])  # only the diagonal moves
    assert damped[4, 4] == pytest.approx(1.1 * float(mean))
    assert (damped[4, live] == 0).all()
    assert torch.linalg.eigvalsh(damped).min() > 0
    with pytest.raises(ValueError):
        damp_hessian(h, -1.0)


def test_zero_damping_is_a_no_op_and_an_all_dead_hessian_becomes_identity():
    h = torch.randn(30, 5, dtype=torch.float64)
    h = h.T @ h
    same, info = damp_hessian(h, 0.0)
    assert torch.equal(same, h) and info.value == 0.0 and info.dead_inputs == 0
    eye, info = damp_hessian(torch.zeros(4, 4), 0.5)
    torch.testing.assert_close(eye, 1.5 * torch.eye(4))
    assert info.dead_inputs == 4


def test_cholesky_escalates_on_a_singular_hessian_and_reports_it():
    x = torch.randn(3, 8, dtype=torch.float64)                 # rank 3 < 8: singular
    h = x.T @ x
    h[:, 0] = h[0, :] = 0.0
    h[0, 0] = -1e-9                                             # numerically indefinite, undamped
    factored, chol, damping = cholesky_escalating(h, Damping(0.0, 0.0, 0))
    assert damping.value > 0
    torch.testing.assert_close(factored, h + damping.value * torch.eye(8, dtype=torch.float64))
    torch.testing.assert_close(chol @ chol.T, factored)
    good = h + torch.eye(8, dtype=torch.float64)
    same, _, unchanged = cholesky_escalating(good, Damping(0.01, 0.5, 0))
    assert same is good and unchanged.value == 0.5
    with pytest.raises(torch.linalg.LinAlgError, match="not positive definite"):
        cholesky_escalating(-torch.eye(3), Damping(0.0, 0.0, 0), tries=3)


def test_real_minilm_hessians_are_symmetric_psd_means(minilm_layers):
    for name, (weight, hessian) in minilm_layers.items():
        assert tuple(weight.shape) == MINILM_LAYERS[name]
        assert hessian.shape == (weight.shape[1], weight.shape[1]) and hessian.dtype == torch.float64
        torch.testing.assert_close(hessian, hessian.T, rtol=0, atol=1e-12 * float(hessian.abs().max()))
        eig = torch.linalg.eigvalsh(hessian)
        assert eig.min() > -1e-9 * eig.max(), name
        assert (hessian.diagonal() > 0).all(), name  # every input was active on some token
        if name.endswith("output.dense"):  # d=1536 from 16 x 128 = 2048 tokens: far from well conditioned
            assert MINILM_SEQUENCES * MINILM_SEQ_LEN == 2048 and eig.max() / eig.min().clamp_min(1e-300) > 1e5


def test_layers_reading_the_same_input_share_one_hessian():
    """A Llama block: q/k/v read one tensor, gate/up another; 4 accumulators instead of 7, each exact."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config).eval()
    block = model.model.layers[0]
    layers = {name: module for name, module in block.named_modules() if isinstance(module, nn.Linear)}
    captured: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    handles = [m.register_forward_pre_hook(lambda _m, args, n=n: captured[n].append(args[0].detach().clone()))
               for n, m in layers.items()]
    ids = torch.randint(0, 64, (3, 2, 10))
    with hessian_hooks(layers, torch.float64) as accumulators, torch.no_grad():
        for batch in ids:
            model(input_ids=batch)
    for h in handles:
        h.remove()
    assert len({id(acc) for acc in accumulators.values()}) == 4
    assert accumulators["self_attn.q_proj"] is accumulators["self_attn.k_proj"] is accumulators["self_attn.v_proj"]
    assert accumulators["mlp.gate_proj"] is accumulators["mlp.up_proj"]
    for name, acc in accumulators.items():
        x = torch.cat([c.reshape(-1, c.shape[-1]) for c in captured[name]]).double()
        assert acc.tokens == 60
        torch.testing.assert_close(acc.finalize(), x.T @ x / 60, rtol=1e-12, atol=1e-12)


def test_a_layer_that_stops_sharing_its_input_is_an_error():
    shared = nn.Linear(4, 4)
    other = nn.Linear(4, 4)
    x = torch.randn(2, 4)
    with pytest.raises(RuntimeError, match="b shared the input of a"):
        with hessian_hooks({"a": shared, "b": other}, torch.float64), torch.no_grad():
            shared(x), other(x)            # first pass: the same tensor, so b shares a's Hessian
            shared(x), other(x.clone())    # a later pass: a different tensor


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_lower_triangle_panels_give_the_whole_symmetric_product(dtype, tol):
    d = 2 * PANEL + 44                                        # three panels, the last one partial
    x = torch.randn(500, d, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    acc = HessianAccumulator(d, dtype=dtype)
    acc.add(x[:200].to(dtype))
    acc.add(x[200:].to(dtype))
    assert not acc.lower.triu(PANEL).any()                   # the blocks above the diagonal are never computed
    assert torch.equal(acc.sum, acc.sum.T)                   # the mirror is exactly symmetric
    expected = x.T @ x
    torch.testing.assert_close(acc.sum.double(), expected, rtol=tol, atol=tol * float(expected.abs().max()))
