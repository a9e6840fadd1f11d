"""The zero-shot suite: our task definitions and scorer against lm-eval-harness itself, offline.

lm-eval runs its own tasks' definitions through the YAMLs in ``optima/lm_eval_tasks/`` (written by
``optima.tasks.task_yaml``) on the same local files; both must give the same per-item decisions
and lm-eval's aggregate numbers. The model is the real stories260K (fast); a near tie (two
choices within 1e-4 in log-likelihood) may flip with the floating-point order, nothing else.
"""

from __future__ import annotations

import json
import math
import os

import pytest
from conftest import require_assets, require_module

from optima.lmeval import SHIPPED_TASKS, write_local_tasks
from optima.loading import assets_dir
from optima.stats import combined_mean, mean_stderr, paired_difference
from optima.tasks import PAPER_SUITE, TASKS, read_task, task_yaml
from optima.zeroshot import _packs, evaluate_suite, suite_difference, suite_mean

pytestmark = pytest.mark.filterwarnings("ignore")
FIRST = 12  # items per real task in the fast suite; bench/bench_zeroshot.py compares every item
NEAR_TIE = 1e-4

# Rows in the hub schemas of the three tasks without a local file (super_glue boolq, glue rte, Rowan/hellaswag)
HUB_ROWS = {
    "boolq": [
        {"question": "is the sky blue on a clear day", "passage": "On a clear day the sky looks blue.", "idx": 0,
         "label": 1},
        {"question": "do cats bark", "passage": "Cats meow and purr. Dogs bark.", "idx": 1, "label": 0},
        {"question": "is ice cold", "passage": "Ice is frozen water and feels cold.", "idx": 2, "label": 1},
    ],
    "rte": [
        {"sentence1": "The girl went to the park with her dog.", "sentence2": "The girl has a dog.", "label": 0,
         "idx": 0},
        {"sentence1": "Tom ate the whole cake.", "sentence2": "Tom did not eat.", "label": 1, "idx": 1},
        {"sentence1": "It rained all day in the town.", "sentence2": "The town was wet.", "label": 0, "idx": 2},
    ],
    "hellaswag": [
        {"ind": 4, "activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow.",
         "ctx_b": "then", "ctx": "Then, the man writes over the snow. then",
         "endings": [", the man adds wax to the [title] windshield.", ", a person stands and looks.",
                     ", the man continues removing the snow on his car.", ", the man wins."],
         "source_id": "activitynet~v_-1IBHYS3L-Y", "split": "val", "split_type": "indomain", "label": "2"},
        {"ind": 8, "activity_label": "Baking cookies", "ctx_a": "A little girl mixes the dough.",
         "ctx_b": "she", "ctx": "A little girl mixes the dough. she",
         "endings": [" puts the cookies in the oven.", " [header] jumps  into a lake.", " sings a song.",
                     " paints the wall."],
         "source_id": "activitynet~v_x", "split": "val", "split_type": "indomain", "label": "0"},
    ],
}


@pytest.fixture(scope="module")
def stories():
    from optima.llama2c import load_llama2c, load_llama2c_tokenizer

    require_assets("stories260K/stories260K.bin", "stories260K/tok512.bin", *(p.removeprefix("assets:") for p in
                                                                              PAPER_SUITE.values()))
    folder = assets_dir() / "stories260K"
    return load_llama2c(folder / "stories260K.bin"), load_llama2c_tokenizer(folder / "tok512.bin")


def lm_eval_samples(model, tokenizer, tasks: dict[str, str], folder, limit: int | None) -> dict:
    """lm-eval's results and per-item samples for our local YAMLs of ``tasks``."""
    from optima.lmeval import run_lm_eval

    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    names = write_local_tasks(folder, tasks)
    return run_lm_eval(model, tokenizer, names, batch_size=8, include_path=folder, include_defaults=False,
                       log_samples=True, limit=limit)


