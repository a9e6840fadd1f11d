"""lm-eval-harness tasks on an in-memory (e.g. just pruned) model, and this project's tasks as lm-eval YAMLs.

lm-eval is an optional dependency (``pip install -e '.[lmeval]'`` in the optima checkout); its
standard tasks download their datasets from the hub. Local tasks (YAML files, e.g. a ``dataset_path: json``
task over JSONL files) load through ``include_path`` and run offline: ``SHIPPED_TASKS`` holds the
zero-shot suite's (``optima.tasks``) over ``../shared/assets/zeroshot``, and :func:`write_local_tasks`
writes them for other files.
"""

from __future__ import annotations

import copy
import random
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from optima.loading import resolve_path
from optima.tasks import task_yaml

ZERO_SHOT_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
SHIPPED_TASKS = Path(__file__).resolve().parent / "lm_eval_tasks"   # YAMLs over ../shared/assets/zeroshot


def write_local_tasks(folder: str | Path, tasks: dict[str, str]) -> list[str]:
    """Write an lm-eval task YAML per ``{task: JSONL file}`` (``assets:`` specs allowed) into ``folder``,
    with the hooks they load; return the lm-eval task names (``TASK_local``) to run with ``include_path=folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(SHIPPED_TASKS / "utils.py", folder / "utils.py")
    for name, source in tasks.items():
        (folder / f"{name}_local.yaml").write_text(task_yaml(name, Path(resolve_path(source)).resolve()))
    return [f"{name}_local" for name in tasks]


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise ImportError("lm-eval-harness is not installed; install it with "
                          "pip install -e '.[lmeval]' in the optima checkout") from error
    return lm_eval, HFLM, TaskManager


def run_lm_eval(model: nn.Module, tokenizer, tasks: Sequence[str] = ZERO_SHOT_TASKS, *, batch_size: int = 16,
                include_path: str | Path | Sequence[str | Path] | None = None, include_defaults: bool = True,
                num_fewshot: int | None = None, limit: int | float | None = None, log_samples: bool = False,
                hflm_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """lm-eval's whole results dict (``results``; ``samples`` when ``log_samples``; ``configs``, ...).

    The model is wrapped as it is, on its own device: ``HFLM(pretrained=model, tokenizer=...,
    batch_size=...)``; ``hflm_kwargs`` passes further HFLM options (``add_bos_token``,
    ``max_length``, ...). ``include_path``: folder(s) of custom task YAMLs; ``include_defaults=False``
    skips indexing lm-eval's own tasks (seconds) when only custom ones are run. The caller's
    training mode, tokenizer and global random states are left as they were (HFLM sets eval mode
    and a pad token; simple_evaluate reseeds the global RNGs).
    """
    lm_eval, HFLM, TaskManager = _import_lm_eval()
    if isinstance(include_path, (str, Path)):
        include_path = [include_path]
    task_manager = TaskManager(include_path=[str(p) for p in include_path] if include_path else None,
                               include_defaults=include_defaults)
    was_training = model.training
    python_state, numpy_state = random.getstate(), np.random.get_state()
    cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=cuda_devices):
            lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size,
                      **(hflm_kwargs or {}))
            return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                           log_samples=log_samples, task_manager=task_manager)
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        model.train(was_training)


def task_metrics(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` from lm-eval's results: ``"acc,none"`` becomes ``"acc"``; the
    alias and non-numeric entries (an unavailable stderr) are dropped."""
    return {task: {key.removesuffix(",none"): float(value) for key, value in values.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)}
            for task, values in results["results"].items()}


def evaluate_tasks(model: nn.Module, tokenizer, tasks: Sequence[str] = ZERO_SHOT_TASKS, *, batch_size: int = 16,
                   include_path: str | Path | Sequence[str | Path] | None = None, include_defaults: bool = True,
                   num_fewshot: int | None = None, limit: int | float | None = None,
                   hflm_kwargs: dict[str, Any] | None = None) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` of lm-eval tasks on an in-memory model, by default the seven
    zero-shot tasks of the pruning literature; arguments as :func:`run_lm_eval`."""
    return task_metrics(run_lm_eval(model, tokenizer, tasks, batch_size=batch_size, include_path=include_path,
                                    include_defaults=include_defaults, num_fewshot=num_fewshot, limit=limit,
                                    hflm_kwargs=hflm_kwargs))
