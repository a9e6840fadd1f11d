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
from dataclasses import dataclass
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
_NUM_FIXED_TOKENS = len(_SPECIAL_TOKENS) + _NUM_BYTE_TOKENS


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


@dataclass(frozen=True)
class _Header:
    """A validated llama2.c checkpoint header, with the classifier flag split off ``vocab_size``."""

    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared_classifier: bool

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


def _read_header(path: Path, raw: bytes) -> _Header:
    """Unpack the seven-int32 header and reject sizes no llama2.c model can have."""
    if len(raw) < _HEADER.size:
        raise ValueError(f"{path}: too small for a llama2.c header ({len(raw)} bytes)")
    values = _HEADER.unpack_from(raw)
    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len = values
    if min(dim, hidden_dim, n_layers, n_heads, n_kv_heads, abs(vocab_size), seq_len) <= 0 or (
        dim % n_heads or n_heads % n_kv_heads or (dim // n_heads) % 2
    ):
        raise ValueError(f"{path}: implausible llama2.c header {values}")
    return _Header(dim, hidden_dim, n_layers, n_heads, n_kv_heads, abs(vocab_size), seq_len,
                   shared_classifier=vocab_size > 0)


def _checkpoint_layout(header: _Header) -> list[tuple[str, tuple[int, ...]]]:
    """``(name, shape)`` of every stored tensor in file order; "freq_cis" entries are rotary tables we skip."""
    dim, hidden_dim, n_layers, vocab_size = header.dim, header.hidden_dim, header.n_layers, header.vocab_size
    kv_dim = header.n_kv_heads * header.head_dim
    rotary = (header.seq_len * header.head_dim // 2,)
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
        ("freq_cis_real", rotary),
        ("freq_cis_imag", rotary),
    ]
    if not header.shared_classifier:
        layout.append(("wcls", (vocab_size, dim)))
    return layout


def _read_tensors(path: Path, raw: bytes, layout: list[tuple[str, tuple[int, ...]]]) -> dict[str, torch.Tensor]:
    """Views of the float32 weights after the header, named by ``layout``; the file size must match it exactly."""
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
    return tensors


def _llama_config(header: _Header) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=header.vocab_size,
        hidden_size=header.dim,
        intermediate_size=header.hidden_dim,
        num_hidden_layers=header.n_layers,
        num_attention_heads=header.n_heads,
        num_key_value_heads=header.n_kv_heads,
        head_dim=header.head_dim,
        hidden_act="silu",
        max_position_embeddings=header.seq_len,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=header.shared_classifier,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=1,
        eos_token_id=2,
    )


def _llama_state_dict(tensors: dict[str, torch.Tensor], header: _Header) -> dict[str, torch.Tensor]:
    """Map llama2.c tensors to ``LlamaForCausalLM`` parameter names (q/k rows permuted for rotate-half)."""
    state: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": tensors["tok_embeddings"],
        "model.norm.weight": tensors["rms_final"],
        "lm_head.weight": tensors["tok_embeddings" if header.shared_classifier else "wcls"],
    }
    for i in range(header.n_layers):
        prefix = f"model.layers.{i}."
        state[prefix + "input_layernorm.weight"] = tensors["rms_att"][i]
        state[prefix + "post_attention_layernorm.weight"] = tensors["rms_ffn"][i]
        state[prefix + "self_attn.q_proj.weight"] = _permute_rotary(tensors["wq"][i], header.n_heads)
        state[prefix + "self_attn.k_proj.weight"] = _permute_rotary(tensors["wk"][i], header.n_kv_heads)
        state[prefix + "self_attn.v_proj.weight"] = tensors["wv"][i]
        state[prefix + "self_attn.o_proj.weight"] = tensors["wo"][i]
        state[prefix + "mlp.gate_proj.weight"] = tensors["w1"][i]
        state[prefix + "mlp.down_proj.weight"] = tensors["w2"][i]
        state[prefix + "mlp.up_proj.weight"] = tensors["w3"][i]
    return state


def load_llama2c(
    checkpoint_path: str | os.PathLike, dtype: torch.dtype = torch.float32
) -> LlamaForCausalLM:
    """Convert a llama2.c ``.bin`` checkpoint into an eval-mode ``LlamaForCausalLM``."""
    path, raw = _read_bytes(checkpoint_path)
    header = _read_header(path, raw)
    tensors = _read_tensors(path, raw, _checkpoint_layout(header))
    model = LlamaForCausalLM(_llama_config(header))
    model.load_state_dict(_llama_state_dict(tensors, header), strict=True)
    return model.to(dtype).eval()


def _read_llama2c_vocab(path: Path, raw: bytes) -> list[tuple[bytes, float]]:
    """Parse a llama2.c tokenizer file into ``(piece_bytes, score)`` pairs."""
    if len(raw) < 4:
        raise ValueError(f"{path}: too small for a llama2.c tokenizer ({len(raw)} bytes)")
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
    if len(pieces) < _NUM_FIXED_TOKENS:
        raise ValueError(f"{path}: only {len(pieces)} tokens, too few for a llama2.c tokenizer")
    return pieces


def _token_vocab(path: Path, pieces: list[tuple[bytes, float]]) -> dict[str, int]:
    """Sentencepiece-style token names to ids: specials, ``<0xNN>`` byte tokens, then the pieces."""
    names = list(_SPECIAL_TOKENS) + [f"<0x{b:02X}>" for b in range(_NUM_BYTE_TOKENS)]
    try:
        names += [p.decode("utf-8").replace(" ", _SPIECE_SPACE) for p, _ in pieces[_NUM_FIXED_TOKENS:]]
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: token piece is not valid UTF-8") from exc
    vocab = {name: i for i, name in enumerate(names)}
    if len(vocab) != len(names):
        raise ValueError(f"{path}: duplicate token pieces")
    return vocab


def _ranked_merges(vocab: dict[str, int], pieces: list[tuple[bytes, float]]) -> list[tuple[str, str]]:
    """Every split of a piece into two tokens, best merged-piece score first (ties by token id)."""
    ranked: list[tuple[float, int, str, str]] = []
    for piece, token_id in vocab.items():
        if token_id < _NUM_FIXED_TOKENS:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-pieces[token_id][1], token_id, left, right))
    ranked.sort()
    return [(left, right) for _, _, left, right in ranked]


def _sentencepiece_bpe(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Tokenizer:
    """A byte-fallback BPE ``Tokenizer`` with sentencepiece's space handling and a ``<s>`` prefix."""
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
    return tokenizer


def load_llama2c_tokenizer(tokenizer_path: str | os.PathLike) -> PreTrainedTokenizerFast:
    """Convert a llama2.c ``tokenizer.bin`` into a sentencepiece-style BPE fast tokenizer.

    Merges are ranked by the score of the merged piece, which reproduces llama2.c's greedy
    "merge the best-scoring adjacent pair" encoding. A ``<s>`` is prepended by default
    (``add_special_tokens=True``), as llama2.c's generation does. As in llama2.c, special-token
    text inside the input (e.g. WikiText's literal ``"<unk>"``) is encoded as ordinary characters.
    """
    path, raw = _read_bytes(tokenizer_path)
    pieces = _read_llama2c_vocab(path, raw)
    vocab = _token_vocab(path, pieces)
    return PreTrainedTokenizerFast(
        tokenizer_object=_sentencepiece_bpe(vocab, _ranked_merges(vocab, pieces)),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
        split_special_tokens=True,
    )
