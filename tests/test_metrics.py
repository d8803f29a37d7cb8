"""The offline metrics agree with scikit-learn / scipy and with hand-worked values."""

import math

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from harness.metrics import METRICS
from harness.tasks import BUILTIN_TASKS

PRED = np.array([1, 0, 1, 1, 0, 1, 0, 0])
REF = np.array([1, 0, 0, 1, 0, 1, 1, 0])


def test_accuracy_by_hand():
    assert METRICS["accuracy"](PRED, REF) == 6 / 8


def test_binary_f1_by_hand():
    # tp=3 (idx 0,3,5), fp=1 (idx 2), fn=1 (idx 6): precision 3/4, recall 3/4
    assert METRICS["f1"](PRED, REF) == pytest.approx(0.75)


def test_matthews_by_hand():
    tp, tn, fp, fn = 3, 3, 1, 1
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert METRICS["matthews_correlation"](PRED, REF) == pytest.approx(expected)
    assert METRICS["matthews_correlation"](PRED, REF) == pytest.approx(skm.matthews_corrcoef(REF, PRED))


def test_correlations_match_scipy():
    rng = np.random.default_rng(0)
    ref = rng.uniform(0, 5, 200)
    pred = ref + rng.normal(0, 1, 200)
    assert METRICS["pearson"](pred, ref) == pytest.approx(stats.pearsonr(pred, ref)[0])
    assert METRICS["spearman"](pred, ref) == pytest.approx(stats.spearmanr(pred, ref)[0])
    assert METRICS["mse"](pred, ref) == pytest.approx(np.mean((pred - ref) ** 2))


def test_constant_predictions_give_zero_correlation_not_nan():
    ref = np.array([0.0, 1.0, 2.0])
    assert METRICS["pearson"](np.ones(3), ref) == 0.0
    assert METRICS["matthews_correlation"](np.ones(3, dtype=int), np.array([0, 1, 1])) == 0.0


def test_macro_f1_matches_sklearn_on_three_classes():
    rng = np.random.default_rng(1)
    ref, pred = rng.integers(0, 3, 50), rng.integers(0, 3, 50)
    assert METRICS["macro_f1"](pred, ref) == pytest.approx(skm.f1_score(ref, pred, average="macro"))


def test_glue_tasks_use_official_metrics():
    official = {"cola": "matthews_correlation", "sst2": "accuracy", "mrpc": "f1", "qqp": "f1", "stsb": "pearson",
                "mnli": "accuracy", "qnli": "accuracy", "rte": "accuracy", "wnli": "accuracy"}
    assert {name: task.primary_metric for name, task in BUILTIN_TASKS.items()} == official
    assert set(BUILTIN_TASKS["stsb"].metrics) == {"pearson", "spearman"}
    assert set(BUILTIN_TASKS["mrpc"].metrics) == {"f1", "accuracy"}
    assert not METRICS["mse"].higher_is_better and METRICS["accuracy"].higher_is_better
