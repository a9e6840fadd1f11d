"""Layer Hessians H = X^T X, accumulated by streaming and damped before solving.

One Hessian is shared by every row of a linear layer's weight, so it is the only
thing calibration has to keep per layer (d_in x d_in), never the activations.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from optima.linalg import Damping
from optima.model import weight_rows
from optima.target import DenseTarget


PANEL = 128   # rows of X^T X per product in ``HessianAccumulator.add``


class HessianAccumulator:
    """Streams layer inputs into ``X^T X`` without storing ``X``.

    ``add`` takes inputs of any leading shape (batch, sequence, ...) whose last
    dimension is ``d_in``; they are cast to ``dtype`` (float32 or float64) before
    the product, so bf16/fp16 models accumulate at full precision. Only the lower
    triangle is computed, in panels of ``PANEL`` rows (X^T X is symmetric), in less time than
    the full product (bench/README.md); ``sum`` mirrors it.
    """

    def __init__(self, d_in: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 name: str = "layer") -> None:
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"Hessians accumulate in float32 or float64, not {dtype}")
        self.name = name
        self.lower = torch.zeros(d_in, d_in, dtype=dtype, device=device)   # valid on and below the diagonal
        self.tokens = 0

    @property
    def d_in(self) -> int:
        return self.lower.shape[0]

    @property
    def sum(self) -> torch.Tensor:
        """``X^T X`` so far, exactly symmetric."""
        return self.lower.tril() + self.lower.tril(-1).T

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        """Add a batch of inputs ``x`` (..., d_in)."""
        if x.shape[-1] != self.d_in:
            raise ValueError(f"{self.name}: input has {x.shape[-1]} features, Hessian expects {self.d_in}")
        x = x.reshape(-1, self.d_in).to(device=self.lower.device, dtype=self.lower.dtype)
        if not torch.isfinite(x).all():
            raise FloatingPointError(f"{self.name}: calibration inputs contain NaN or Inf")
        for start in range(0, self.d_in, PANEL):
            end = min(start + PANEL, self.d_in)
            self.lower[start:end, :end].addmm_(x[:, start:end].T, x[:, :end])
        self.tokens += x.shape[0]

    def reduce_(self, reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Sum the Hessian and token count over processes with ``reduce_sum`` (e.g. a DDP all-reduce)."""
        self.lower = reduce_sum(self.lower)
        self.tokens = int(reduce_sum(torch.tensor(float(self.tokens), dtype=torch.float64,
                                                  device=self.lower.device)).item())

    def finalize(self) -> torch.Tensor:
        """Return the mean Hessian ``X^T X / tokens`` (the scale does not change the optimum)."""
        if self.tokens == 0:
            raise RuntimeError(f"{self.name}: no calibration tokens reached this layer")
        return self.sum / self.tokens


