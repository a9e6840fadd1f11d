"""Load karpathy/llama2.c checkpoints and tokenizers as transformers objects.

The llama2.c checkpoint format (legacy "version 0") is a header of seven int32 values
``dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len`` followed by float32
weights. A positive ``vocab_size`` means the output classifier shares the token embedding; a
negative one means a separate classifier matrix is stored at the end of the file.

The tokenizer format is an int32 ``max_token_length`` followed, for every token, by a float32
merge score, an int32 byte length and the raw UTF-8 bytes of the piece (with spaces stored as
``" "`` rather than sentencepiece's ``"▁"``).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, normalizers, processors
from tokenizers.models import BPE
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

__all__ = ["load_llama2c", "load_llama2c_tokenizer"]

_HEADER = struct.Struct("<7i")
_SPIECE_SPACE = "\u2581"
_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
_NUM_BYTE_TOKENS = 256


def _read_bytes(path: str | os.PathLike) -> tuple[Path, bytes]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"llama2.c file not found: {path}")
    return path, path.read_bytes()


def _permute_rotary(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k projection rows from interleaved-pair rotary to rotate-half rotary."""
    out_features, in_features = weight.shape
    head_dim = out_features // n_heads
    return (
        weight.view(n_heads, head_dim // 2, 2, in_features)
        .transpose(1, 2)
        .reshape(out_features, in_features)
    )


def load_llama2c(
    checkpoint_path: str | os.PathLike, dtype: torch.dtype = torch.float32
) -> LlamaForCausalLM:
    """Convert a llama2.c ``.bin`` checkpoint into an eval-mode ``LlamaForCausalLM``."""
    path, raw = _read_bytes(checkpoint_path)
    if len(raw) < _HEADER.size:
        raise ValueError(f"{path}: too small for a llama2.c header ({len(raw)} bytes)")
    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len = _HEADER.unpack_from(raw)
    shared_classifier = vocab_size > 0
    vocab_size = abs(vocab_size)
    if min(dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len) <= 0 or (
        dim % n_heads or n_heads % n_kv_heads or (dim // n_heads) % 2
    ):
        raise ValueError(f"{path}: implausible llama2.c header {_HEADER.unpack_from(raw)}")
    head_dim = dim // n_heads
    kv_dim = n_kv_heads * head_dim

    # (name, shape) in file order; "freq_cis" entries are precomputed rotary tables we skip.
    layout: list[tuple[str, tuple[int, ...]]] = [
        ("tok_embeddings", (vocab_size, dim)),
        ("rms_att", (n_layers, dim)),
        ("wq", (n_layers, dim, dim)),
        ("wk", (n_layers, kv_dim, dim)),
        ("wv", (n_layers, kv_dim, dim)),
        ("wo", (n_layers, dim, dim)),
        ("rms_ffn", (n_layers, dim)),
        ("w1", (n_layers, hidden_dim, dim)),
        ("w2", (n_layers, dim, hidden_dim)),
        ("w3", (n_layers, hidden_dim, dim)),
        ("rms_final", (dim,)),
        ("freq_cis_real", (seq_len * head_dim // 2,)),
        ("freq_cis_imag", (seq_len * head_dim // 2,)),
    ]
    if not shared_classifier:
        layout.append(("wcls", (vocab_size, dim)))
    n_floats = sum(torch.Size(shape).numel() for _, shape in layout)
    expected = _HEADER.size + 4 * n_floats
    if len(raw) != expected:
        raise ValueError(
            f"{path}: expected {expected} bytes for a llama2.c checkpoint with header "
            f"{_HEADER.unpack_from(raw)}, got {len(raw)} (truncated or wrong format)"
        )

    flat = torch.frombuffer(bytearray(raw), dtype=torch.float32, offset=_HEADER.size)
    tensors: dict[str, torch.Tensor] = {}
    offset = 0
    for name, shape in layout:
        numel = torch.Size(shape).numel()
        tensors[name] = flat[offset : offset + numel].view(shape)
        offset += numel

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=dim,
        intermediate_size=hidden_dim,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        head_dim=head_dim,
        hidden_act="silu",
        max_position_embeddings=seq_len,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=shared_classifier,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    state: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": tensors["tok_embeddings"],
        "model.norm.weight": tensors["rms_final"],
        "lm_head.weight": tensors["tok_embeddings" if shared_classifier else "wcls"],
    }
    for i in range(n_layers):
        prefix = f"model.layers.{i}."
        state[prefix + "input_layernorm.weight"] = tensors["rms_att"][i]
        state[prefix + "post_attention_layernorm.weight"] = tensors["rms_ffn"][i]
        state[prefix + "self_attn.q_proj.weight"] = _permute_rotary(tensors["wq"][i], n_heads)
        state[prefix + "self_attn.k_proj.weight"] = _permute_rotary(tensors["wk"][i], n_kv_heads)
        state[prefix + "self_attn.v_proj.weight"] = tensors["wv"][i]
        state[prefix + "self_attn.o_proj.weight"] = tensors["wo"][i]
        state[prefix + "mlp.gate_proj.weight"] = tensors["w1"][i]
        state[prefix + "mlp.down_proj.weight"] = tensors["w2"][i]
        state[prefix + "mlp.up_proj.weight"] = tensors["w3"][i]

    model = LlamaForCausalLM(config)
    model.load_state_dict(state, strict=True)
    return model.to(dtype).eval()


def _read_llama2c_vocab(path: Path, raw: bytes) -> list[tuple[bytes, float]]:
    """Parse a llama2.c tokenizer file into ``(piece_bytes, score)`` pairs."""
    offset = 4
    pieces: list[tuple[bytes, float]] = []
    try:
        while offset < len(raw):
            score, length = struct.unpack_from("<fi", raw, offset)
            offset += 8
            if length < 0 or offset + length > len(raw):
                raise ValueError(f"{path}: truncated or corrupt llama2.c tokenizer file")
            pieces.append((raw[offset : offset + length], score))
            offset += length
    except struct.error as exc:
        raise ValueError(f"{path}: truncated or corrupt llama2.c tokenizer file") from exc
    if len(pieces) < len(_SPECIAL_TOKENS) + _NUM_BYTE_TOKENS:
        raise ValueError(f"{path}: only {len(pieces)} tokens, too few for a llama2.c tokenizer")
    return pieces


def load_llama2c_tokenizer(tokenizer_path: str | os.PathLike) -> PreTrainedTokenizerFast:
    """Convert a llama2.c ``tokenizer.bin`` into a sentencepiece-style BPE fast tokenizer.

    Merges are ranked by the score of the merged piece, which reproduces llama2.c's greedy
    "merge the best-scoring adjacent pair" encoding. A ``<s>`` is prepended by default
    (``add_special_tokens=True``), as llama2.c's generation does. As in llama2.c, special-token
    text inside the input (e.g. WikiText's literal ``"<unk>"``) is encoded as ordinary characters.
    """
    path, raw = _read_bytes(tokenizer_path)
    if len(raw) < 4:
        raise ValueError(f"{path}: too small for a llama2.c tokenizer ({len(raw)} bytes)")
    pieces = _read_llama2c_vocab(path, raw)

    n_fixed = len(_SPECIAL_TOKENS) + _NUM_BYTE_TOKENS
    names = list(_SPECIAL_TOKENS) + [f"<0x{b:02X}>" for b in range(_NUM_BYTE_TOKENS)]
    try:
        names += [p.decode("utf-8").replace(" ", _SPIECE_SPACE) for p, _ in pieces[n_fixed:]]
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: token piece is not valid UTF-8") from exc
    vocab = {name: i for i, name in enumerate(names)}
    if len(vocab) != len(names):
        raise ValueError(f"{path}: duplicate token pieces")

    ranked: list[tuple[float, int, str, str]] = []
    for token_id in range(n_fixed, len(names)):
        piece = names[token_id]
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-pieces[token_id][1], token_id, left, right))
    ranked.sort()
    merges = [(left, right) for _, _, left, right in ranked]

    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tokenizer.add_special_tokens(list(_SPECIAL_TOKENS))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Prepend(_SPIECE_SPACE), normalizers.Replace(" ", _SPIECE_SPACE)]
    )
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.Replace(_SPIECE_SPACE, " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
        split_special_tokens=True,
    )
