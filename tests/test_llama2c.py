"""Tests for the llama2.c -> transformers converter, against independent reference code."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import needs

from optima.llama2c import load_llama2c, load_llama2c_tokenizer
from optima.loading import assets_dir

CKPT = assets_dir() / "stories260K" / "stories260K.bin"
TOK = assets_dir() / "stories260K" / "tok512.bin"
WIKI = assets_dir() / "wikitext-2" / "valid.txt"

needs_model = needs("stories260K/stories260K.bin", "stories260K/tok512.bin")
needs_wiki = needs("wikitext-2/valid.txt")

STORY = "Once upon a time, there was a little girl named Lily."


@pytest.fixture(scope="module")
def model():
    return load_llama2c(CKPT)


@pytest.fixture(scope="module")
def tokenizer():
    return load_llama2c_tokenizer(TOK)


# ---------------------------------------------------------------- reference model (run.c forward)


def _read_reference_weights(path: Path) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    raw = path.read_bytes()
    keys = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
    cfg = dict(zip(keys, struct.unpack_from("<7i", raw)))
    data = torch.from_numpy(np.frombuffer(raw, dtype="<f4", offset=28).astype(np.float64))
    dim, hid, L = cfg["dim"], cfg["hidden_dim"], cfg["n_layers"]
    hs = dim // cfg["n_heads"]
    kv = cfg["n_kv_heads"] * hs
    V = abs(cfg["vocab_size"])
    shapes = [
        ("emb", (V, dim)), ("rms_att", (L, dim)), ("wq", (L, dim, dim)), ("wk", (L, kv, dim)),
        ("wv", (L, kv, dim)), ("wo", (L, dim, dim)), ("rms_ffn", (L, dim)), ("w1", (L, hid, dim)),
        ("w2", (L, dim, hid)), ("w3", (L, hid, dim)), ("rms_final", (dim,)),
    ]  # fmt: skip
    w, pos = {}, 0
    for name, shape in shapes:
        n = math.prod(shape)
        w[name] = data[pos : pos + n].view(shape)
        pos += n
    assert cfg["vocab_size"] > 0, "reference only handles the shared-classifier case"
    return cfg, w


def _reference_logits(path: Path, tokens: list[int]) -> torch.Tensor:
    """Float64 forward pass written after llama2.c's run.c, one position at a time with a KV cache."""
    cfg, w = _read_reference_weights(path)
    dim, n_heads, n_kv = cfg["dim"], cfg["n_heads"], cfg["n_kv_heads"]
    hs = dim // n_heads
    kv_mul = n_heads // n_kv

    def rmsnorm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return weight * (x / torch.sqrt((x * x).mean() + 1e-5))

    def rope(v: torch.Tensor, pos: int) -> torch.Tensor:
        out = v.clone()
        for i in range(0, v.numel(), 2):
            freq = 1.0 / (10000.0 ** ((i % hs) / hs))
            c, s = math.cos(pos * freq), math.sin(pos * freq)
            out[i] = v[i] * c - v[i + 1] * s
            out[i + 1] = v[i] * s + v[i + 1] * c
        return out

    k_cache = [[] for _ in range(cfg["n_layers"])]
    v_cache = [[] for _ in range(cfg["n_layers"])]
    logits = []
    for pos, tok in enumerate(tokens):
        x = w["emb"][tok].clone()
        for layer in range(cfg["n_layers"]):
            xb = rmsnorm(x, w["rms_att"][layer])
            q = rope(w["wq"][layer] @ xb, pos)
            k_cache[layer].append(rope(w["wk"][layer] @ xb, pos))
            v_cache[layer].append(w["wv"][layer] @ xb)
            att_out = torch.empty(dim, dtype=torch.float64)
            for h in range(n_heads):
                kvh = h // kv_mul
                qh = q[h * hs : (h + 1) * hs]
                ks = torch.stack([k[kvh * hs : (kvh + 1) * hs] for k in k_cache[layer]])
                vs = torch.stack([v[kvh * hs : (kvh + 1) * hs] for v in v_cache[layer]])
                att = torch.softmax(ks @ qh / math.sqrt(hs), dim=0)
                att_out[h * hs : (h + 1) * hs] = att @ vs
            x = x + w["wo"][layer] @ att_out
            xb = rmsnorm(x, w["rms_ffn"][layer])
            h1, h3 = w["w1"][layer] @ xb, w["w3"][layer] @ xb
            x = x + w["w2"][layer] @ (h1 * torch.sigmoid(h1) * h3)
        logits.append(w["emb"] @ rmsnorm(x, w["rms_final"]))
    return torch.stack(logits)


# ------------------------------------------------------------ reference tokenizer (run.c encode)


