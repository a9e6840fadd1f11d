"""The installed distribution: the Lightning adapters install as ``optima.callbacks``, never as a
top-level ``callbacks`` package that could collide with another project's."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_installs_the_callbacks_under_the_optima_namespace(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", "runs", "build", "*.egg-info", "__pycache__",
                                                                 ".pytest_cache", ".hypothesis", "bench", "tests"))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(source)], check=True, capture_output=True)
    (wheel,) = wheels.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "optima/callbacks/pruning.py" in names and "optima/callbacks/cli.py" in names
    assert not [n for n in names if n.startswith("callbacks/")]
    # a fresh venv that sees this interpreter's packages (torch, lightning) but not the repository
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    str(wheel)], check=True, capture_output=True)
    code = ("import optima.callbacks, optima.callbacks.cli; from optima.callbacks import OptimaPruning; "
            "print(optima.callbacks.__file__)")
    out = subprocess.run([str(python), "-c", code], cwd=tmp_path, check=True, capture_output=True, text=True).stdout
    assert Path(out.strip()).is_relative_to(venv), out
