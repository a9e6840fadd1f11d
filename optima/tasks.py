"""The zero-shot tasks of the pruning literature, defined as lm-eval-harness defines them.

Each task turns one row of its hub dataset (read from a local JSONL file in that row schema) into a
:class:`~optima.zeroshot.ChoiceItem`: the (context, continuation) pair scored for every choice, the
right choice, and the characters ``acc_norm`` divides by. The prompts, the choices, the targets and
the metrics are lm-eval's own (its task YAMLs ``arc_easy``, ``arc_challenge``, ``piqa``,
``winogrande``, ``openbookqa``, ``hellaswag``, ``boolq``, ``rte``); every continuation is the
target delimiter " " + the choice. WinoGrande is scored by partial evaluation: each option fills the
blank to make its own context, and the rest of the sentence is the shared continuation.

``optima/lm_eval_tasks/`` holds the same tasks as lm-eval YAMLs (:func:`task_yaml` writes them), so
lm-eval itself runs them offline on the same files; ``tests/test_tasks.py`` checks that both give
the same decisions.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from optima.loading import resolve_path

Row = dict


@dataclass(frozen=True)
class ChoiceItem:
    """One multiple-choice item: the (context, continuation) pair scored for each choice, the right
    choice, and the characters ``acc_norm`` divides each choice's log-likelihood by.

    Most tasks share one context and differ in the continuation; WinoGrande's partial evaluation
    differs in the context and shares the continuation. Continuations are appended verbatim.
    """

    pairs: tuple[tuple[str, str], ...]
    label: int
    lengths: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.pairs or not all(isinstance(c, str) and isinstance(e, str) and e for c, e in self.pairs):
            raise ValueError("an item needs one (context, non-empty continuation) pair of strings per choice")
        if len(self.lengths) != len(self.pairs):
            raise ValueError(f"{len(self.lengths)} lengths for {len(self.pairs)} choices")
        if isinstance(self.label, bool) or not isinstance(self.label, int) or not 0 <= self.label < len(self.pairs):
            raise ValueError(f"label must be an integer index into the {len(self.pairs)} choices, got {self.label!r}")

    @classmethod
    def with_endings(cls, context: str, endings: Sequence[str], label: int) -> ChoiceItem:
        """A context and endings appended verbatim (leading space included), normalised by the ending's length."""
        if not isinstance(context, str):
            raise ValueError(f"ctx must be a string, got {type(context).__name__}")
        if not endings or not all(isinstance(e, str) and e for e in endings):
            raise ValueError("choices must be a non-empty list of non-empty strings")
        return cls(tuple((context, e) for e in endings), label, tuple(len(e) for e in endings))


def read_jsonl(path: str | Path) -> list[ChoiceItem]:
    """Items of a JSONL file, one ``{"ctx": str, "choices": [str, ...], "label": int}`` per line.

    Blank lines are skipped; a malformed line raises ValueError naming the file and line number.
    """
    items = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("expected a JSON object")
                missing = {"ctx", "choices", "label"} - record.keys()
                if missing:
                    raise ValueError(f"missing field(s) {sorted(missing)}")
                if not isinstance(record["choices"], list):
                    raise ValueError("choices must be a list of strings")
                items.append(ChoiceItem.with_endings(record["ctx"], record["choices"], record["label"]))
            except ValueError as error:  # json.JSONDecodeError is a ValueError
                raise ValueError(f"{path}:{number}: malformed item: {error}") from None
    if not items:
        raise ValueError(f"{path}: no items")
    return items


def _shared_context(context: str, choices: list[str], label: int) -> ChoiceItem:
    """The usual layout: one context, the continuation " " + choice, acc_norm over the choice's characters."""
    return ChoiceItem(tuple((context, " " + c) for c in choices), label, tuple(len(c) for c in choices))


def _arc(row: Row) -> ChoiceItem:
    choices = row["choices"]
    return _shared_context(f"Question: {row['question']}\nAnswer:", list(choices["text"]),
                           list(choices["label"]).index(row["answerKey"]))


def _openbookqa(row: Row) -> ChoiceItem:
    choices = row["choices"]
    return _shared_context(row["question_stem"], list(choices["text"]),
                           list(choices["label"]).index(row["answerKey"].lstrip()))


def _piqa(row: Row) -> ChoiceItem:
    return _shared_context(f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]], int(row["label"]))


def _winogrande(row: Row) -> ChoiceItem:
    sentence = row["sentence"]
    blank = sentence.index("_")
    contexts = [sentence[:blank] + option for option in (row["option1"], row["option2"])]
    continuation = " " + sentence[blank + 1:].strip()
    # lm-eval's choices are the two contexts, so acc_norm (not reported) would divide by their length
    return ChoiceItem(tuple((c, continuation) for c in contexts), {"1": 0, "2": 1}[row["answer"]],
                      tuple(len(c) for c in contexts))


