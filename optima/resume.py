"""Block checkpoints: an interrupted pruning run resumes from the last finished block.

After each block the pruned weights, masks and report records of its layers are
written to ``DIR/block-NNNN.pt`` (through a temporary file and a rename, so a kill
never leaves a half-written block). A fingerprint of the options, the layer list and
the calibration data is stored beside them; a directory from a different run is
refused rather than silently mixed in.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from optima.atomic import atomic_target, write_atomic


def fingerprint(*parts: Any) -> str:
    """A stable hash of options (anything JSON-printable with ``str`` fallback) and tensors."""
    digest = hashlib.sha256()

    def feed(obj: Any) -> None:
        if torch.is_tensor(obj):
            t = obj.detach().cpu().contiguous()
            digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(obj, dict):
            for k in sorted(obj, key=str):
                digest.update(str(k).encode())
                feed(obj[k])
        elif isinstance(obj, (list, tuple)):
            for item in obj:
                feed(item)
        else:
            digest.update(json.dumps(obj, default=str, sort_keys=True).encode())

    for part in parts:
        feed(part)
    return digest.hexdigest()


class ForeignCheckpoints(ValueError):
    """The checkpoint directory holds another pruning run's blocks."""


def block_path(directory: str | os.PathLike, block: int) -> Path:
    """Where block ``block``'s results are kept in ``directory``."""
    return Path(directory) / f"block-{block:04d}.pt"


def finished_blocks(directory: str | os.PathLike) -> int:
    """How many blocks, from the first, ``directory`` holds finished (0 for a new or missing directory)."""
    count = 0
    while block_path(directory, count).exists():
        count += 1
    return count


class BlockCheckpoints:
    """Per-block results of one pruning run, kept in ``directory``."""

    def __init__(self, directory: str | os.PathLike, run_fingerprint: str) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        stamp = self.directory / "fingerprint.txt"
        if stamp.exists() and stamp.read_text().strip() != run_fingerprint:
            raise ForeignCheckpoints(f"{self.directory} holds checkpoints of a different pruning run "
                             "(other options, layers or calibration data); use a fresh directory")
        if not stamp.exists():
            write_atomic(stamp, run_fingerprint)

    def load(self, block: int) -> dict[str, Any] | None:
        """The saved results of ``block``, or None if it has not finished."""
        path = block_path(self.directory, block)
        return torch.load(path, weights_only=False) if path.exists() else None

    def save(self, block: int, state: dict[str, Any]) -> None:
        """Write one block's results atomically."""
        with atomic_target(block_path(self.directory, block)) as tmp:
            torch.save(state, tmp)