def assert_same_as_lm_eval(ours: dict[str, dict], theirs: dict) -> None:
    """Per item: log-likelihoods within 1e-4 and the same decisions unless a near tie; aggregates equal."""
    for name, result in ours.items():
        samples = sorted(theirs["samples"][f"{name}_local"], key=lambda s: s["doc_id"])
        assert [s["doc_id"] for s in samples] == list(range(result["n"]))
        for sample in samples:
            lls = [ll for ll, _greedy in sample["filtered_resps"]]
            mine = result["loglikelihoods"][sample["doc_id"]]
            assert mine == pytest.approx(lls, abs=10 * NEAR_TIE), (name, sample["doc_id"])   # float32 sums
            ordered = sorted(lls, reverse=True)
            if len(ordered) > 1 and ordered[0] - ordered[1] < NEAR_TIE:
                continue
            for metric in TASKS[name].metrics:
                assert result["hits"][metric][sample["doc_id"]] == sample[metric], (name, metric, sample["doc_id"])
        aggregate = theirs["results"][f"{name}_local"]
        for metric in TASKS[name].metrics:
            assert result[metric] == pytest.approx(aggregate[f"{metric},none"], abs=1e-12)
            assert result[f"{metric}_stderr"] == pytest.approx(aggregate[f"{metric}_stderr,none"], abs=1e-12)
        assert set(result["hits"]) == set(TASKS[name].metrics)


def test_paper_suite_matches_lm_eval_on_the_real_files(stories, tmp_path):
    require_module("lm_eval")
    model, tokenizer = stories
    assert _packs(model)   # the packed-tree path is the one compared
    ours = evaluate_suite(model, tokenizer, PAPER_SUITE, limit=FIRST, batch_size=7)
    assert_same_as_lm_eval(ours, lm_eval_samples(model, tokenizer, PAPER_SUITE, tmp_path / "tasks", FIRST))
    assert {name: r["n"] for name, r in ours.items()} == dict.fromkeys(PAPER_SUITE, FIRST)


def test_hub_schema_rows_of_boolq_rte_hellaswag_match_lm_eval(stories, tmp_path):
    require_module("lm_eval")
    model, tokenizer = stories
    files = {}
    for name, rows in HUB_ROWS.items():
        files[name] = str(tmp_path / f"{name}.jsonl")
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ours = evaluate_suite(model, tokenizer, files, batch_size=5)
    assert_same_as_lm_eval(ours, lm_eval_samples(model, tokenizer, files, tmp_path / "tasks", None))
    # lm-eval's HellaSwag preprocessing: "[title]" becomes ". ", other brackets go, no double spaces
    item = read_task("hellaswag", files["hellaswag"])[0]
    assert item.pairs[0] == ("Removing ice from car: Then, the man writes over the snow. Then",
                             " , the man adds wax to the. windshield.")
    # the tag goes after the strip, so its space stays: lm-eval scores "  jumps into a lake." too
    assert read_task("hellaswag", files["hellaswag"])[1].pairs[1][1] == "  jumps into a lake."


def test_shipped_yamls_are_the_generated_ones_and_run_from_the_repository(stories, monkeypatch):
    for name, spec in TASKS.items():
        shipped = (SHIPPED_TASKS / f"{name}_local.yaml").read_text()
        assert shipped == task_yaml(name, f"../shared/assets/zeroshot/{name}/{spec.split}.jsonl")
    require_module("lm_eval")
    from optima.lmeval import run_lm_eval

    monkeypatch.chdir(SHIPPED_TASKS.parent.parent)   # the repository root: the YAMLs' data paths start there
    if assets_dir().resolve() != (SHIPPED_TASKS.parent.parent.parent / "shared" / "assets").resolve():
        pytest.skip("the shipped YAMLs read ../shared/assets; $OPTIMA_ASSETS points elsewhere")
    model, tokenizer = stories
    results = run_lm_eval(model, tokenizer, ["winogrande_local", "openbookqa_local"], include_path=SHIPPED_TASKS,
                          include_defaults=False, limit=3)
    ours = evaluate_suite(model, tokenizer, {"winogrande": PAPER_SUITE["winogrande"],
                                             "openbookqa": PAPER_SUITE["openbookqa"]}, limit=3)
    assert results["results"]["winogrande_local"]["acc,none"] == ours["winogrande"]["acc"]
    assert results["results"]["openbookqa_local"]["acc_norm,none"] == ours["openbookqa"]["acc_norm"]