def hellaswag_clean(text: str) -> str:
    """lm-eval's HellaSwag preprocessing: strip, WikiHow's " [title]" to ". ", drop other [tags], no double spaces."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _hellaswag(row: Row) -> ChoiceItem:
    context = hellaswag_clean(row["activity_label"] + ": " + row["ctx_a"] + " " + row["ctx_b"].capitalize())
    return _shared_context(context, [hellaswag_clean(e) for e in row["endings"]], int(row["label"]))


def _boolq(row: Row) -> ChoiceItem:
    return _shared_context(f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:", ["no", "yes"], int(row["label"]))


def _rte(row: Row) -> ChoiceItem:
    return _shared_context(f"{row['sentence1']}\nQuestion: {row['sentence2']} True or False?\nAnswer:",
                           ["True", "False"], int(row["label"]))


@dataclass(frozen=True)
class Task:
    """One lm-eval task: how a row becomes an item, what lm-eval reports, and the suite's metric.

    ``metric`` is the one this task contributes to the suite mean (acc_norm where the literature
    reports it); ``split`` is lm-eval's evaluation split, the file the task reads.
    """

    name: str
    to_item: Callable[[Row], ChoiceItem]
    metrics: tuple[str, ...]
    metric: str
    split: str
    hub: str
    yaml: str   # the lm-eval YAML body after the data source: prompt, target, choices, metrics


def _metric_list(metrics: tuple[str, ...]) -> str:
    return "metric_list:\n" + "".join(f"  - metric: {m}\n    aggregation: mean\n    higher_is_better: true\n"
                                      for m in metrics)


_BOTH = ("acc", "acc_norm")
_ARC = ('doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_target: "{{choices.label.index(answerKey)}}"\ndoc_to_choice: "{{choices.text}}"\n')
TASKS: dict[str, Task] = {t.name: t for t in (
    Task("arc_easy", _arc, _BOTH, "acc", "test", "allenai/ai2_arc ARC-Easy", _ARC),
    Task("arc_challenge", _arc, _BOTH, "acc_norm", "test", "allenai/ai2_arc ARC-Challenge", _ARC),
    Task("piqa", _piqa, _BOTH, "acc", "validation", "baber/piqa",
         'doc_to_text: "Question: {{goal}}\\nAnswer:"\ndoc_to_target: label\ndoc_to_choice: "{{[sol1, sol2]}}"\n'),
    Task("winogrande", _winogrande, ("acc",), "acc", "validation", "allenai/winogrande winogrande_xl",
         "doc_to_text: !function utils.winogrande_text\ndoc_to_target: !function utils.winogrande_target\n"
         "doc_to_choice: !function utils.winogrande_choices\n"),
    Task("openbookqa", _openbookqa, _BOTH, "acc_norm", "test", "allenai/openbookqa main",
         'doc_to_text: question_stem\ndoc_to_target: "{{choices.label.index(answerKey.lstrip())}}"\n'
         'doc_to_choice: "{{choices.text}}"\n'),
    Task("hellaswag", _hellaswag, _BOTH, "acc_norm", "validation", "Rowan/hellaswag",
         'process_docs: !function utils.hellaswag_docs\ndoc_to_text: "{{query}}"\ndoc_to_target: "{{label}}"\n'
         'doc_to_choice: "choices"\n'),
    Task("boolq", _boolq, ("acc",), "acc", "validation", "aps/super_glue boolq",
         'doc_to_text: "{{passage}}\\nQuestion: {{question}}?\\nAnswer:"\ndoc_to_target: label\n'
         'doc_to_choice: ["no", "yes"]\n'),
    Task("rte", _rte, ("acc",), "acc", "validation", "nyu-mll/glue rte",
         'doc_to_text: "{{sentence1}}\\nQuestion: {{sentence2}} True or False?\\nAnswer:"\ndoc_to_target: label\n'
         'doc_to_choice: ["True", "False"]\n'),
)}

# The paper's suite (MMLU, PIQA, ARC-Easy, ARC-Challenge, WinoGrande, OpenBookQA) as far as it is
# offline: MMLU has no local copy. Files in the hub row schema, under $OPTIMA_ASSETS.
PAPER_SUITE: dict[str, str] = {
    "arc_easy": "assets:zeroshot/arc_easy/test.jsonl",
    "arc_challenge": "assets:zeroshot/arc_challenge/test.jsonl",
    "piqa": "assets:zeroshot/piqa/validation.jsonl",
    "winogrande": "assets:zeroshot/winogrande/validation.jsonl",
    "openbookqa": "assets:zeroshot/openbookqa/test.jsonl",
}


def task(name: str) -> Task:
    """The task called ``name``; a ValueError lists the known ones."""
    if name not in TASKS:
        raise ValueError(f"unknown zero-shot task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]


def read_rows(path: str | Path, limit: int | None = None) -> list[Row]:
    """The first ``limit`` (all when None) JSON objects of a JSONL file; blank lines skipped."""
    rows = []
    with open(resolve_path(str(path)), encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if limit is not None and len(rows) >= limit:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as error:
                raise ValueError(f"{path}:{number}: not JSON: {error}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def read_task(name: str, path: str | Path, limit: int | None = None) -> list[ChoiceItem]:
    """The items of task ``name`` from a JSONL file in its hub row schema (the first ``limit`` rows,
    as lm-eval's ``--limit``); a row that does not fit the schema raises ValueError naming its line."""
    spec = task(name)
    items = []
    for number, row in enumerate(read_rows(path, limit), start=1):
        try:
            items.append(spec.to_item(row))
        except (KeyError, ValueError, TypeError, AttributeError) as error:
            raise ValueError(f"{path}: row {number} does not fit the {name} schema ({spec.hub}): "
                             f"{type(error).__name__} {error}") from None
    return items


def task_yaml(name: str, data_file: str | Path) -> str:
    """lm-eval's YAML for task ``name`` reading ``data_file`` (a JSONL in the hub row schema), offline.

    The task keeps lm-eval's name with ``_local`` added, so it never shadows lm-eval's own hub task.
    """
    spec = task(name)
    return (f"task: {name}_local\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    {spec.split}: {json.dumps(str(data_file))}\noutput_type: multiple_choice\n"
            f"{spec.split}_split: {spec.split}\n{spec.yaml}{_metric_list(spec.metrics)}metadata:\n  version: 1.0\n")
