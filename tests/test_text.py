"""Token windows start the way the model expects: with BOS where the tokenizer adds one, without where not."""

from __future__ import annotations

import pytest
import torch
from conftest import needs
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from optima.callbacks.lm import TextData
from optima.text import bos_token_id, prefix_token

WORDS = "the cat sat on a mat and then it ran off to see its friend".split()


def word_tokenizer(folder, with_bos: bool) -> str:
    """A word-level tokenizer saved in ``folder``; it prepends <s> to a plain encode when ``with_bos``."""
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if with_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", unk_token="<unk>").save_pretrained(folder)
    return str(folder)


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(" ".join(WORDS[i % len(WORDS)] for i in range(400)))
    return str(path)


@pytest.mark.parametrize("with_bos", [True, False])
def test_windows_start_with_bos_exactly_when_the_tokenizer_adds_one(tmp_path, corpus, with_bos):
    spec = word_tokenizer(tmp_path / "tok", with_bos)
    data = TextData(spec, corpus, {"text": corpus}, seq_len=16, calibration_samples=5, eval_windows=3)
    data.setup("fit")
    windows = {"calibration": data.calibration_ids, "evaluation": data.evaluation_ids["text"]}
    for name, ids in windows.items():
        assert ids.shape[1] == 16, name                            # the BOS counts towards seq_len
        assert ((ids[:, 0] == 1).all() if with_bos else (ids != 1).all()), name
    assert data.bos == (1 if with_bos else None)
    assert data.protocol().endswith(f"seq_len=16, bos={1 if with_bos else 'none'}")
    # the evaluation text is still read from its start, one window after another
    text_ids = windows["evaluation"][:, 1:] if with_bos else windows["evaluation"]
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", *WORDS])}
    expected = torch.tensor([vocab[WORDS[i % len(WORDS)]] for i in range(text_ids.numel())])
    assert torch.equal(text_ids.reshape(-1), expected)


def test_calibration_windows_can_be_longer_than_the_evaluation_windows(tmp_path, corpus):
    spec = word_tokenizer(tmp_path / "tok", True)
    data = TextData(spec, corpus, {"text": corpus}, seq_len=16, calibration_samples=5, eval_windows=3,
                    calibration_len=40)
    data.setup("fit")
    assert data.calibration_ids.shape == (5, 40) and (data.calibration_ids[:, 0] == 1).all()
    assert data.evaluation_ids["text"].shape == (3, 16)
    assert "(5 random windows of 40 tokens, seed=0)" in data.protocol()
    same = TextData(spec, corpus, seq_len=16, calibration_samples=5, calibration_len=16)
    same.setup("fit")
    assert "(5 random windows, seed=0)" in same.protocol()


def test_bos_can_be_forced_off_or_on(tmp_path, corpus):
    with_bos, without = word_tokenizer(tmp_path / "a", True), word_tokenizer(tmp_path / "b", False)
    off = TextData(with_bos, corpus, seq_len=16, calibration_samples=4, bos=False)
    off.setup("fit")
    assert (off.calibration_ids != 1).all()
    on = TextData(without, corpus, seq_len=16, calibration_samples=4, bos=True)
    on.setup("fit")                                                 # it has a BOS token, it just does not add it
    assert (on.calibration_ids[:, 0] == 1).all()


@needs("stories260K/tok512.bin")
def test_real_tokenizers():
    from optima.loading import load_tokenizer

    llama2c = load_tokenizer("assets:stories260K/tok512.bin")       # llama2.c models were trained with BOS
    assert bos_token_id(llama2c) == 1
    windows = torch.arange(6).reshape(2, 3)
    assert torch.equal(prefix_token(windows, 1), torch.tensor([[1, 0, 1, 2], [1, 3, 4, 5]]))
    assert prefix_token(windows, None) is windows
