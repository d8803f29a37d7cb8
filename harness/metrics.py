"""Task metrics, computed offline.

`evaluate` fetches its metric scripts from the hub, so the official GLUE
metrics are implemented here on top of scikit-learn and scipy. Each metric
carries whether higher is better, and a task names one of them as primary.
"""

from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy import stats
from sklearn import metrics as skm


@dataclass(frozen=True)
class Metric:
    name: str
    fn: Callable[[np.ndarray, np.ndarray], float]  # (predictions, references) -> value
    higher_is_better: bool
    description: str

    def __call__(self, predictions, references) -> float:
        return float(self.fn(np.asarray(predictions), np.asarray(references)))


def _pearson(p, r):
    return stats.pearsonr(p, r)[0] if np.std(p) > 0 and np.std(r) > 0 else 0.0


def _spearman(p, r):
    return stats.spearmanr(p, r)[0] if np.std(p) > 0 and np.std(r) > 0 else 0.0


METRICS: dict[str, Metric] = {
    m.name: m
    for m in [
        Metric("accuracy", lambda p, r: skm.accuracy_score(r, p), True, "fraction of exact matches"),
        Metric("f1", lambda p, r: skm.f1_score(r, p), True, "F1 of the positive class (binary)"),
        Metric("macro_f1", lambda p, r: skm.f1_score(r, p, average="macro"), True, "unweighted mean F1 over classes"),
        Metric("matthews_correlation", lambda p, r: skm.matthews_corrcoef(r, p), True, "Matthews correlation coefficient"),
        Metric("pearson", _pearson, True, "Pearson correlation (regression)"),
        Metric("spearman", _spearman, True, "Spearman rank correlation (regression)"),
        Metric("mse", lambda p, r: skm.mean_squared_error(r, p), False, "mean squared error (regression)"),
    ]
}
CLASSIFICATION_METRICS = {"accuracy", "f1", "macro_f1", "matthews_correlation"}
REGRESSION_METRICS = {"pearson", "spearman", "mse"}
