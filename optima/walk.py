"""The block-by-block walk over a model: calibrate, prune, propagate.

Sequential walk (SparseGPT's and the paper's scheme): the inputs of the first block
are captured once per calibration batch; then for each block in turn its linear
layers' Hessians are accumulated from those inputs, the layers are pruned, and the
pruned block is run again to produce the next block's inputs. Only one block's
Hessians are alive at a time and no block runs more than twice per batch.
True-sequential: within a block, the layers are pruned group by group in the order they
run, each group calibrated by one more pass over the block as pruned so far.
Error-correcting target: a second stream carries the dense model's block inputs, and a
dense copy of each block feeds every layer's dense-model inputs beside its pruned-model ones.
One-pass walk: every layer's Hessian from a single pass of the dense model.
"""

from __future__ import annotations

import copy
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from optima.config import OptionError, PruneConfig
from optima.hessian import HessianAccumulator, PairedAccumulator, hessian_hooks, recorded_inputs
from optima.model import LayerSelection, find_blocks, layers_by_block, set_weight_rows, weight_rows
from optima.owl import input_norms, owl_sparsities
from optima.prune import prune_weight
from optima.report import LayerRecord, PruneReport
from optima.resume import BlockCheckpoints, fingerprint
from optima.share import RowShare


@dataclass
class RunOptions:
    """How a pruning run is carried out; none of these change its result.

    ``on_layer(record)`` is called after each layer, ``on_block(i, n)`` before each block.
    With ``resume_dir`` every finished block is checkpointed there, and a rerun of the
    same pruning (same options, model layers and batches) picks up after the last one.
    ``reduce_sum`` sums a tensor over processes (data-parallel calibration: each process
    feeds its own shard of batches; Hessians are summed before solving, so every process
    computes the same weights); ``row_share`` then splits each layer's OPTIMA solve between the
    processes (``optima.share``), which all end with the same weights. ``execution_device``
    offloads the sequential walk (the one-pass walk refuses it): the model stays where it is and
    each block visits that device only while it is calibrated, pruned and run, so a model larger
    than the device's memory can be pruned.
    """

    on_layer: Callable[[LayerRecord], None] | None = None
    on_block: Callable[[int, int], None] | None = None
    resume_dir: str | None = None
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None
    row_share: RowShare | None = None
    execution_device: torch.device | str | None = None


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


def _accumulate(layers: dict[str, nn.Module], forward: Callable[[], Any], config: PruneConfig,
                run: RunOptions, dense_inputs: dict[str, torch.Tensor] | None = None
                ) -> dict[str, HessianAccumulator | PairedAccumulator]:
    """Each layer's Hessian from the inputs ``forward()`` feeds it, summed over processes when
    calibration is data-parallel (a Hessian shared by several layers once). With ``dense_inputs``
    (kept current by ``forward``) the dense-model inputs are accumulated beside them."""
    with hessian_hooks(layers, config.hessian_torch_dtype, dense_inputs) as accumulators:
        forward()
    if run.reduce_sum is not None:
        for acc in {id(acc): acc for acc in accumulators.values()}.values():
            acc.reduce_(run.reduce_sum)
    return accumulators


def _prune_layers(layers: dict[str, nn.Module], accumulators: dict[str, HessianAccumulator | PairedAccumulator],
                  block: int, walk: _Walk) -> None:
    """Prune each layer of block ``block`` from its accumulated Hessian and record it in the report."""
    config, report, run = walk.config, walk.report, walk.run
    for name, layer in layers.items():
        acc = accumulators.pop(name)
        start = time.perf_counter()
        pattern = config.pattern_for(name)
        target = acc.target() if isinstance(acc, PairedAccumulator) else None
        result = prune_weight(weight_rows(layer).detach(), acc.finalize(), config, pattern=pattern,
                              share=run.row_share, target=target)
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
        if run.on_layer:
            run.on_layer(record)


def _restore_block(layers: dict[str, nn.Module], saved: dict[str, Any], report: PruneReport,
                   run: RunOptions) -> None:
    """Put a finished block's saved weights, masks and records back (resuming a run)."""
    for name, layer in layers.items():
        set_weight_rows(layer, saved["weights"][name].to(layer.weight.device))
        report.masks[name] = saved["masks"][name]
    for record in saved["records"]:
        report.layers.append(record)
        if run.on_layer:
            run.on_layer(record)


