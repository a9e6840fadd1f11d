"""Several processes: calibration under Lightning's DDP strategy, and the solve split by rows (gloo, CPU)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from optima.share import RowShare

# argv: devices, output folder, target ("dense": with true-sequential blocks). Each process saves its
# pruned weights as rank<N>.pt.
SCRIPT = textwrap.dedent("""
    import sys, torch, lightning as L
    from torch.utils.data import DataLoader
    from transformers import LlamaConfig, LlamaForCausalLM
    from optima.callbacks import OptimaPruning
    from optima.config import PruneConfig
    from optima.solver import SolverOptions

    class Wrapper(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
            self.model = LlamaForCausalLM(config)
        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    devices, out, target = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    data = [{"input_ids": ids} for ids in torch.randint(0, 64, (16, 24), generator=torch.Generator().manual_seed(1))]
    module = Wrapper()
    config = PruneConfig(sparsity=0.5, mask="wanda", update="optima", hessian_dtype="float64", target=target,
                         true_sequential=target == "dense", solver=SolverOptions(compile=False, dtype="float64"))
    pruning = OptimaPruning(config, calibration_samples=16, progress=False)
    trainer = L.Trainer(max_epochs=0, accelerator="cpu", devices=devices,
                        strategy="ddp" if devices > 1 else "auto", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[pruning])
    trainer.fit(module, DataLoader(data, batch_size=4))
    torch.save({"weights": module.model.state_dict(), "tokens": [r.tokens for r in pruning.report.layers]},
               f"{out}/rank{trainer.global_rank}.pt")
""")


# gloo's TCP rendezvous over the loopback sometimes fails on the sandboxes this project runs on,
# before any pruning code runs ("connectFullMesh failed ... Connection refused": 3 of 15 starts of
# the row-share script in one hour of 2026-12-01, none of 24 in the next): such a start is
# retried, any other failure fails the test.
GLOO_CONNECT_FAILURE = "connectFullMesh failed"


def _run_together(commands: Callable[[int], list[list[str]]], logs: Path, timeout: float = 600,
                  attempts: int = 3) -> None:
    """Run the processes ``commands(attempt)`` of one job at the same time until all succeed."""
    for attempt in range(attempts):
        cmds = commands(attempt)
        files = [logs / f"stderr{attempt}.{i}" for i in range(len(cmds))]
        procs = []
        for cmd, file in zip(cmds, files):
            with file.open("w") as stderr:   # the child keeps its own copy of the descriptor
                procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr, cwd=logs,
                                              start_new_session=True))
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs) and not any(p.poll() for p in procs):
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        for p in procs:   # one failed or time ran out: the others (and their children) would wait forever
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        errors = [file.read_text() for file, p in zip(files, procs) if p.returncode]
        if not errors:
            return
        if not any(GLOO_CONNECT_FAILURE in e for e in errors):
            break
    pytest.fail("\n".join(e[-3000:] or f"killed after {timeout} s" for e in errors))


def _run(tmp_path, devices: int, out, target: str) -> None:
    script = tmp_path / "ddp_prune.py"
    script.write_text(SCRIPT)
    out.mkdir()
    _run_together(lambda _: [[sys.executable, str(script), str(devices), str(out), target]], out)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("target", ["self", "dense"])
def test_ddp_calibration_equals_single_process(tmp_path, target):
    _run(tmp_path, 2, tmp_path / "ddp", target)
    _run(tmp_path, 1, tmp_path / "single", target)
    rank0, rank1 = torch.load(tmp_path / "ddp" / "rank0.pt"), torch.load(tmp_path / "ddp" / "rank1.pt")
    single = torch.load(tmp_path / "single" / "rank0.pt")
    # every layer's Hessian saw all 16 x 24 tokens, summed over both processes
    assert rank0["tokens"] == rank1["tokens"] == single["tokens"] == [16 * 24] * len(single["tokens"])
    for key, value in single["weights"].items():
        assert torch.equal(rank0["weights"][key], rank1["weights"][key]), key  # ranks agree exactly
        assert torch.equal(rank0["weights"][key] == 0, value == 0), key          # same masks
        torch.testing.assert_close(rank0["weights"][key], value, rtol=1e-5, atol=1e-6)
    q = single["weights"]["model.layers.1.self_attn.q_proj.weight"]
    assert (q == 0).float().mean() == 0.5


# argv: rank, world size, rendezvous file, output folder. Prunes three layers with prune_weight(share=...).
ROW_SHARE_SCRIPT = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from optima import prune_weight
    from optima.config import PruneConfig
    from optima.share import process_group_share
    from optima.solver import SolverOptions
    from optima.target import DenseTarget

    rank, world, store, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    share = None
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
        share = process_group_share()
    results = {}
    # odd rows, fewer rows than processes, mask refinement (also split by rows), the dense target
    for rows, method, rounds, target in ((63, "pcg", 0, "self"), (63, "direct", 0, "self"), (1, "pcg", 2, "self"),
                                         (63, "pcg", 2, "self"), (63, "pcg", 0, "dense"), (63, "pcg", 2, "dense")):
        g = torch.Generator().manual_seed(rows)
        x = torch.randn(512, 96, generator=g, dtype=torch.float64) @ torch.randn(96, 96, generator=g, dtype=torch.float64)
        weight = torch.randn(rows, 96, generator=g, dtype=torch.float64)
        config = PruneConfig(mask="wanda", mask_rounds=rounds, target=target, true_sequential=target == "dense",
                             solver=SolverOptions(method=method, compile=False, dtype="float64", tol=1e-12))
        dense = x + 0.3 * torch.randn(512, 96, generator=g, dtype=torch.float64)   # the dense model's inputs
        paired = DenseTarget(x.T @ dense / 512, dense.T @ dense / 512) if target == "dense" else None
        result = prune_weight(weight, x.T @ x / 512, config, share=share, target=paired)
        results[f"{rows} {method} {rounds} {target}"] = (result.weight, result.keep, result.stats.cg_iterations_mean,
                                                result.stats.unconverged_rows, result.stats.solver_method,
                                                result.stats.mask_round_objectives)
    torch.save(results, f"{out}/rank{rank}.pt")
    if world > 1:
        dist.destroy_process_group()   # left alive, gloo's threads can abort the interpreter at exit
""")


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_row_share_splits_the_solve_and_every_process_ends_with_the_same_weights(tmp_path):
    script = tmp_path / "share.py"
    script.write_text(ROW_SHARE_SCRIPT)
    for world, folder in ((2, tmp_path / "two"), (1, tmp_path / "one")):
        folder.mkdir()
        _run_together(lambda attempt: [[sys.executable, str(script), str(rank), str(world),
                                        str(folder / f"store{attempt}"), str(folder)] for rank in range(world)],
                      folder, timeout=300)
    rank0, rank1 = torch.load(tmp_path / "two" / "rank0.pt"), torch.load(tmp_path / "two" / "rank1.pt")
    single = torch.load(tmp_path / "one" / "rank0.pt")
    for key, (weight, keep, iterations, unconverged, method, _) in single.items():
        assert torch.equal(rank0[key][0], rank1[key][0]), key                  # both processes hold the same layer
        assert rank0[key][2:] == rank1[key][2:], key                           # and report the same numbers
        assert torch.equal(rank0[key][1], keep) and torch.equal(weight == 0, ~keep), key   # same masks, exact zeros
        torch.testing.assert_close(rank0[key][0], weight, rtol=1e-8, atol=1e-10)
        assert rank0[key][4] == method and rank0[key][3] == unconverged == 0
        assert abs(rank0[key][2] - iterations) <= 1.0                           # gathered per-row CG counts
    for key in ("63 pcg 2 self", "63 pcg 2 dense"):
        refined = single[key][5]
        assert len(refined) == 3 and refined[-1] < refined[0], key              # the refinement did something
        torch.testing.assert_close(rank0[key][5], refined, rtol=1e-9, atol=0)  # summed over the processes


def test_gather_columns_packs_per_row_tensors_into_one_collective_and_restores_their_dtypes():
    calls = []
    share = RowShare(0, 1, lambda t: calls.append(t) or t[None])
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(5, 3, generator=g)
    flags, counts = torch.tensor([True, False, True, True, False]), torch.tensor([3, 0, 2**23, 7, 1])
    bound = torch.rand(5, generator=g)
    out = share.gather_columns([delta, flags, counts, bound], 5)
    assert len(calls) == 1 and calls[0].shape == (5, 6)                    # one collective for all four
    for back, part in zip(out, (delta, flags, counts, bound)):
        assert back.dtype == part.dtype and torch.equal(back, part)
    with pytest.raises(ValueError, match="cannot hold"):
        share.gather_columns([delta, bound.double()], 5)
    with pytest.raises(ValueError, match="must be floating"):
        share.gather_columns([counts, delta], 5)
