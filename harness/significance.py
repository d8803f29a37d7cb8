"""Paired comparison on the eval split: per task, each method's difference in score from the best, with a 95%
paired-bootstrap interval over the eval examples.

- The eval examples are resampled with replacement, BOOTSTRAP_SAMPLES times from a fixed seed, and every method
  is scored on the same resamples: the interval is of the paired difference, which is far narrower than the two
  scores' own intervals when the methods err on the same examples.
- A method's score on a resample is the mean over its seeds of the task's primary metric on it (the seeds'
  predictions are of the same examples); the metric is the task's own (harness.metrics), so Matthews
  correlation, F1 and Pearson are recomputed on each resample, not averaged per example.
- The best is the method with the best mean eval score. A method whose interval holds 0 is not distinguishable
  from the best at this level.
Cells without kept predictions (plans, records older than them, cells that did not finish) are left out; a task
whose methods were scored on different examples has no comparison.
"""

import warnings

import numpy as np
import pandas as pd

from harness.metrics import METRICS

BOOTSTRAP_SAMPLES = 1000
BOOTSTRAP_SEED = 0
LEVEL = 0.95
COLUMNS = ["task", "method", "metric_name", "score", "best", "difference", "low", "high", "distinguishable", "examples"]


def paired_comparison(cells: pd.DataFrame, records_by_path: dict[str, dict]) -> pd.DataFrame:
    """One row per task and method (the cells given, named by their `method`): its mean eval score, its difference
    from the best, the interval, and whether the interval excludes 0."""
    rows = []
    for task, group in cells[cells["status"] == "ok"].groupby("task", sort=False):
        rows += _task_rows(task, group, records_by_path)
    return pd.DataFrame(rows, columns=COLUMNS)


def _task_rows(task: str, group: pd.DataFrame, records_by_path: dict[str, dict]) -> list[dict]:
    name = group["metric_name"].iloc[0]
    metric = METRICS[name]
    outputs: dict[str, list[np.ndarray]] = {}
    reference = None
    for method, cells in group.groupby("method", sort=False):
        for path in cells["path"]:
            kept = (records_by_path.get(path) or {}).get("predictions") or {}
            if metric.reads not in kept:
                continue
            predicted, references = (np.asarray(v, dtype=object if _texts(v) else None) for v in kept[metric.reads])
            if reference is None:
                reference = references
            elif len(references) != len(reference) or not np.array_equal(references, reference):
                return []  # scored on different examples: no paired comparison
            outputs.setdefault(method, []).append(predicted)
    if reference is None or len(outputs) < 2:
        return []
    resamples = np.random.default_rng(BOOTSTRAP_SEED).integers(0, len(reference), (BOOTSTRAP_SAMPLES, len(reference)))

    def score(predictions: list[np.ndarray], rows=slice(None)) -> float:
        return float(np.mean([metric(p[rows], reference[rows]) for p in predictions]))

    scores = {method: score(p) for method, p in outputs.items()}
    sign = 1.0 if metric.higher_is_better else -1.0
    best = max(scores, key=lambda m: sign * scores[m])
    with warnings.catch_warnings():  # a resample may hold one class only, which some metrics warn of
        warnings.simplefilter("ignore")
        on_resamples = {m: np.array([score(p, rows) for rows in resamples]) for m, p in outputs.items()}
    out = []
    for method in outputs:
        differences = on_resamples[method] - on_resamples[best]
        low, high = np.quantile(differences, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
        out.append(
            {
                "task": task,
                "method": method,
                "metric_name": name,
                "score": scores[method],
                "best": method == best,
                "difference": scores[method] - scores[best],
                "low": float(low),
                "high": float(high),
                "distinguishable": method != best and not low <= 0.0 <= high,
                "examples": len(reference),
            }
        )
    return sorted(out, key=lambda r: -sign * r["score"])


def _texts(values: list) -> bool:
    return any(isinstance(v, str) or v is None for v in values)