def _finish_block(i: int, layers: dict[str, nn.Module], report: PruneReport,
                  checkpoints: BlockCheckpoints | None) -> None:
    if checkpoints is not None:
        checkpoints.save(i, {"weights": {n: weight_rows(m).detach().cpu().clone() for n, m in layers.items()},
                             "masks": {n: report.masks[n] for n in layers},
                             "records": [r for r in report.layers if r.block == i]})


def _timed(report: PruneReport, phase: str, fn: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    out = fn()
    report.add_time(phase, time.perf_counter() - start)
    return out


@dataclass
class _Walk:
    """What every step of a walk over the model shares."""

    model: nn.Module
    batches: Sequence[Any]
    run_batch: Callable[[Any], Any]
    per_block: list[dict[str, nn.Module]]   # the layers to prune, block by block
    config: PruneConfig
    run: RunOptions
    checkpoints: BlockCheckpoints | None
    report: PruneReport


class _Reached(Exception):
    """Raised to end a block's forward once the layer group being calibrated has had its inputs."""


def _raise_reached(_module: nn.Module, _args: tuple) -> None:
    raise _Reached


@contextmanager
def _stopping_at(layer: nn.Module | None) -> Iterator[None]:
    """While inside, every forward that reaches ``layer`` ends there (after the hooks registered before)."""
    handle = None if layer is None else layer.register_forward_pre_hook(_raise_reached)
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()


def _run(block: nn.Module, args: tuple, kwargs: dict) -> None:
    try:
        block(*args, **kwargs)
    except _Reached:
        pass


def layer_groups(block: nn.Module, layers: dict[str, nn.Module], call: tuple[tuple, dict]) -> list[dict[str, nn.Module]]:
    """``layers`` in groups, in the order one forward of ``block`` on ``call`` runs them: consecutive
    layers reading the very same input form a group (a Llama block: q/k/v, o, gate/up, down)."""
    order: list[tuple[str, torch.Tensor]] = []
    handles = [layer.register_forward_pre_hook(lambda _m, args, name=name: order.append((name, args[0])))
               for name, layer in layers.items()]
    try:
        block(*call[0], **call[1])
    finally:
        for handle in handles:
            handle.remove()
    groups: list[dict[str, nn.Module]] = []
    for position, (name, x) in enumerate(order):
        if any(name in group for group in groups):
            continue
        if groups and order[position - 1][1] is x:
            groups[-1][name] = layers[name]
        else:
            groups.append({name: layers[name]})
    return groups


def _calibrate_block(block: nn.Module, dense_block: nn.Module | None, layers: dict[str, nn.Module], i: int,
                     streams: tuple[BlockInputs, BlockInputs | None], walk: _Walk) -> None:
    """Accumulate and prune block ``i``'s layers, group by group when true-sequential (each group's
    pass stops at its last layer); with ``dense_block`` (the block before pruning, fed the dense
    stream) every layer also accumulates its dense-model inputs."""
    inputs, dense = streams
    by_group = walk.config.true_sequential
    groups = layer_groups(block, layers, inputs.calls[0]) if by_group else [layers]
    names = {module: name for name, module in block.named_modules()}
    for group in groups:
        twins = {} if dense_block is None else {n: dense_block.get_submodule(names[m]) for n, m in group.items()}
        last = list(group)[-1] if by_group else None

        def forward() -> None:
            with _stopping_at(group.get(last)), _stopping_at(twins.get(last)):
                for k, (args, kwargs) in enumerate(inputs.calls):
                    if dense_block is not None:   # first, so that ``seen`` holds this batch's dense inputs
                        _run(dense_block, *dense.calls[k])
                    _run(block, args, kwargs)

        with recorded_inputs(twins) as seen:
            accumulators = _timed(walk.report, "forward+hessian", lambda: _accumulate(
                group, forward, walk.config, walk.run, seen if dense_block is not None else None))
        _prune_layers(group, accumulators, i, walk)


def _walk_sequential(walk: _Walk) -> None:
    """Calibrate and prune each block on the outputs of the already pruned blocks before it."""
    run, report = walk.run, walk.report
    _, blocks = find_blocks(walk.model)
    inputs = _timed(report, "forward", lambda: capture_block_inputs(walk.model, walk.batches, walk.run_batch))
    if run.execution_device is not None:
        inputs.to(run.execution_device)
    dense = None
    if walk.config.target == "dense":   # the dense model's block inputs: the same calls, until the blocks differ
        dense = BlockInputs()
        dense.calls = list(inputs.calls)
    for i, (block, layers) in enumerate(zip(blocks, walk.per_block)):
        if run.on_block:
            run.on_block(i, len(blocks))
        home = next(block.parameters()).device
        if run.execution_device is not None:
            block.to(run.execution_device)
        dense_block = copy.deepcopy(block) if dense is not None else None
        saved = walk.checkpoints.load(i) if walk.checkpoints else None
        if saved is not None:
            _restore_block(layers, saved, report, run)
        else:
            _calibrate_block(block, dense_block, layers, i, (inputs, dense), walk)
            _finish_block(i, layers, report, walk.checkpoints)
        if i + 1 < len(blocks):
            outputs = _timed(report, "forward", lambda: [_hidden(block(*a, **k)) for a, k in inputs.calls])
            inputs.replace_hidden(outputs)
            if dense is not None:
                outputs = _timed(report, "forward", lambda: [_hidden(dense_block(*a, **k)) for a, k in dense.calls])
                dense.replace_hidden(outputs)
        del dense_block
        block.to(home)


def _walk_one_pass(walk: _Walk) -> None:
    """Accumulate every layer's Hessian in one pass of the dense model, then prune block by block."""
    run, report, per_block = walk.run, walk.report, walk.per_block
    saved = [walk.checkpoints.load(i) if walk.checkpoints else None for i in range(len(per_block))]
    todo = {n: m for layers, done in zip(per_block, saved) if done is None for n, m in layers.items()}
    accumulators = _timed(report, "forward+hessian", lambda: _accumulate(
        todo, lambda: [walk.run_batch(b) for b in (walk.batches if todo else ())], walk.config, run))
    for i, layers in enumerate(per_block):
        if run.on_block:
            run.on_block(i, len(per_block))
        if saved[i] is not None:
            _restore_block(layers, saved[i], report, run)
        else:
            _prune_layers(layers, accumulators, i, walk)
            _finish_block(i, layers, report, walk.checkpoints)


def _with_owl_budgets(model: nn.Module, batches: Sequence[Any], run_batch: Callable[[Any], Any],
                      config: PruneConfig, run: RunOptions) -> PruneConfig:
    """``config`` with OWL's sparsity for every layer, measured on the model before anything is pruned."""
    every = layers_by_block(model, LayerSelection())   # OWL pools all linear layers of a block, pruned or not
    layers = {name: layer for block in every for name, layer in block.items()}
    norms = input_norms(model, batches, run_batch, layers, reduce_sum=run.reduce_sum)
    budgets = owl_sparsities({name: weight_rows(layer) for name, layer in layers.items()}, norms,
                             {name: i for i, block in enumerate(every) for name in block}, config.sparsity,
                             config.owl_lambda, config.owl_m)
    return replace(config, layer_budgets="uniform",
                   layer_sparsity={f"^{re.escape(name)}$": budget for name, budget in budgets.items()})


@torch.no_grad()
def prune_model(model: nn.Module, batches: Sequence[Any], run_batch: Callable[[Any], Any],
                config: PruneConfig | None = None, run: RunOptions | None = None) -> PruneReport:
    """Prune every selected linear layer of ``model`` in place; return the report.

    ``run_batch(batch)`` runs the model's forward on one calibration batch. Before any data is
    touched, the run options are checked and every layer is checked against its pattern
    (with ``layer_budgets="owl"`` the budgets then come from one pass of the dense model).
    """
    config, run = config or PruneConfig(), run or RunOptions()
    if run.execution_device is not None and not config.sequential:
        raise OptionError("execution_device", "offloads the sequential walk block by block; the one-pass walk "
                          "(sequential=False) runs the whole dense model at once: drop one of the two")
    per_block = layers_by_block(model, config.selection)
    for layers in per_block:
        for name, layer in layers.items():
            config.pattern_for(name).check(weight_rows(layer).shape[1])
    if config.layer_budgets == "owl":
        config = _with_owl_budgets(model, batches, run_batch, config, run)
    checkpoints = None
    if run.resume_dir is not None:
        layout = [[(n, tuple(weight_rows(m).shape)) for n, m in layers.items()] for layers in per_block]
        checkpoints = BlockCheckpoints(run.resume_dir, fingerprint(repr(config), layout, list(batches)))
    report = PruneReport()
    walk = _walk_sequential if config.sequential else _walk_one_pass
    was_training = model.training
    model.eval()
    try:
        walk(_Walk(model, batches, run_batch, per_block, config, run, checkpoints, report))
    finally:
        model.train(was_training)
    return report
