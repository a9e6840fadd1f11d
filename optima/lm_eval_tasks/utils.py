"""Python hooks of the local lm-eval task YAMLs beside this file (lm-eval loads them by ``!function``).

They restate lm-eval's own WinoGrande and HellaSwag hooks so that these YAMLs run on any lm-eval
0.4.x without depending on where its task folder is installed.
"""

from optima.tasks import hellaswag_clean


def winogrande_text(doc: dict) -> int:
    """The right option's index: lm-eval's partial evaluation puts the options in the contexts."""
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_target(doc: dict) -> str:
    """The shared continuation: the sentence after the blank."""
    return doc["sentence"][doc["sentence"].index("_") + 1:].strip()


def winogrande_choices(doc: dict) -> list[str]:
    """One context per option: the sentence up to the blank, with the option filled in."""
    blank = doc["sentence"].index("_")
    return [doc["sentence"][:blank] + option for option in (doc["option1"], doc["option2"])]


def hellaswag_docs(dataset):
    """HellaSwag rows to ``query`` / ``choices`` / ``gold``, as lm-eval's own task does."""
    def convert(doc: dict) -> dict:
        context = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {"query": hellaswag_clean(doc["activity_label"] + ": " + context),
                "choices": [hellaswag_clean(e) for e in doc["endings"]], "gold": int(doc["label"])}
    return dataset.map(convert)
