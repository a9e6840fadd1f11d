"""Zero-shot multiple-choice scoring: hand-computed cases, padding invariance, JSONL errors, lm-eval agreement."""

from __future__ import annotations

import json
import math
import sys
from types import SimpleNamespace

import pytest
from conftest import require_assets, require_module
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from optima.loading import assets_dir
from optima.zeroshot import (ChoiceAccuracy, ChoiceItem, batch_loglikelihoods, build_requests, collate_requests, encode,
                             encode_pair, evaluate_choices, item_tree, item_trees, logits_to_keep, pack_trees,
                             read_jsonl, resolve_max_length, score_choices)

WORDS = ["[UNK]", "<s>", "</s>", "a", "b", "c", "d", "e"]
ID = {w: i for i, w in enumerate(WORDS)}


def word_tokenizer(add_bos: bool = True) -> PreTrainedTokenizerFast:
    """One token per whitespace-separated word of WORDS; ``<s>`` prepended by the tokenizer when ``add_bos``."""
    tok = Tokenizer(models.WordLevel(ID, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", ID["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="[UNK]")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The models here are tiny: one thread is fastest, and unhurt by oversubscribed CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Bigram(nn.Module):
    """Next-token logits depend only on the current token: ``logits[t] = table[input_ids[t]]``."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(table)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, use_cache: bool = False):
        return SimpleNamespace(logits=self.table[input_ids])


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


ITEMS = [ChoiceItem.with_endings("a b c d e a b", (" c", " d e a b c"), 1),
         ChoiceItem.with_endings("c", (" a", " b", " e e"), 2),
         ChoiceItem.with_endings("d e ", ("a b c d", "e", "c c"), 0),
         ChoiceItem.with_endings("b a b a b a b a b a", (" e", " d"), 0)]


def direct_loglikelihood(model: nn.Module, context: str, choice: str) -> float:
    """Unbatched reference: BOS + words of context and ending; sum of log p over the ending's words."""
    ids = [ID["<s>"]] + [ID[w] for w in (context + choice).split()]
    n = len(choice.split())
    with torch.no_grad():
        log_probs = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
    return sum(float(log_probs[t - 1, ids[t]]) for t in range(len(ids) - n, len(ids)))


def test_encode_pair_moves_trailing_whitespace_and_splits_the_whole():
    tokenizer = word_tokenizer()
    assert encode_pair(tokenizer, "a b ", "c d") == ([1, 3, 4], [5, 6])
    assert encode_pair(tokenizer, "a b", " c") == ([1, 3, 4], [5])
    assert encode_pair(tokenizer, "", " c d") == ([1], [5, 6])  # empty context: the prefix token
    with pytest.raises(ValueError, match="whitespace"):
        encode_pair(tokenizer, "  ", "c")


def test_bos_options():
    with_bos, without = word_tokenizer(), word_tokenizer(add_bos=False)
    assert encode(with_bos, "a b") == [1, 3, 4]  # default: the tokenizer's own special tokens
    assert encode(without, "a b") == [3, 4]
    assert encode(with_bos, "a b", bos=False) == [3, 4]
    assert encode(with_bos, "a b", bos=True) == encode(without, "a b", bos=True) == [1, 3, 4]  # never doubled
    assert encode(without, "a b", bos=2) == [2, 3, 4]
    assert encode(with_bos, "<s> a") == [1, 3]  # already starts with BOS: nothing added (as lm-eval)


def test_hand_computed_bigram_scores_and_metrics():
    probs = torch.full((len(WORDS), len(WORDS)), 1.0)
    probs[ID["b"]] = torch.tensor([0.25 / 6] * 5 + [0.25, 0.5, 0.25 / 6])  # b -> c 0.25, b -> d 0.5
    probs[ID["d"]] = torch.tensor([0.75 / 7] * 7 + [0.25])  # d -> e 0.25
    probs[ID["c"]] = torch.tensor([0.3 / 6] * 3 + [0.6, 0.1] + [0.3 / 6] * 3)  # c -> a 0.6, c -> b 0.1
    model = Bigram((probs / probs.sum(1, keepdim=True)).log())
    items = [ChoiceItem.with_endings("a b", (" c", " d e"), 1), ChoiceItem.with_endings("c", (" a", " b"), 0)]
    expected = [[math.log(0.25), math.log(0.5) + math.log(0.25)], [math.log(0.6), math.log(0.1)]]
    got = score_choices(model, word_tokenizer(), items, batch_size=3, max_length=16)
    for row, reference in zip(got, expected, strict=True):
        assert row == pytest.approx(reference, abs=1e-6)
    # item 0: the longer ending loses on the sum (-2.08 < -1.39) but wins per character (-0.52 > -0.69)
    assert evaluate_choices(model, word_tokenizer(), items, max_length=16) == {"acc": 0.5, "acc_norm": 1.0}


@pytest.fixture(scope="module")
def llama_reference() -> tuple[LlamaForCausalLM, list[list[float]]]:
    model = tiny_llama()
    return model, [[direct_loglikelihood(model, c, e) for c, e in item.pairs] for item in ITEMS]


@pytest.mark.parametrize("batch_size, batch_tokens", [(1, 512), (4, 512), (9, 512), (128, 8), (128, 30)])
def test_packed_scores_equal_unbatched_reference(batch_size, batch_tokens, llama_reference):
    """Items packed side by side (as many as the two budgets allow) score as each (context + ending) alone."""
    (model, expected), tokenizer = llama_reference, word_tokenizer()
    got = score_choices(model, tokenizer, ITEMS, batch_size=batch_size, batch_tokens=batch_tokens)
    for row, reference in zip(got, expected, strict=True):
        assert row == pytest.approx(reference, abs=1e-5)
    packs = pack_trees(item_trees(build_requests(ITEMS, tokenizer, 64)), batch_tokens, batch_size)
    assert sum(len(pack) for pack in packs) == len(ITEMS)
    for pack in packs:   # within both budgets, unless a tree alone exceeds one
        assert len(pack) == 1 or (sum(len(t.tokens) for t in pack) <= batch_tokens
                                  and sum(len(t.requests) for t in pack) <= batch_size)
    assert max(len(pack) for pack in packs) > 1 or batch_size < 9 or batch_tokens < 30   # the others really pack


class WholeRequestsOnly(nn.Module):
    """A causal LM without explicit positions: the scorer runs its requests whole, right-padded."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, use_cache: bool = False):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)


@pytest.mark.parametrize("batch_size", [1, 4, 9])
def test_batched_padded_whole_requests_equal_unbatched_reference(batch_size, llama_reference):
    (model, expected), tokenizer = llama_reference, word_tokenizer()
    got = score_choices(WholeRequestsOnly(model), tokenizer, ITEMS, batch_size=batch_size)
    for row, reference in zip(got, expected, strict=True):
        assert row == pytest.approx(reference, abs=1e-5)
    batch = collate_requests(build_requests(ITEMS, tokenizer, 64)[:batch_size])
    assert (batch["attention_mask"] == 0).any() or batch_size == 1  # the batches really are padded


def test_item_tree_runs_the_shared_prefix_once():
    requests = build_requests(ITEMS[:1], word_tokenizer(), 64)
    tree = item_tree(sorted(requests, key=lambda r: r.choice))
    # <s> a b c d e a b | b -> c (choice 0) | b c d e a b -> c (choice 1): the last context token runs per branch
    assert tree.tokens[:7] == tuple(ID[w] for w in "<s> a b c d e a".split()) and tree.branch[:7] == (0,) * 7
    assert tree.branch[7:] == (1,) + (2,) * 5 and tree.positions[7:] == (7, 7, 8, 9, 10, 11)
    assert [tree.labels[i] for i, o in enumerate(tree.owner) if o == 1] == [ID[w] for w in "d e a b c".split()]
    assert sum(o == 0 for o in tree.owner) == 1


def test_trimmed_logits_give_the_same_scores():
    model, batch = tiny_llama(), collate_requests(build_requests(ITEMS, word_tokenizer(), 64))
    keep = logits_to_keep(batch["labels"])
    assert keep < batch["labels"].shape[1]  # the context before every ending is skipped
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        full, trimmed = model(**inputs).logits, model(**inputs, logits_to_keep=keep).logits
    assert trimmed.shape[1] == keep
    torch.testing.assert_close(batch_loglikelihoods(trimmed, batch["labels"]),
                               batch_loglikelihoods(full, batch["labels"]))


def test_left_truncation_to_max_length():
    model, tokenizer = tiny_llama(), word_tokenizer()
    item = ChoiceItem.with_endings("a b c d e a b", (" c d",), 0)
    ids = [ID["<s>"]] + [ID[w] for w in "a b c d e a b c d".split()]
    kept = ids[-(5 + 1):]  # max_length 5: the last 6 tokens, the final one only as a target
    with torch.no_grad():
        log_probs = model(input_ids=torch.tensor([kept[:-1]])).logits[0].log_softmax(-1)
    expected = float(log_probs[-2, kept[-2]] + log_probs[-1, kept[-1]])
    assert score_choices(model, tokenizer, [item], max_length=5)[0][0] == pytest.approx(expected, abs=1e-5)
    with pytest.raises(ValueError, match="more than the model's 1"):
        score_choices(model, tokenizer, [item], max_length=1)


def test_resolve_max_length():
    tokenizer = word_tokenizer()
    assert resolve_max_length(tiny_llama(), tokenizer) == 64
    assert resolve_max_length(Bigram(torch.zeros(2, 2)), tokenizer) == 2048  # lm-eval's default
    tokenizer.model_max_length = 128
    assert resolve_max_length(Bigram(torch.zeros(2, 2)), tokenizer) == 128


def test_model_mode_restored_and_bos_changes_scores():
    model, tokenizer = tiny_llama().train(), word_tokenizer(add_bos=False)
    plain = score_choices(model, tokenizer, ITEMS[:1])
    assert model.training
    with_bos = score_choices(model, tokenizer, ITEMS[:1], bos=True)
    assert with_bos[0] == pytest.approx([direct_loglikelihood(model.eval(), c, e)
                                         for c, e in ITEMS[0].pairs], abs=1e-5)
    assert with_bos != plain


def test_metric_merges_split_duplicated_and_partial_updates():
    items = [ChoiceItem.with_endings("x", (" a", " bbbb"), 1), ChoiceItem.with_endings("y", (" a", " b", " c"), 0),
             ChoiceItem.with_endings("z", (" a", " b"), 0)]
    loglik = {(0, 0): -2.0, (0, 1): -3.0, (1, 0): -1.0, (1, 1): -5.0, (1, 2): -0.5, (2, 0): -1.0, (2, 1): -2.0}
    keys = list(loglik)

    def update(metric, part):
        metric.update(torch.tensor([k[0] for k in part]), torch.tensor([k[1] for k in part]),
                      torch.tensor([loglik[k] for k in part]))

    # two "processes", one of which repeats a request as a DistributedSampler pads
    first, second = ChoiceAccuracy(items), ChoiceAccuracy(items)
    update(first, keys[:4])
    update(second, keys[3:])
    first.merge_state(second)
    # item 0: acc picks " a" (wrong), acc_norm picks " bbbb" (-0.6 > -1.0); item 1: " c" (wrong); item 2: right
    assert {k: float(v) for k, v in first.compute().items()} == {"acc": 1 / 3, "acc_norm": 2 / 3}
    assert first.item_loglikelihoods() == [[-2.0, -3.0], [-1.0, -5.0, -0.5], [-1.0, -2.0]]
    partial = ChoiceAccuracy(items)
    update(partial, keys[:3])  # item 1 lacks an ending: left out
    assert {k: float(v) for k, v in partial.compute().items()} == {"acc": 0.0, "acc_norm": 1.0}


@pytest.mark.parametrize("line, problem", [
    ("{not json", "malformed item"),
    ('["ctx", "choices"]', "JSON object"),
    ('{"ctx": "c", "choices": [" a", " b"]}', "missing field"),
    ('{"ctx": "c", "choices": " a", "label": 0}', "list of strings"),
    ('{"ctx": "c", "choices": [" a", ""], "label": 0}', "non-empty strings"),
    ('{"ctx": "c", "choices": [" a", 3], "label": 0}', "non-empty strings"),
    ('{"ctx": 1, "choices": [" a"], "label": 0}', "ctx must be a string"),
    ('{"ctx": "c", "choices": [" a", " b"], "label": 2}', "label must be"),
    ('{"ctx": "c", "choices": [" a", " b"], "label": true}', "label must be"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, line, problem):
    path = tmp_path / "items.jsonl"
    path.write_text('{"ctx": "c", "choices": [" a", " b"], "label": 1}\n\n' + line + "\n")
    with pytest.raises(ValueError, match=problem) as error:
        read_jsonl(path)
    assert f"{path}:3:" in str(error.value)


def test_read_jsonl_and_empty_file(tmp_path):
    path = tmp_path / "items.jsonl"
    path.write_text('{"ctx": "c", "choices": [" a", " b"], "label": 1}\n\n')
    assert read_jsonl(path) == [ChoiceItem.with_endings("c", (" a", " b"), 1)]
    path.write_text("\n")
    with pytest.raises(ValueError, match="no items"):
        read_jsonl(path)


def test_lmeval_import_error_names_the_extra(monkeypatch):
    from optima.lmeval import evaluate_tasks

    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(ImportError, match=r"pip install -e '\.\[lmeval\]'"):
        evaluate_tasks(tiny_llama(), word_tokenizer(), ["hellaswag"])


TASK_YAML = """\
task: hellaswag2_local
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
output_type: multiple_choice
validation_split: validation
doc_to_text: "{{{{ctx}}}}"
doc_to_choice: choices
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def test_agrees_with_lm_eval_on_hellaswag_items(tmp_path, monkeypatch):
    require_module("lm_eval")
    require_assets("hellaswag-2way/dev.jsonl", "stories260K/stories260K.bin", "stories260K/tok512.bin")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source, model_file = assets_dir() / "hellaswag-2way" / "dev.jsonl", assets_dir() / "stories260K" / "stories260K.bin"
    from optima.llama2c import load_llama2c, load_llama2c_tokenizer
    from optima.lmeval import run_lm_eval, task_metrics

    data = tmp_path / "items.jsonl"
    data.write_text("".join(source.read_text().splitlines(keepends=True)[:40]))
    (tmp_path / "task.yaml").write_text(TASK_YAML.format(data=json.dumps(str(data))))
    model, tokenizer = load_llama2c(model_file), load_llama2c_tokenizer(assets_dir() / "stories260K" / "tok512.bin")

    results = run_lm_eval(model, tokenizer, ["hellaswag2_local"], batch_size=8, include_path=tmp_path,
                          include_defaults=False, log_samples=True)
    theirs = task_metrics(results)["hellaswag2_local"]
    ours = evaluate_choices(model, tokenizer, data, batch_size=8)
    assert ours == {"acc": theirs["acc"], "acc_norm": theirs["acc_norm"]}
    assert theirs["sample_len"] == 40
    scores = score_choices(model, tokenizer, data, batch_size=8)
    for sample in results["samples"]["hellaswag2_local"]:
        their_scores = [loglikelihood for loglikelihood, _greedy in sample["filtered_resps"]]
        assert scores[sample["doc_id"]] == pytest.approx(their_scores, abs=1e-4)


def test_items_whose_choices_share_no_token_score_as_whole_requests_alone_or_packed():
    """Without a BOS, choices that differ in their first token share no prefix (WinoGrande's partial
    evaluation can do that): a tree with an empty trunk. It must score as the whole requests do, in a
    pack alone or beside an item that has a shared prefix."""
    model, tokenizer = tiny_llama(), word_tokenizer(add_bos=False)
    split_at_once = ChoiceItem(pairs=(("a b", " c d"), ("b b", " c d"), ("c", " c d")), label=1, lengths=(4, 4, 4))
    shared = ChoiceItem.with_endings("d e a", (" b", " c c"), 0)

    def whole(context: str, ending: str) -> float:
        ids = [ID[w] for w in (context + ending).split()]
        n = len(ending.split())
        with torch.no_grad():
            log_probs = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
        return sum(float(log_probs[t - 1, ids[t]]) for t in range(len(ids) - n, len(ids)))

    for items in ([split_at_once], [split_at_once, shared]):
        got = score_choices(model, tokenizer, items, batch_size=2)
        for row, item in zip(got, items, strict=True):
            assert row == pytest.approx([whole(c, e) for c, e in item.pairs], abs=1e-5)
