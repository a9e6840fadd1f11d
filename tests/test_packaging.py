"""The installed distribution: the Lightning adapters install as ``optima.callbacks``, never as a
top-level ``callbacks`` package that could collide with another project's."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(*command: str | Path, cwd: Path | None = None) -> str:
    """Run ``command``; its stdout, or a failure that shows its stderr."""
    done = subprocess.run([str(c) for c in command], cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(map(str, command))} failed:\n{done.stderr[-4000:]}"
    return done.stdout


def test_wheel_installs_the_callbacks_under_the_optima_namespace(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", "runs", "build", "*.egg-info", "__pycache__",
                                                                 ".pytest_cache", ".hypothesis", "bench", "tests"))
    wheels = tmp_path / "wheels"
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", wheels, source)
    (wheel,) = wheels.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "optima/callbacks/pruning.py" in names and "optima/callbacks/cli.py" in names
    assert not [n for n in names if n.startswith("callbacks/")]
    # a fresh venv that sees this interpreter's packages (torch, lightning) but not the repository: its
    # site-packages point at this interpreter's, whether the suite runs in a venv, a conda env or a system
    # Python (a .pth file's folders are not site folders: the editable install's finder stays out)
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    child_site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip())
    parent_sites = dict.fromkeys([*site.getsitepackages(), sysconfig.get_paths()["purelib"],
                                  sysconfig.get_paths()["platlib"]])
    (child_site / "parent-site-packages.pth").write_text("".join(f"{p}\n" for p in parent_sites))
    run(sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", wheel)
    code = ("import torch, optima.callbacks, optima.callbacks.cli; from optima.callbacks import OptimaPruning; "
            "print(optima.callbacks.__file__)")
    out = run(python, "-c", code, cwd=tmp_path)
    assert Path(out.strip()).is_relative_to(venv), out


def _imported_packages(folder: Path) -> set[str]:
    """Top-level names the ``.py`` files in ``folder`` import, or load through ``conftest.require_module``."""
    names = set()
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module.split(".")[0])
            elif (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "require_module"
                  and isinstance(node.args[0], ast.Constant)):
                names.add(node.args[0].value.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"optima"} - {path.stem for path in folder.glob("*.py")}


def test_every_package_the_tests_import_is_declared():
    """Each third-party package the tests import is a dependency or in the ``test`` extra of pyproject.toml,
    not something that happens to arrive with another package's dependencies."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11+")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {re.split(r"[\[<>=;! ]", r, maxsplit=1)[0].lower().replace("_", "-")
                for r in [*project["dependencies"], *project["optional-dependencies"]["test"]]}
    providers = importlib.metadata.packages_distributions()
    undeclared = {name: providers.get(name) for name in _imported_packages(ROOT / "tests")
                  if not {d.lower().replace("_", "-") for d in providers.get(name, [])} & declared}
    assert undeclared == {}


def _optima_imports(path: Path) -> set[str]:
    """The ``optima`` modules a source file imports, at its top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names if alias.name.startswith("optima.")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.startswith("optima"):
            names |= {f"{node.module}.{alias.name}" for alias in node.names} | {node.module}
    return names


def test_no_import_circle():
    """The import graph of ``optima/`` and ``callbacks/`` (lazy imports included) has no circle."""
    files = {f"optima.{p.stem}": p for p in (ROOT / "optima").glob("*.py") if p.stem != "__init__"}
    files |= {f"optima.callbacks.{p.stem}": p for p in (ROOT / "callbacks").glob("*.py") if p.stem != "__init__"}
    graph = {name: _optima_imports(path) & files.keys() - {name} for name, path in files.items()}

    def circle_from(start: str) -> list[str] | None:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    return [*path, start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
        return None

    assert [c for c in map(circle_from, sorted(graph)) if c] == []
