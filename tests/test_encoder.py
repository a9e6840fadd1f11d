"""The sentence-encoder module and data (callbacks/encoder.py) on a tiny BERT saved to a folder, fully offline."""

from __future__ import annotations

import pytest
import torch
from test_callback import SEQ, make_trainer, tiny_bert
from transformers import AutoModel, BertTokenizerFast

from optima.callbacks import OptimaPruning
from optima.callbacks.encoder import SentenceData, SentenceEncoder, sentence_embeddings, split_sentences
from optima.config import PruneConfig
from optima.evaluate import layer_sparsity
from optima.solver import SolverOptions

WORDS = "the cat sat on a mat and then it ran off to see its friend".split()


@pytest.fixture
def bert_folder(tmp_path):
    """A tiny BERT and a word-piece tokenizer over ``WORDS``, saved as one model folder."""
    folder = tmp_path / "bert"
    folder.mkdir()
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *WORDS]) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(folder)
    tiny_bert().save_pretrained(folder)
    return folder


def sentences(count: int, offset: int) -> str:
    """``count`` sentences of 6 to 9 words, two to a line, under a WikiText-style heading."""
    made = [" ".join(WORDS[(offset + i + j) % len(WORDS)] for j in range(6 + i % 4)) + " ." for i in range(count)]
    return " = heading = \n" + "\n".join(" ".join(made[i:i + 2]) for i in range(0, count, 2)) + "\n"


def test_split_sentences_splits_after_end_marks_and_drops_headings_and_short_pieces():
    text = " = Title = \nOne two three four five. Six seven! Eight nine ten eleven twelve?\n\n = = Sub = = \n"
    assert split_sentences(text) == ["One two three four five.", "Eight nine ten eleven twelve?"]
    assert split_sentences(text, min_words=2) == ["One two three four five.", "Six seven!",
                                                  "Eight nine ten eleven twelve?"]


def test_sentence_encoder_prunes_fine_tunes_and_scores_against_its_dense_self(tmp_path, bert_folder):
    calibration, evaluation = tmp_path / "calibration.txt", tmp_path / "evaluation.txt"
    calibration.write_text(sentences(40, 0))
    evaluation.write_text(sentences(12, 5))
    module = SentenceEncoder(str(bert_folder), save_dir=str(tmp_path / "pruned"))
    data = SentenceData(str(bert_folder), str(calibration), str(evaluation), seq_len=SEQ, calibration_samples=8,
                        batch_size=4, eval_sentences=6)
    dense = make_trainer([]).validate(module, data, verbose=False)[0]
    assert dense["val/embedding_cosine"] == pytest.approx(1.0, abs=1e-6) and dense["val/sparsity"] == 0.0
    assert len(data.evaluation_set) == 6
    assert all(int(s["attention_mask"].sum()) < SEQ for s in data.evaluation_set)   # sentences padded to seq_len
    assert all(bool(s["attention_mask"].all()) for s in data.calibration_set)        # calibration: full windows

    config = PruneConfig(sparsity=0.5, mask="wanda", update="optima", solver=SolverOptions(compile=False))
    trainer = make_trainer([OptimaPruning(config, calibration_samples=8, progress=False)], max_epochs=1)
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    trainer.fit(module, data)
    assert "train/distill_loss" in trainer.callback_metrics                     # one epoch of distillation ran
    assert any(not torch.equal(before[n], p) for n, p in module.model.named_parameters())
    pruned = trainer.validate(module, data, verbose=False)[0]
    batch = {k: torch.stack([s[k] for s in data.evaluation_set]) for k in ("input_ids", "attention_mask")}
    module.eval()                                       # Lightning hands the module back in training mode
    with torch.no_grad():
        cosine = (sentence_embeddings(module.model, batch) * sentence_embeddings(module.dense, batch)).sum(-1)
    assert pruned["val/embedding_cosine"] == pytest.approx(float(cosine.mean()), abs=1e-6)
    assert float(cosine.mean()) < 1.0 - 1e-7 and module.dense is not module.model
    fractions = layer_sparsity(module.model)
    assert len(fractions) == 12 and all(f == pytest.approx(0.5, abs=1 / 32) for f in fractions.values())
    saved = AutoModel.from_pretrained(tmp_path / "pruned", local_files_only=True)
    for name, param in saved.named_parameters():
        assert torch.equal(param, module.model.get_parameter(name)), name
    assert "first 6 sentences" in data.protocol()
