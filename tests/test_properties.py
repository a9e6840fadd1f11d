"""Property test over shapes, sparsities, patterns, masks, solvers and dtypes."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from optima import SolverOptions, parse_pattern, prune_weight
from optima.config import OWN_UPDATES, PruneConfig
from optima.masks import MASK_SCOPES, MASK_SELECTORS, check_mask


@st.composite
def problems(draw):
    pattern = draw(st.sampled_from(["unstructured", "2:4", "4:8", "1:4"]))
    m = 1 if pattern == "unstructured" else int(pattern.split(":")[1])
    d = m * draw(st.integers(min_value=max(1, 4 // m), max_value=64 // m))
    rows = draw(st.integers(min_value=1, max_value=12))
    tokens = draw(st.integers(min_value=1, max_value=3 * d))       # rank-deficient H included
    sparsity = draw(st.floats(0.05, 0.95)) if pattern == "unstructured" else None
    seed = draw(st.integers(0, 2 ** 16))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e4]))                # huge dynamic range too
    dead = draw(st.integers(0, d // 4))
    return dict(pattern=pattern, d=d, rows=rows, tokens=tokens, sparsity=sparsity, seed=seed, scale=scale,
                dead=dead, mask=draw(st.sampled_from(MASK_SELECTORS)),
                method=draw(st.sampled_from(["direct", "pcg"])),
                dtype=draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16])),
                damp=draw(st.sampled_from([0.0, 0.01, 0.1])))


# derandomize: the same 300 problems every run, so CI cannot fail on a draw no earlier run saw
@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_pruning_never_breaks_its_promises(p):
    g = torch.Generator().manual_seed(p["seed"])
    x = torch.randn(p["tokens"], p["d"], generator=g)
    x[:, : max(1, p["d"] // 8)] *= p["scale"]                     # outlier features
    if p["dead"]:
        x[:, -p["dead"]:] = 0
    weight = torch.randn(p["rows"], p["d"], generator=g).to(p["dtype"])
    own = next((u for u in OWN_UPDATES if p["mask"].startswith(u)), None)   # the selector's own update
    update = own if own and p["seed"] % 2 else "optima"
    config = PruneConfig(sparsity=p["sparsity"], pattern=p["pattern"], mask=p["mask"], update=update, damp=p["damp"],
                         solver=SolverOptions(method=p["method"], compile=False))
    result = prune_weight(weight, x.T @ x / p["tokens"], config)
    assert result.weight.dtype == p["dtype"]
    assert torch.isfinite(result.weight).all()
    assert (result.weight[~result.keep] == 0).all()
    check_mask(result.keep, parse_pattern(p["pattern"], p["sparsity"]), MASK_SCOPES[p["mask"]])
    assert result.stats.objective <= result.stats.objective_none
    # with a positive definite (damped) H the exact update keeps that promise itself, not through the fallback
    # to no update; the selectors' own greedy updates need not, nor does CG on a singular H (damp 0, fewer
    # tokens than inputs), where the fallback is the safety net
    assert update != "optima" or not p["damp"] or not result.stats.fell_back_to_none, result.stats.notes
