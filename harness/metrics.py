"""Task metrics, computed offline, and the registry that finds them.

`evaluate` fetches its metric scripts from the hub, so the official GLUE
metrics are implemented here on top of scikit-learn and scipy. A task names one
or more metrics and one of them as primary; every recorded value carries the
metric's `higher_is_better`.

Each metric is one `Metric`, declared once: its function (predictions,
references) -> float, whether higher is better, the task types it fits, and a
line saying what it is. The built-in ones are the rows of `BUILTIN`; which fit
a task type is derived from them (`fitting`).

A suite's task may also name a metric of its own, as `module:function` or
`path/to/file.py:function` (a path relative to where you run the harness). The
function is declared a metric with the `metric` decorator:

    # my_metrics.py
    from harness.metrics import metric

    @metric(higher_is_better=False, task_types=("regression",))
    def max_abs_error(predictions, references):
        '''largest absolute error (regression)'''
        return abs(predictions - references).max()

    # suite.yaml
    tasks:
      - {name: mine, ..., type: regression, metrics: [pearson, "my_metrics.py:max_abs_error"]}

The function gets two numpy arrays and returns a number (for a causal_lm task:
the normalised generated answers and the targets', or, declared with
`reads="likelihood"`, each example's summed target NLL and its target tokens);
the decorator makes it
a `Metric` (its docstring's first line is the description). Its value is
recorded under the reference as the suite wrote it, with its higher_is_better.
A plugin module is imported once per process; a reference that does not import,
or names something that is not a decorated metric, is a one-line UserError.
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
from scipy import stats
from sklearn import metrics as skm

from harness import plugins
from harness.errors import UserError

CLASSIFICATION, REGRESSION, CAUSAL_LM = "classification", "regression", "causal_lm"
TASK_TYPES = (CLASSIFICATION, REGRESSION, CAUSAL_LM)
# What a metric is given, as (predictions, references): "predictions" are the model's outputs and the labels
# (for a causal_lm task: each generated answer and the target's, normalised by harness.causal_lm.answer);
# "likelihood" (causal_lm) each example's summed negative log-likelihood of its target and its target's tokens.
READS = ("predictions", "likelihood")


@dataclass(frozen=True)
class Metric:
    name: str
    fn: Callable[[np.ndarray, np.ndarray], float]  # (predictions, references) -> value
    higher_is_better: bool
    task_types: tuple[str, ...]  # the task types it fits, some of TASK_TYPES
    description: str
    reads: str = "predictions"  # one of READS

    def __post_init__(self):
        if not isinstance(self.higher_is_better, bool):
            raise TypeError(f"metric '{self.name}': higher_is_better must be True or False")
        if not self.task_types or not set(self.task_types) <= set(TASK_TYPES):
            raise TypeError(f"metric '{self.name}': task_types must be some of {TASK_TYPES}, got {self.task_types!r}")
        if self.reads not in READS:
            raise TypeError(f"metric '{self.name}': reads must be one of {READS}, got {self.reads!r}")
        if self.reads == "likelihood" and set(self.task_types) != {CAUSAL_LM}:
            raise TypeError(f"metric '{self.name}': only a causal_lm task has a likelihood to read")

    def __call__(self, predictions, references) -> float:
        return float(self.fn(np.asarray(predictions), np.asarray(references)))


def metric(
    *, higher_is_better: bool, task_types=(CLASSIFICATION,), reads: str = "predictions"
) -> Callable[[Callable], Metric]:
    """Declare a function (predictions, references) -> number a metric, for a suite to name as a plugin."""

    def declare(fn: Callable) -> Metric:
        description = ((fn.__doc__ or "").strip().splitlines() or [""])[0]
        return Metric(fn.__name__, fn, higher_is_better, tuple(task_types), description, reads)

    return declare


def _pearson(p, r):
    return stats.pearsonr(p, r)[0] if np.std(p) > 0 and np.std(r) > 0 else 0.0


def _spearman(p, r):
    return stats.spearmanr(p, r)[0] if np.std(p) > 0 and np.std(r) > 0 else 0.0


def _perplexity(nll, tokens):
    """exp of the mean negative log-likelihood per target token, over the whole split."""
    return float(np.exp(np.sum(nll) / max(1, np.sum(tokens))))


_C, _R, _LM = (CLASSIFICATION,), (REGRESSION,), (CAUSAL_LM,)
BUILTIN: dict[str, Metric] = {
    m.name: m
    for m in [
        Metric("accuracy", lambda p, r: skm.accuracy_score(r, p), True, _C, "fraction of exact matches"),
        Metric("f1", lambda p, r: skm.f1_score(r, p), True, _C, "F1 of the positive class (binary)"),
        Metric(
            "macro_f1", lambda p, r: skm.f1_score(r, p, average="macro"), True, _C, "unweighted mean F1 over classes"
        ),
        Metric(
            "matthews_correlation",
            lambda p, r: skm.matthews_corrcoef(r, p),
            True,
            _C,
            "Matthews correlation coefficient",
        ),
        Metric("pearson", _pearson, True, _R, "Pearson correlation (regression)"),
        Metric("spearman", _spearman, True, _R, "Spearman rank correlation (regression)"),
        Metric("mse", lambda p, r: skm.mean_squared_error(r, p), False, _R, "mean squared error (regression)"),
        Metric(
            "exact_match",
            lambda p, r: float(np.mean(p == r)),
            True,
            _LM,
            "fraction of greedy generations whose normalised answer equals the target's",
        ),
        Metric("perplexity", _perplexity, False, _LM, "perplexity of the target tokens", "likelihood"),
    ]
}


def fitting(task_type: str) -> list[str]:
    """The built-in metrics that fit a task type."""
    return sorted(name for name, m in BUILTIN.items() if task_type in m.task_types)


_PLUGINS: dict[str, Metric] = {}  # reference -> its metric, resolved once per process


def resolve(ref: str, where: str) -> Metric:
    """A built-in name, `module:function` or `path/to/file.py:function` -> the Metric; a UserError otherwise."""
    if ref in BUILTIN:
        return BUILTIN[ref]
    if ref in _PLUGINS:
        return _PLUGINS[ref]
    if ":" not in ref:
        raise UserError(
            where,
            f"unknown metric '{ref}'",
            f"use some of {sorted(BUILTIN)}, or name your own as module:function or file.py:function",
        )
    target, _, attribute = ref.rpartition(":")
    found = getattr(plugins.import_target(target, where), attribute, None)
    if not isinstance(found, Metric):
        problem = f"plugin '{target}' has no '{attribute}'" if found is None else f"'{ref}' is not a declared metric"
        raise UserError(
            where, problem, "decorate the function with @harness.metrics.metric(higher_is_better=..., task_types=...)"
        )
    _PLUGINS[ref] = found
    return found


class _Registry(Mapping):
    """METRICS[name]: a built-in metric, or a plugin reference resolved on first use. Lists the built-ins."""

    def __getitem__(self, ref: str) -> Metric:
        if ref not in BUILTIN and ":" not in ref:
            raise KeyError(ref)
        return resolve(ref, f"metric '{ref}'")

    def __iter__(self):
        return iter(BUILTIN)

    def __len__(self) -> int:
        return len(BUILTIN)


METRICS: Mapping[str, Metric] = _Registry()
