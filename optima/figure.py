"""The run's picture: zero-shot accuracy per task with error bars (dense vs pruned), and the
per-block layer error of the pruning. Needs matplotlib (``pip install -e '.[plot]'``)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from optima.atomic import atomic_target
from optima.zeroshot import suite_mean


def block_errors(layers: Sequence[dict]) -> list[float]:
    """Mean relative error of each block's layers (the report's ``layers`` records), blocks in order."""
    by_block: dict[int, list[float]] = {}
    for layer in layers:
        by_block.setdefault(layer["block"], []).append(layer["relative_error"])
    return [sum(errors) / len(errors) for _, errors in sorted(by_block.items())]


def write_figure(path: str | os.PathLike, suites: Mapping[str, Mapping[str, dict]], errors: Sequence[float]) -> None:
    """A PNG at ``path``: left, each task's suite metric and the mean for every model in ``suites``
    (``{label: evaluate_suite results}``) with one standard error; right, ``errors`` per block."""
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError("the figure needs matplotlib: pip install -e '.[plot]' in the optima checkout") from error
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    tasks = list(next(iter(suites.values()))) if suites else []
    labels = [f"{t}\n{suites[next(iter(suites))][t]['metric']}" for t in tasks] + ["mean"]
    width = 0.8 / max(1, len(suites))
    for k, (label, results) in enumerate(suites.items()):
        values = [100 * results[t][results[t]["metric"]] for t in tasks]
        stderrs = [100 * results[t][f"{results[t]['metric']}_stderr"] for t in tasks]
        mean, stderr = suite_mean(results)
        positions = [i + (k - (len(suites) - 1) / 2) * width for i in range(len(tasks) + 1)]
        left.bar(positions, values + [100 * mean], width, yerr=stderrs + [100 * stderr], capsize=3, label=label)
    left.set_xticks(range(len(labels)), labels, fontsize=8)
    left.set_ylabel("zero-shot accuracy (points, ± 1 s.e.)")
    left.set_title("zero-shot suite")
    if suites:
        left.legend()
    right.plot(range(len(errors)), errors, marker="o")
    right.xaxis.set_major_locator(MaxNLocator(integer=True))
    right.set_xlabel("block")
    right.set_ylabel("mean relative layer error")
    right.set_title("reconstruction error per block")
    figure.tight_layout()
    try:
        with atomic_target(path) as temporary:
            figure.savefig(temporary, format="png", dpi=110)
    finally:
        plt.close(figure)
