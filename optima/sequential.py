"""The block-by-block walk over a model: calibrate, prune, propagate.

Sequential mode (SparseGPT's and the paper's scheme): the inputs of the first block
are captured once per calibration batch; then for each block in turn its linear
layers' Hessians are accumulated from those inputs, the layers are pruned, and the
pruned block is run again to produce the next block's inputs. Only one block's
Hessians are alive at a time and no block runs more than twice per batch.
One-pass mode accumulates every layer's Hessian in a single dense forward pass.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from optima.config import PruneConfig
from optima.hessian import HessianAccumulator
from optima.model import LayerSelection, find_blocks, layers_by_block, set_weight_rows, weight_rows
from optima.prune import PruneStats, prune_weight
from optima.resume import BlockCheckpoints, fingerprint


@dataclass
class LayerRecord:
    """One pruned layer, for the report."""

    name: str
    block: int
    shape: tuple[int, int]
    target_sparsity: float
    tokens: int
    stats: PruneStats

    def as_dict(self) -> dict[str, Any]:
        return {"layer": self.name, "block": self.block, "shape": list(self.shape),
                "target_sparsity": self.target_sparsity, "tokens": self.tokens, **self.stats.as_dict()}


@dataclass
class PruneReport:
    """Everything a pruning run measured."""

    layers: list[LayerRecord] = field(default_factory=list)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)   # where the time went

    def add_time(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds


class _Captured(Exception):
    """Raised by the capture hook to stop the forward pass after the first block's inputs."""


class BlockInputs:
    """Positional and keyword inputs of a block, one entry per calibration batch."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple, dict]] = []

    def append(self, args: tuple, kwargs: dict) -> None:
        self.calls.append((args, kwargs))

    def __len__(self) -> int:
        return len(self.calls)

    def to(self, device: torch.device | str) -> None:
        """Move every tensor of every call (nested in tuples/dicts too) to ``device``."""
        self.calls = [(_move(args, device), _move(kwargs, device)) for args, kwargs in self.calls]

    def replace_hidden(self, outputs: list[torch.Tensor]) -> None:
        """Feed each batch's block output in as the next block's hidden states."""
        new = []
        for (args, kwargs), hidden in zip(self.calls, outputs):
            if args:
                new.append(((hidden, *args[1:]), kwargs))
            else:
                new.append(((), {**kwargs, "hidden_states": hidden}))
        self.calls = new


def _move(obj: Any, device: torch.device | str) -> Any:
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_move(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _move(v, device) for k, v in obj.items()}
    return obj


def _hidden(output: Any) -> torch.Tensor:
    """A block's hidden-state output, whether returned bare or first in a tuple."""
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def capture_block_inputs(model: nn.Module, batches: Iterable[Any], run_batch: Callable[[Any], Any]) -> BlockInputs:
    """Run ``run_batch`` on each batch up to the first block, recording that block's inputs."""
    _, blocks = find_blocks(model)
    inputs = BlockInputs()

    def hook(_module, args, kwargs):
        inputs.append(tuple(a.detach() if torch.is_tensor(a) else a for a in args), dict(kwargs))
        raise _Captured

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            try:
                run_batch(batch)
            except _Captured:
                continue
            raise RuntimeError("the forward pass never reached the first block")
    finally:
        handle.remove()
    if not len(inputs):
        raise ValueError("the calibration set is empty")
    return inputs


def _attach_accumulators(layers: dict[str, nn.Module], dtype: torch.dtype) -> tuple[dict, list]:
    """Forward pre-hooks streaming each layer's inputs into its own Hessian."""
    accumulators, handles = {}, []
    for name, layer in layers.items():
        acc = HessianAccumulator(weight_rows(layer).shape[1], dtype=dtype, device=layer.weight.device, name=name)
        accumulators[name] = acc
        handles.append(layer.register_forward_pre_hook(lambda _m, args, acc=acc: acc.add(args[0])))
    return accumulators, handles