class PairedAccumulator:
    """Streams a layer's inputs in the pruned model, ``X~``, with its inputs in the dense model, ``X``, into
    ``H~ = X~^T X~``, ``C = X~^T X`` and ``H = X^T X`` (the error-correcting objective, ``optima.target``):
    two more d_in x d_in accumulators than ``HessianAccumulator``, one of them full."""

    def __init__(self, d_in: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 name: str = "layer") -> None:
        self.pruned = HessianAccumulator(d_in, dtype, device, name)
        self.dense = HessianAccumulator(d_in, dtype, device, f"{name} (dense model)")
        self.cross = torch.zeros(d_in, d_in, dtype=dtype, device=device)
        self.name = name

    @property
    def d_in(self) -> int:
        return self.pruned.d_in

    @property
    def tokens(self) -> int:
        return self.pruned.tokens

    @torch.no_grad()
    def add(self, x: torch.Tensor, dense_x: torch.Tensor) -> None:
        """Add the same tokens' inputs in the pruned model, ``x``, and in the dense model, ``dense_x``."""
        if x.shape != dense_x.shape:
            raise ValueError(f"{self.name}: pruned-model inputs {tuple(x.shape)} and dense-model inputs "
                             f"{tuple(dense_x.shape)} do not pair up token by token")
        self.pruned.add(x)
        self.dense.add(dense_x)
        flat = [t.reshape(-1, self.d_in).to(device=self.cross.device, dtype=self.cross.dtype) for t in (x, dense_x)]
        self.cross.addmm_(flat[0].T, flat[1])

    def reduce_(self, reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Sum every accumulator over processes."""
        self.pruned.reduce_(reduce_sum)
        self.dense.reduce_(reduce_sum)
        self.cross = reduce_sum(self.cross)

    def finalize(self) -> torch.Tensor:
        """The mean ``H~``: the Hessian of the problem that is solved."""
        return self.pruned.finalize()

    def target(self) -> DenseTarget:
        """The mean ``C`` and ``H``, scaled as ``finalize`` scales ``H~``."""
        return DenseTarget(self.cross / self.pruned.tokens, self.dense.finalize())


@contextmanager
def recorded_inputs(layers: dict[str, nn.Module]) -> Iterator[dict[str, torch.Tensor]]:
    """While inside, the dict holds the input of each layer of ``layers`` in its latest forward."""
    seen: dict[str, torch.Tensor] = {}

    def record(name: str, x: torch.Tensor) -> None:
        seen[name] = x.detach()

    handles = [layer.register_forward_pre_hook(lambda _m, args, name=name: record(name, args[0]))
               for name, layer in layers.items()]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def hessian_hooks(layers: dict[str, nn.Module], dtype: torch.dtype, dense_inputs: Mapping[str, torch.Tensor] | None = None
                  ) -> Iterator[dict[str, HessianAccumulator | PairedAccumulator]]:
    """While inside, every forward of a layer in ``layers`` adds its input to that layer's Hessian.

    With ``dense_inputs`` (the same layers' inputs in the dense model, refreshed before each forward, as
    ``recorded_inputs`` keeps them) the accumulators are ``PairedAccumulator``s fed both.

    Layers that read the very same input tensor (a Llama block's q/k/v projections, its
    gate/up projections) share one accumulator: found in the first forward pass, the first
    of them adds the input, the others only check on every later pass that they still read
    that tensor. A Llama block accumulates 4 Hessians instead of 7.
    """
    kind = HessianAccumulator if dense_inputs is None else PairedAccumulator
    accumulators = {name: kind(weight_rows(layer).shape[1], dtype=dtype, device=layer.weight.device, name=name)
                    for name, layer in layers.items()}
    shares: dict[str, str] = {}               # layer -> the layer whose accumulator it shares
    last: list = [None, None]                 # the accumulating layer that ran last, and its input
    started: set[str] = set()

    def hook(name: str, x: torch.Tensor) -> None:
        if name not in started:                 # first call: did the layer before read this very tensor?
            started.add(name)
            if last[1] is x:
                shares[name], accumulators[name] = last[0], accumulators[last[0]]
        if name in shares:
            if last[0] != shares[name] or last[1] is not x:
                raise RuntimeError(f"{name} shared the input of {shares[name]} in the first calibration pass "
                                   "but not in a later one; its Hessian cannot be shared")
            return
        if dense_inputs is None:
            accumulators[name].add(x)
        else:
            accumulators[name].add(x, dense_inputs[name])
        last[:] = [name, x]

    handles = [layer.register_forward_pre_hook(lambda _m, args, name=name: hook(name, args[0]))
               for name, layer in layers.items()]
    try:
        yield accumulators
    finally:
        last.clear()
        for handle in handles:
            handle.remove()


def damp_hessian(hessian: torch.Tensor, frac: float) -> tuple[torch.Tensor, Damping]:
    """Return ``H + frac * mean(diag H) * I`` with dead inputs given a unit diagonal.

    A dead input (zero column of X) has a zero row and column in H; giving it a
    positive diagonal decouples it, so its weight is left unchanged by any update
    instead of making the kept-set system singular. Works on a copy.
    """
    if frac < 0:
        raise ValueError(f"damping must be >= 0, got {frac}")
    h = hessian.clone()
    diag = h.diagonal()
    dead = diag <= 0
    live_mean = diag[~dead].mean().item() if (~dead).any() else 0.0
    scale = live_mean if live_mean > 0 else 1.0
    h[dead, :] = 0
    h[:, dead] = 0
    diag[dead] = scale
    value = frac * scale
    diag += value
    return h, Damping(frac=frac, value=value, dead_inputs=int(dead.sum()))