def test_winogrande_is_partial_evaluation():
    row = {"sentence": "Sarah was a much better surgeon than Maria so _ always got the harder cases.",
           "option1": "Sarah", "option2": "Maria", "answer": "1"}
    item = TASKS["winogrande"].to_item(row)
    assert item.pairs == (("Sarah was a much better surgeon than Maria so Sarah", " always got the harder cases."),
                          ("Sarah was a much better surgeon than Maria so Maria", " always got the harder cases."))
    assert item.label == 0


def test_read_task_names_the_bad_row(tmp_path):
    path = tmp_path / "arc.jsonl"
    path.write_text(json.dumps({"question": "q", "choices": {"text": ["a"], "label": ["A"]}, "answerKey": "A"})
                    + "\n" + json.dumps({"question": "q"}) + "\n")
    with pytest.raises(ValueError, match=r"row 2 does not fit the arc_easy schema"):
        read_task("arc_easy", path)
    with pytest.raises(ValueError, match="unknown zero-shot task 'mmlu'"):
        read_task("mmlu", path)
    assert len(read_task("arc_easy", path, limit=1)) == 1


def test_standard_errors_and_paired_differences():
    hits = [1, 0, 1, 1, 0, 1, 0, 1]
    mean, se = mean_stderr(hits)
    p = 5 / 8
    assert mean == p and se == pytest.approx(math.sqrt(p * (1 - p) / 7))   # lm-eval's sample standard error
    after = [1, 0, 1, 1, 1, 1, 0, 1]          # one item flips to right: +1/8, paired error sd(d)/sqrt(n)
    diff, paired = paired_difference(hits, after)
    assert diff == 1 / 8 and paired == pytest.approx(math.sqrt((1 / 8) * (7 / 8) / 7))
    assert paired < se
    with pytest.raises(ValueError, match="same items"):
        paired_difference(hits, after[:-1])
    assert combined_mean({"a": (0.5, 0.03), "b": (0.7, 0.04)}) == pytest.approx((0.6, 0.025))


def test_suite_mean_and_difference_use_each_tasks_metric():
    before = {"arc_challenge": {"metric": "acc_norm", "acc_norm": 0.5, "acc_norm_stderr": 0.1,
                                "hits": {"acc": [1, 1, 0, 0], "acc_norm": [1, 0, 1, 0]}},
              "piqa": {"metric": "acc", "acc": 0.75, "acc_stderr": 0.2, "hits": {"acc": [1, 1, 1, 0]}}}
    after = {"arc_challenge": {**before["arc_challenge"], "hits": {"acc": [0, 0, 0, 0], "acc_norm": [1, 1, 1, 0]}},
             "piqa": before["piqa"]}
    assert suite_mean(before) == pytest.approx((0.625, math.sqrt(0.01 + 0.04) / 2))
    difference = suite_difference(before, after)
    assert difference["arc_challenge"][0] == 0.25 and difference["piqa"] == (0.0, 0.0)
    assert difference["mean"][0] == pytest.approx(0.125)


def test_text_data_refuses_unknown_tasks_and_files_of_another_schema(tmp_path):
    from optima.callbacks.lm import TextData
    from optima.config import OptionError

    tokenizer, text = "assets:stories260K/tok512.bin", "assets:wikitext-2/valid.txt"
    with pytest.raises(OptionError, match="unknown task 'mmlu'") as error:
        TextData(tokenizer, text, text, zero_shot={"mmlu": text})
    assert error.value.option == "data.init_args.zero_shot"
    with pytest.raises(OptionError, match="piqa: .*not found"):
        TextData(tokenizer, text, text, zero_shot={"piqa": str(tmp_path / "missing.jsonl")})
    data = TextData(tokenizer, text, text, seq_len=32, calibration_samples=1, eval_windows=1,
                    zero_shot={"piqa": PAPER_SUITE["arc_easy"]})      # ARC rows are not PIQA rows
    with pytest.raises(OptionError, match="row 1 does not fit the piqa schema"):
        data.setup("validate")
