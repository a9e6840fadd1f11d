"""Atomic outputs: a reader sees the old file or folder or the new one, never half of one.

Everything is written beside its target under a temporary name, then renamed over it.
Temporary files and folders are created private (0600/0700); before the rename they get
the modes the user's umask gives any new file, so a pruned model or report written for
others on the machine is readable by them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def umask() -> int:
    """The process umask (read by setting it, then restoring it)."""
    current = os.umask(0)
    os.umask(current)
    return current


def apply_umask(path: Path) -> None:
    """Give ``path`` (and everything under it) the modes a fresh file or folder would get."""
    mask = umask()
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for p in paths:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


@contextmanager
def atomic_target(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``, else delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        apply_umask(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_writable(path: str | os.PathLike, folder: bool = False) -> None:
    """Raise ``ValueError`` unless ``path`` can be written as a file (a folder with ``folder``).

    Called before long work, so that a bad output path fails at once instead of after it. Missing
    parent folders are fine (they are created); the nearest existing one must be a writable folder.
    """
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        raise ValueError(f"{path} exists and is {'not ' if folder else ''}a folder")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"cannot create {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"cannot create {path}: no permission to write in {parent}")


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_target(path) as tmp:
        tmp.write_text(text)


@contextmanager
def staged_folder(target: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; on success it becomes ``target``.

    With ``replace`` an existing ``target`` is swapped out and deleted; without it an existing
    ``target`` (another process finished first) is kept and the staged folder dropped.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    old = target.with_name(f".{target.name}.old")
    try:
        yield staging
        apply_umask(staging)
        if replace and target.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        try:
            os.replace(staging, target)
        except OSError:
            if replace or not target.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
