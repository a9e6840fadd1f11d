"""Standard errors of accuracies, of their differences on the same items, and of a suite's mean.

An accuracy over n items has lm-eval's standard error sqrt(p (1 - p) / (n - 1)) (the sample
standard deviation of the 0/1 hits over sqrt(n)). Two models scored on the same items differ
by the mean of their per-item differences, whose standard error is far smaller than either
accuracy's when the models mostly agree. A suite's mean is the plain mean of its tasks' accuracies,
the tasks independent, so its standard error is sqrt(sum of squared task errors) / tasks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    """The mean of ``values`` and its standard error (sample standard deviation / sqrt(n); NaN for n < 2)."""
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def paired_difference(before: Sequence[int], after: Sequence[int]) -> tuple[float, float]:
    """``after - before`` accuracy on the same items (0/1 hits in the same order) and its paired standard error."""
    if len(before) != len(after):
        raise ValueError(f"paired hits need the same items, got {len(before)} and {len(after)}")
    return mean_stderr([a - b for a, b in zip(after, before)])


def combined_mean(estimates: Mapping[str, tuple[float, float]]) -> tuple[float, float]:
    """The plain mean of independent ``{name: (value, stderr)}`` estimates and its standard error."""
    if not estimates:
        raise ValueError("no estimates")
    values = list(estimates.values())
    return (sum(v for v, _ in values) / len(values),
            math.sqrt(sum(se ** 2 for _, se in values)) / len(values))
