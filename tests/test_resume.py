"""An interrupted pruning run resumes from the last finished block and ends bitwise equal."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import needs



# Prunes stories260K block by block with checkpoints in argv[1]; kills itself (SIGKILL, no
# cleanup) when block argv[3] starts (-1: never); saves the final weights to argv[2]. argv[4] "dense":
# the error-correcting target with true-sequential blocks (two streams, one pass per layer group).
SCRIPT = textwrap.dedent("""
    import os, signal, sys, torch
    from optima.config import PruneConfig
    from optima.loading import load_model
    from optima.solver import SolverOptions
    from optima.walk import RunOptions, prune_model
    torch.manual_seed(0)
    model = load_model("assets:stories260K/stories260K.bin")
    batches = list(torch.randint(0, 512, (16, 64)).split(4))
    kill_at = int(sys.argv[3])
    extra = dict(target="dense", true_sequential=True) if sys.argv[4] == "dense" else {}
    def on_block(i, n):
        if i == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    config = PruneConfig(sparsity=0.5, mask="sparsegpt", update="optima", solver=SolverOptions(compile=False), **extra)
    run = RunOptions(on_block=on_block, resume_dir=sys.argv[1] if sys.argv[1] != "-" else None)
    prune_model(model, batches, lambda b: model(input_ids=b, use_cache=False), config, run)
    torch.save(model.state_dict(), sys.argv[2])
""")


def _run(tmp_path, *args: str) -> subprocess.CompletedProcess:
    script = tmp_path / "prune.py"
    script.write_text(SCRIPT)
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300)


@needs("stories260K/stories260K.bin", "stories260K/tok512.bin", "wikitext-2/valid.txt")
@pytest.mark.parametrize("target", ["self", "dense"])
def test_killed_run_resumes_to_identical_weights(tmp_path, target):
    checkpoints = tmp_path / "ckpt"
    killed = _run(tmp_path, str(checkpoints), str(tmp_path / "never.pt"), "3", target)
    assert killed.returncode != 0
    assert sorted(p.name for p in checkpoints.glob("block-*.pt")) == [f"block-000{i}.pt" for i in range(3)]
    assert not list(checkpoints.glob("*.tmp"))
    assert not (tmp_path / "never.pt").exists()

    finished = {p.name: p.stat().st_mtime_ns for p in checkpoints.glob("block-*.pt")}

    resumed = _run(tmp_path, str(checkpoints), str(tmp_path / "resumed.pt"), "-1", target)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    # blocks 0-2 were restored, not pruned again; 3 and 4 were pruned now
    assert {n: t for n, t in ((p.name, p.stat().st_mtime_ns) for p in checkpoints.glob("block-*.pt"))
            if n in finished} == finished
    assert len(list(checkpoints.glob("block-*.pt"))) == 5
    straight = _run(tmp_path, "-", str(tmp_path / "straight.pt"), "-1", target)
    assert straight.returncode == 0, straight.stderr[-2000:]

    a, b = torch.load(tmp_path / "resumed.pt"), torch.load(tmp_path / "straight.pt")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    q = a["model.layers.4.mlp.down_proj.weight"]
    assert (q == 0).float().mean() == 0.5


def test_checkpoints_of_another_run_are_refused(tmp_path):
    from optima.resume import BlockCheckpoints

    BlockCheckpoints(tmp_path, "run-a")
    BlockCheckpoints(tmp_path, "run-a")
    with pytest.raises(ValueError, match="different pruning run"):
        BlockCheckpoints(tmp_path, "run-b")
