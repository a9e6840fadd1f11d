"""Data-parallel calibration with Lightning's DDP strategy (2 CPU processes, gloo)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

# argv: devices, output folder. Each process saves its pruned weights as rank<N>.pt.
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

    devices, out = int(sys.argv[1]), sys.argv[2]
    data = [{"input_ids": ids} for ids in torch.randint(0, 64, (16, 24), generator=torch.Generator().manual_seed(1))]
    module = Wrapper()
    config = PruneConfig(sparsity=0.5, mask="wanda", update="optima", hessian_dtype="float64",
                         solver=SolverOptions(compile=False, dtype="float64"))
    pruning = OptimaPruning(config, calibration_samples=16, progress=False)
    trainer = L.Trainer(max_epochs=0, accelerator="cpu", devices=devices,
                        strategy="ddp" if devices > 1 else "auto", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[pruning])
    trainer.fit(module, DataLoader(data, batch_size=4))
    torch.save({"weights": module.model.state_dict(), "tokens": [r.tokens for r in pruning.report.layers]},
               f"{out}/rank{trainer.global_rank}.pt")
""")


def _run(tmp_path, devices: int, out) -> None:
    script = tmp_path / "ddp_prune.py"
    script.write_text(SCRIPT)
    out.mkdir()
    done = subprocess.run([sys.executable, str(script), str(devices), str(out)], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_ddp_calibration_equals_single_process(tmp_path):
    _run(tmp_path, 2, tmp_path / "ddp")
    _run(tmp_path, 1, tmp_path / "single")
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

    rank, world, store, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    share = None
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
        share = process_group_share()
    results = {}
    # odd rows, fewer rows than processes, and mask refinement (also split by rows)
    for rows, method, rounds in ((63, "pcg", 0), (63, "direct", 0), (1, "pcg", 2), (63, "pcg", 2)):
        g = torch.Generator().manual_seed(rows)
        x = torch.randn(512, 96, generator=g, dtype=torch.float64) @ torch.randn(96, 96, generator=g, dtype=torch.float64)
        weight = torch.randn(rows, 96, generator=g, dtype=torch.float64)
        config = PruneConfig(mask="wanda", mask_rounds=rounds,
                             solver=SolverOptions(method=method, compile=False, dtype="float64", tol=1e-12))
        result = prune_weight(weight, x.T @ x / 512, config, share=share)
        results[f"{rows} {method} {rounds}"] = (result.weight, result.keep, result.stats.cg_iterations_mean,
                                                result.stats.unconverged_rows, result.stats.solver_method,
                                                result.stats.mask_round_objectives)
    torch.save(results, f"{out}/rank{rank}.pt")
""")


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_row_share_splits_the_solve_and_every_process_ends_with_the_same_weights(tmp_path):
    script = tmp_path / "share.py"
    script.write_text(ROW_SHARE_SCRIPT)
    for world, folder in ((2, tmp_path / "two"), (1, tmp_path / "one")):
        folder.mkdir()
        procs = [subprocess.Popen([sys.executable, str(script), str(rank), str(world), str(tmp_path / f"store{world}"),
                                   str(folder)], stderr=subprocess.PIPE, text=True) for rank in range(world)]
        for proc in procs:
            _, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err[-3000:]
    rank0, rank1 = torch.load(tmp_path / "two" / "rank0.pt"), torch.load(tmp_path / "two" / "rank1.pt")
    single = torch.load(tmp_path / "one" / "rank0.pt")
    for key, (weight, keep, iterations, unconverged, method, _) in single.items():
        assert torch.equal(rank0[key][0], rank1[key][0]), key                  # both processes hold the same layer
        assert rank0[key][2:] == rank1[key][2:], key                           # and report the same numbers
        assert torch.equal(rank0[key][1], keep) and torch.equal(weight == 0, ~keep), key   # same masks, exact zeros
        torch.testing.assert_close(rank0[key][0], weight, rtol=1e-8, atol=1e-10)
        assert rank0[key][4] == method and rank0[key][3] == unconverged == 0
        assert abs(rank0[key][2] - iterations) <= 1.0                           # gathered per-row CG counts
    refined = single["63 pcg 2"][5]
    assert len(refined) == 3 and refined[-1] < refined[0]                       # the refinement did something
    torch.testing.assert_close(rank0["63 pcg 2"][5], refined, rtol=1e-9, atol=0)  # summed over the processes