def _reference_encode(path: Path, text: str) -> list[int]:
    """llama2.c's encode(): dummy prefix, per-codepoint lookup with byte fallback, greedy merges."""
    raw = path.read_bytes()
    pieces, scores, off = [], [], 4
    while off < len(raw):
        score, length = struct.unpack_from("<fi", raw, off)
        pieces.append(raw[off + 8 : off + 8 + length])
        scores.append(score)
        off += 8 + length
    lookup = {p: i for i, p in enumerate(pieces)}

    tokens = [lookup[b" "]] if text else []
    for ch in text:
        b = ch.encode("utf-8")
        tokens.extend([lookup[b]] if b in lookup else [byte + 3 for byte in b])
    while True:
        best, best_score = None, -1e10
        for i in range(len(tokens) - 1):
            merged = lookup.get(pieces[tokens[i]] + pieces[tokens[i + 1]])
            if merged is not None and scores[merged] > best_score:
                best, best_score = (i, merged), scores[merged]
        if best is None:
            return tokens
        i, merged = best
        tokens[i : i + 2] = [merged]


def _wiki_sentences(n: int = 6) -> list[str]:
    lines = [ln for ln in WIKI.read_text(encoding="utf-8").splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.strip().startswith("=")]
    sentences = [s.strip() + " ." for ln in lines[:3] for s in ln.split(" . ") if s.strip()]
    return sentences[:n] + [lines[5]]


# ---------------------------------------------------------------------------------------- tests


@needs_model
def test_logits_match_reference_forward(model):
    gen = torch.Generator().manual_seed(0)
    tokens = [1] + torch.randint(3, model.config.vocab_size, (31,), generator=gen).tolist()
    expected = _reference_logits(CKPT, tokens)
    with torch.no_grad():
        got = model(torch.tensor([tokens])).logits[0].double()
    diff = (got - expected).abs().max().item()
    print(f"max |logits diff| = {diff:.3e}")
    assert diff <= 1e-4


@needs_model
def test_config_matches_header(model):
    cfg = model.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (64, 172, 5)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (8, 4, 512)
    assert cfg.max_position_embeddings == 512 and cfg.rms_norm_eps == 1e-5
    assert cfg.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@needs_model
def test_separate_classifier(tmp_path):
    raw = CKPT.read_bytes()
    header = list(struct.unpack_from("<7i", raw))
    header[5] = -header[5]  # negative vocab_size: a classifier matrix follows the rotary tables
    wcls = torch.randn(512, 64)
    untied = tmp_path / "untied.bin"
    untied.write_bytes(struct.pack("<7i", *header) + raw[28:] + wcls.numpy().tobytes())
    m = load_llama2c(untied)
    assert not m.config.tie_word_embeddings
    assert torch.equal(m.lm_head.weight, wcls)
    assert not torch.equal(m.lm_head.weight, m.model.embed_tokens.weight)


@needs_model
def test_dtype_argument():
    assert next(load_llama2c(CKPT, dtype=torch.bfloat16).parameters()).dtype == torch.bfloat16


@needs_model
@needs_wiki
def test_tokenizer_matches_reference_encode(tokenizer):
    texts = [STORY, *_wiki_sentences()]
    assert any("<unk>" in t for t in texts), "special-token text should be covered"
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert ids == _reference_encode(TOK, text), text
        assert tokenizer.decode(ids) == text
    with_bos = tokenizer(STORY).input_ids
    assert with_bos[0] == tokenizer.bos_token_id == 1 and with_bos[1:] == _reference_encode(TOK, STORY)
    assert (tokenizer.unk_token_id, tokenizer.eos_token_id) == (0, 2)


@needs_model
def test_tokenizer_byte_fallback_roundtrip(tokenizer):
    text = "Zoë said: \u201chéllo\u201d \u2603\tok\n2 + 2 = 4"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert ids == _reference_encode(TOK, text)
    assert tokenizer.decode(ids) == text


@needs_model
def test_greedy_generation_is_fluent(model, tokenizer):
    prompt = tokenizer("Once upon a time", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=40, do_sample=False)
    assert out.shape[1] == prompt.shape[1] + 40
    text = tokenizer.decode(out[0], skip_special_tokens=True)
    print(text)
    words = [w.strip(".,!?;:\"'") for w in text.split()]
    assert sum(w.isalpha() for w in words) >= 0.8 * len(words)
    assert {"the", "was", "a"} & {w.lower() for w in words}
    assert text.startswith("Once upon a time")


def test_missing_files_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        load_llama2c(tmp_path / "nope.bin")
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        load_llama2c_tokenizer(tmp_path / "nope.bin")


@needs_model
def test_truncated_files_raise(tmp_path):
    bad_ckpt, bad_tok = tmp_path / "short.bin", tmp_path / "short_tok.bin"
    bad_ckpt.write_bytes(CKPT.read_bytes()[:-4])
    bad_tok.write_bytes(TOK.read_bytes()[:-3])
    with pytest.raises(ValueError, match="short.bin"):
        load_llama2c(bad_ckpt)
    with pytest.raises(ValueError, match="short_tok.bin"):
        load_llama2c_tokenizer(bad_tok)


def test_assets_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("OPTIMA_ASSETS", str(tmp_path))
    assert assets_dir() == tmp_path
    monkeypatch.delenv("OPTIMA_ASSETS")
    assert assets_dir() == Path(__file__).resolve().parent.parent.parent / "shared" / "assets"