def _prune_layers(layers: dict[str, nn.Module], accumulators: dict[str, HessianAccumulator], block: int,
                  config: PruneConfig, report: PruneReport, on_layer: Callable[[LayerRecord], None] | None,
                  reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
    for name, layer in layers.items():
        acc = accumulators.pop(name)
        start = time.perf_counter()
        if reduce_sum is not None:
            acc.reduce_(reduce_sum)
        hessian = acc.finalize()
        pattern = config.pattern_for(name)
        result = prune_weight(weight_rows(layer).detach(), hessian, sparsity=pattern.sparsity if not pattern.structured
                              else None, pattern=config.pattern, mask=config.mask, update=config.update,
                              damp=config.damp, solver_options=config.solver, blocksize=config.blocksize)
        set_weight_rows(layer, result.weight)
        report.masks[name] = result.keep.cpu()
        if acc.tokens < acc.d_in:
            result.stats.notes.append(f"{acc.tokens} calibration tokens for {acc.d_in} inputs: H is rank-deficient, "
                                      "damping decides the null space")
        record = LayerRecord(name, block, tuple(result.weight.shape), pattern.sparsity, acc.tokens, result.stats)
        report.layers.append(record)
        report.add_time("mask", result.stats.seconds_mask)
        report.add_time("update", result.stats.seconds_update)
        report.add_time("stats", time.perf_counter() - start - result.stats.seconds_mask - result.stats.seconds_update)
        if on_layer:
            on_layer(record)


def _restore_block(layers: dict[str, nn.Module], saved: dict[str, Any], report: PruneReport,
                   on_layer: Callable[[LayerRecord], None] | None) -> None:
    """Put a finished block's saved weights, masks and records back (resuming a run)."""
    for name, layer in layers.items():
        set_weight_rows(layer, saved["weights"][name].to(layer.weight.device))
        report.masks[name] = saved["masks"][name]
    for record in saved["records"]:
        report.layers.append(record)
        if on_layer:
            on_layer(record)


def _finish_block(i: int, layers: dict[str, nn.Module], report: PruneReport,
                  checkpoints: BlockCheckpoints | None) -> None:
    if checkpoints is not None:
        checkpoints.save(i, {"weights": {n: weight_rows(m).detach().cpu().clone() for n, m in layers.items()},
                             "masks": {n: report.masks[n] for n in layers},
                             "records": [r for r in report.layers if r.block == i]})


@torch.no_grad()
def prune_model(model: nn.Module, batches: Sequence[Any], run_batch: Callable[[Any], Any], config: PruneConfig,
                selection: LayerSelection = LayerSelection(), sequential: bool = True,
                on_layer: Callable[[LayerRecord], None] | None = None,
                on_block: Callable[[int, int], None] | None = None,
                resume_dir: str | None = None,
                reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
                execution_device: torch.device | str | None = None) -> PruneReport:
    """Prune every selected linear layer of ``model`` in place; return the report.

    ``run_batch(batch)`` runs the model's forward on one calibration batch.
    ``on_layer`` is called after each layer, ``on_block(i, n)`` before each block.
    With ``resume_dir`` every finished block is checkpointed there, and a rerun of the
    same pruning (same options, model layers and batches) picks up after the last one,
    giving the same weights as an uninterrupted run. ``reduce_sum`` sums a tensor over
    processes (data-parallel calibration: each process feeds its own shard of batches,
    Hessians are summed before solving, so every process computes the same weights).
    ``execution_device`` (sequential mode) offloads: the model stays where it is (e.g. CPU
    memory) and each block visits that device (e.g. a GPU) only while it is calibrated,
    pruned and run, so a model larger than the device's memory can be pruned.
    """
    _, blocks = find_blocks(model)
    per_block = layers_by_block(model, selection)
    for layers in per_block:
        for name, layer in layers.items():
            config.pattern_for(name).check(weight_rows(layer).shape[1])
    checkpoints = None
    if resume_dir is not None:
        layout = [[(n, tuple(weight_rows(m).shape)) for n, m in layers.items()] for layers in per_block]
        checkpoints = BlockCheckpoints(resume_dir, fingerprint(repr(config), sequential, layout, list(batches)))
    report = PruneReport()
    was_training = model.training
    model.eval()
    try:
        if sequential:
            start = time.perf_counter()
            inputs = capture_block_inputs(model, batches, run_batch)
            if execution_device is not None:
                inputs.to(execution_device)
            report.add_time("forward", time.perf_counter() - start)
            for i, (block, layers) in enumerate(zip(blocks, per_block)):
                if on_block:
                    on_block(i, len(blocks))
                home = next(block.parameters()).device
                if execution_device is not None:
                    block.to(execution_device)
                saved = checkpoints.load(i) if checkpoints else None
                if saved is not None:
                    _restore_block(layers, saved, report, on_layer)
                else:
                    accumulators, handles = _attach_accumulators(layers, config.hessian_dtype)
                    start = time.perf_counter()
                    try:
                        for args, kwargs in inputs.calls:
                            block(*args, **kwargs)
                    finally:
                        for h in handles:
                            h.remove()
                    report.add_time("forward+hessian", time.perf_counter() - start)
                    _prune_layers(layers, accumulators, i, config, report, on_layer, reduce_sum)
                    _finish_block(i, layers, report, checkpoints)
                if i + 1 < len(blocks):
                    start = time.perf_counter()
                    inputs.replace_hidden([_hidden(block(*a, **k)) for a, k in inputs.calls])
                    report.add_time("forward", time.perf_counter() - start)
                block.to(home)
        else:
            saved = [checkpoints.load(i) if checkpoints else None for i in range(len(blocks))]
            todo = {n: m for layers, done in zip(per_block, saved) if done is None for n, m in layers.items()}
            accumulators, handles = _attach_accumulators(todo, config.hessian_dtype)
            start = time.perf_counter()
            try:
                for batch in batches if todo else ():
                    run_batch(batch)
            finally:
                for h in handles:
                    h.remove()
            report.add_time("forward+hessian", time.perf_counter() - start)
            for i, layers in enumerate(per_block):
                if on_block:
                    on_block(i, len(blocks))
                if saved[i] is not None:
                    _restore_block(layers, saved[i], report, on_layer)
                else:
                    _prune_layers(layers, accumulators, i, config, report, on_layer, reduce_sum)
                    _finish_block(i, layers, report, checkpoints)
    finally:
        model.train(was_training)
    return report
