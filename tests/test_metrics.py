"""The offline metrics against values worked out by hand, never against the library calls they wrap.

Each expected value below is counted or computed in the comments from the small arrays beside it
(confusion counts, deviations from the mean, ranks written down), or, for the larger random
arrays, from the metric's formula written out with numpy.
"""

import json
import warnings

import numpy as np
import pytest

from harness import metrics, results
from harness.cli import main
from harness.metrics import METRICS
from harness.tasks import BUILTIN_TASKS

#                  0  1  2  3  4  5  6  7
PRED = np.array([1, 1, 1, 0, 0, 1, 0, 0])
REF = np.array([1, 0, 1, 1, 0, 0, 0, 0])
# class 1 positive: tp = idx 0, 2 -> 2; fp = idx 1, 5 -> 2; fn = idx 3 -> 1; tn = idx 4, 6, 7 -> 3
TP, FP, FN, TN = 2, 2, 1, 3


def test_accuracy_by_hand():
    assert METRICS["accuracy"](PRED, REF) == (TP + TN) / 8 == 5 / 8


def test_binary_f1_by_hand_is_of_the_positive_class():
    # precision 2/4, recall 2/3: F1 = 2 * tp / (2 * tp + fp + fn) = 4 / 7
    assert METRICS["f1"](PRED, REF) == pytest.approx(4 / 7)
    # with class 0 as positive it would be: tp 3, fp 1 (idx 3), fn 2 (idx 1, 5) -> 6 / 9; it is not
    assert METRICS["f1"](PRED, REF) != pytest.approx(6 / 9)
    # swapping which class is 1 swaps the answer
    assert METRICS["f1"](1 - PRED, 1 - REF) == pytest.approx(6 / 9)


def test_macro_f1_by_hand_binary():
    assert METRICS["macro_f1"](PRED, REF) == pytest.approx((4 / 7 + 6 / 9) / 2)


# Three classes, 9 examples; the confusion matrix (rows: reference, columns: prediction):
#            pred 0  pred 1  pred 2
#   ref 0       2       1       0      (idx 0, 2 right; idx 1 -> 1)
#   ref 1       0       1       1      (idx 3 right; idx 4 -> 2)
#   ref 2       1       0       3      (idx 5, 6, 8 right; idx 7 -> 0)
REF3 = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
PRED3 = np.array([0, 1, 0, 1, 2, 2, 2, 0, 2])


def test_three_class_accuracy_and_macro_f1_by_hand():
    assert METRICS["accuracy"](PRED3, REF3) == pytest.approx(6 / 9)
    # class 0: tp 2, fp 1, fn 1 -> 4/6; class 1: tp 1, fp 1, fn 1 -> 2/4; class 2: tp 3, fp 1, fn 1 -> 6/8
    assert METRICS["macro_f1"](PRED3, REF3) == pytest.approx((4 / 6 + 2 / 4 + 6 / 8) / 3)  # 23/36


def test_matthews_binary_from_the_confusion_counts():
    # (tp*tn - fp*fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) = (6 - 2) / sqrt(4 * 3 * 5 * 4) = 4 / sqrt(240)
    assert METRICS["matthews_correlation"](PRED, REF) == pytest.approx(4 / 240**0.5)


def test_matthews_three_classes_from_the_confusion_matrix():
    # Gorodkin's R_K: (c*s - sum_k p_k t_k) / sqrt((s^2 - sum_k p_k^2)(s^2 - sum_k t_k^2)), with
    # c = 6 right of s = 9, true counts t = (3, 2, 4) (row sums), predicted counts p = (3, 2, 4) (column sums):
    # (54 - 29) / sqrt((81 - 29) * (81 - 29)) = 25 / 52
    assert METRICS["matthews_correlation"](PRED3, REF3) == pytest.approx(25 / 52)


def test_perfect_and_inverted_classification():
    assert METRICS["matthews_correlation"](REF, REF) == pytest.approx(1.0)
    assert METRICS["matthews_correlation"](1 - REF, REF) == pytest.approx(-1.0)
    assert METRICS["f1"](REF, REF) == pytest.approx(1.0) and METRICS["accuracy"](REF, REF) == 1.0
    assert METRICS["accuracy"](1 - REF, REF) == 0.0 and METRICS["f1"](1 - REF, REF) == 0.0


def test_pearson_and_spearman_by_hand():
    ref = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    pred = np.array([2.0, 1.0, 4.0, 3.0, 5.0])
    # deviations from the mean 3: ref (-2, -1, 0, 1, 2), pred (-1, -2, 1, 0, 2);
    # sum of products 2 + 2 + 0 + 0 + 4 = 8; sums of squares 10 and 10 -> r = 8 / 10
    assert METRICS["pearson"](pred, ref) == pytest.approx(0.8)
    # pred's ranks are (2, 1, 4, 3, 5), ref's (1..5): the same numbers, so Spearman is 0.8 too
    assert METRICS["spearman"](pred, ref) == pytest.approx(0.8)
    # the same ranks from values far from linear: Spearman stays 0.8, Pearson does not
    skewed = np.array([2.0, 1.0, 40.0, 3.0, 500.0])
    assert METRICS["spearman"](skewed, ref) == pytest.approx(0.8)
    assert METRICS["pearson"](skewed, ref) != pytest.approx(0.8)


def test_spearman_with_ties_uses_average_ranks():
    ref = np.array([10.0, 20.0, 30.0, 40.0, 50.0])
    pred = np.array([7.0, 7.0, 8.0, 9.0, 10.0])
    # pred's ranks: the tie shares (1 + 2) / 2 -> (1.5, 1.5, 3, 4, 5); ref's (1, 2, 3, 4, 5)
    # deviations: (-1.5, -1.5, 0, 1, 2) and (-2, -1, 0, 1, 2); products 3 + 1.5 + 0 + 1 + 4 = 9.5;
    # squares 9.5 and 10 -> 9.5 / sqrt(95)
    assert METRICS["spearman"](pred, ref) == pytest.approx(9.5 / 95**0.5)


def test_pearson_from_its_formula_on_random_data():
    rng = np.random.default_rng(0)
    ref = rng.uniform(0, 5, 200)
    pred = 0.5 * ref + rng.normal(0, 1, 200)
    dp, dr = pred - pred.mean(), ref - ref.mean()
    expected = (dp * dr).sum() / np.sqrt((dp**2).sum() * (dr**2).sum())
    assert METRICS["pearson"](pred, ref) == pytest.approx(expected)
    assert 0.3 < expected < 0.95  # a real, partial correlation: neither degenerate nor perfect


def test_correlation_does_not_depend_on_scale_or_shift():
    ref = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    pred = np.array([0.5, 0.7, 2.5, 2.0, 4.4])
    assert METRICS["pearson"](3 * pred + 7, ref) == pytest.approx(METRICS["pearson"](pred, ref))
    assert METRICS["pearson"](-pred, ref) == pytest.approx(-METRICS["pearson"](pred, ref))
    assert METRICS["pearson"](ref * 2 - 1, ref) == pytest.approx(1.0)


def test_mse_by_hand():
    # errors 0, 2, 3 -> squares 0, 4, 9 -> mean 13 / 3
    assert METRICS["mse"]([1.0, 2.0, 3.0], [1.0, 4.0, 0.0]) == pytest.approx(13 / 3)
    assert METRICS["mse"]([1.5, 1.5], [1.5, 1.5]) == 0.0


def test_constant_predictions():
    """A model that predicts one value: the correlations are 0.0 (the harness's convention), not NaN."""
    ref = np.array([0.0, 1.0, 2.0])
    assert METRICS["pearson"](np.ones(3), ref) == 0.0
    assert METRICS["spearman"](np.ones(3), ref) == 0.0
    assert METRICS["pearson"](ref, np.ones(3)) == 0.0  # constant references too
    assert METRICS["mse"](np.ones(3), ref) == pytest.approx((1 + 0 + 1) / 3)
    labels = np.array([0, 1, 1, 1])
    assert METRICS["matthews_correlation"](np.ones(4, dtype=int), labels) == 0.0
    assert METRICS["accuracy"](np.ones(4, dtype=int), labels) == 3 / 4  # the majority class's share
    # all positive: tp 3, fp 1, fn 0 -> 6 / 7
    assert METRICS["f1"](np.ones(4, dtype=int), labels) == pytest.approx(6 / 7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns that precision is undefined; the value is what counts
        # all negative: no true positive, so F1 of the positive class is 0
        assert METRICS["f1"](np.zeros(4, dtype=int), labels) == 0.0
    for name in METRICS:
        value = METRICS[name](np.ones(4), np.array([0.0, 1.0, 1.0, 1.0]))
        assert np.isfinite(value), name


def test_values_are_plain_floats():
    for name in ("accuracy", "f1", "macro_f1", "matthews_correlation"):
        assert type(METRICS[name](PRED.tolist(), REF.tolist())) is float, name
    for name in ("pearson", "spearman", "mse"):
        assert type(METRICS[name]([1.0, 2.0, 4.0], [1.0, 3.0, 2.0])) is float, name


def test_glue_tasks_use_official_metrics():
    official = {
        "cola": "matthews_correlation",
        "sst2": "accuracy",
        "mrpc": "f1",
        "qqp": "f1",
        "stsb": "pearson",
        "mnli": "accuracy",
        "qnli": "accuracy",
        "rte": "accuracy",
        "wnli": "accuracy",
    }
    glue = {
        name: task.primary_metric
        for name, task in BUILTIN_TASKS.items()
        if task.modality == "text" and not task.is_causal_lm
    }
    assert glue == official
    assert set(BUILTIN_TASKS["stsb"].metrics) == {"pearson", "spearman"}
    assert set(BUILTIN_TASKS["mrpc"].metrics) == {"f1", "accuracy"}
    higher = {name: m.higher_is_better for name, m in METRICS.items()}
    assert higher == {
        "accuracy": True,
        "f1": True,
        "macro_f1": True,
        "matthews_correlation": True,
        "pearson": True,
        "spearman": True,
        "mse": False,
        "exact_match": True,
        "perplexity": False,
    }


# ---- the registry and the plugin route ------------------------------------------------------------


def test_which_metrics_fit_a_task_type_comes_from_their_declarations():
    assert metrics.fitting("classification") == ["accuracy", "f1", "macro_f1", "matthews_correlation"]
    assert metrics.fitting("regression") == ["mse", "pearson", "spearman"]
    assert metrics.fitting("causal_lm") == ["exact_match", "perplexity"]


def test_a_declaration_must_say_higher_is_better_and_a_known_task_type():
    with pytest.raises(TypeError, match="higher_is_better"):
        metrics.metric(higher_is_better="yes")(lambda p, r: 0.0)
    with pytest.raises(TypeError, match="task_types"):
        metrics.metric(higher_is_better=True, task_types=("ranking",))(lambda p, r: 0.0)
    with pytest.raises(TypeError, match="likelihood"):
        metrics.metric(higher_is_better=False, reads="likelihood")(lambda p, r: 0.0)


PLUGIN = '''
from pathlib import Path
from harness.metrics import metric

with open(Path(__file__).with_suffix(".imports"), "a") as log:  # one line per time this file is executed
    log.write("imported\\n")


@metric(higher_is_better=False, task_types=("classification",))
def share_of_ones(predictions, references):
    """fraction of references that are class 1"""
    return (references == 1).mean()


@metric(higher_is_better=True, task_types=("regression",))
def regression_only(predictions, references):
    return 0.0


def undeclared(predictions, references):
    return 0.0
'''
# 16 rows, 6 of them class 1: the plugin's value on the whole evaluation split is 6 / 16
ROWS = [
    ("good film", 1),
    ("bad film", 0),
    ("fine", 1),
    ("awful", 0),
    ("great", 1),
    ("dull", 0),
    ("nice", 1),
    ("poor", 0),
    ("lovely", 1),
    ("boring", 0),
    ("superb", 1),
    ("weak", 0),
    ("flat", 0),
    ("tedious", 0),
    ("grim", 0),
    ("meh", 0),
]


def custom_task_suite(tiny_suite, folder, metric_list: str):
    (folder / "plugin.py").write_text(PLUGIN)
    (folder / "d.csv").write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in ROWS))
    return tiny_suite(
        f"tasks: [{{name: mine, data_files: {{train: d.csv, validation: d.csv}}, text_columns: [text], "
        f"num_labels: 2, metrics: {metric_list}}}]\n"
        "methods: [{method: linear_probe, lr: 1.0e-2}]\n"
        "train: {max_steps: 2, batch_size: 8, max_seq_length: 16, timing_warmup_steps: 0}\n"
    )


def test_a_plugin_metric_runs_end_to_end_and_lands_in_the_record(tiny_suite, tmp_path):
    plugin = tmp_path / "plugin.py"
    suite = custom_task_suite(tiny_suite, tmp_path, f"['{plugin}:share_of_ones', accuracy]")
    out = tmp_path / "out"
    assert main(["run", str(suite), "--out", str(out), "--no-report"]) == 0
    [record] = [json.loads(p.read_text()) for p in out.glob("*.json")]
    assert record["status"] == "ok", record.get("error")
    assert record["metrics"][f"{plugin}:share_of_ones"] == {"value": 6 / 16, "higher_is_better": False}
    assert record["metrics"]["accuracy"]["higher_is_better"] is True
    row = results.load(out).iloc[0]  # the plugin is the task's primary metric
    assert row["metric_name"] == f"{plugin}:share_of_ones" and row["metric"] == 6 / 16 and not row["higher_is_better"]


def test_a_plugin_is_imported_once_per_process(tmp_path):
    (tmp_path / "plugin.py").write_text(PLUGIN)
    ref = f"{tmp_path / 'plugin.py'}:share_of_ones"
    first, again = metrics.resolve(ref, "here"), metrics.METRICS[ref]
    assert (
        first is again
        and first.higher_is_better is False
        and first.description == "fraction of references that are class 1"
    )
    metrics.resolve(f"{tmp_path / 'plugin.py'}:regression_only", "here")  # another name from the same file
    assert (tmp_path / "plugin.imports").read_text() == "imported\n"


@pytest.mark.parametrize(
    "ref,words",
    [
        ("no_such_module_anywhere:fn", ["cannot import plugin", "no_such_module_anywhere"]),
        ("{dir}/absent.py:fn", ["absent.py", "does not exist"]),
        ("{dir}/plugin.py:nothing_here", ["has no 'nothing_here'"]),
        ("{dir}/plugin.py:undeclared", ["not a declared metric", "@harness.metrics.metric"]),
        ("{dir}/plugin.py:regression_only", ["does not fit a classification task"]),
        ("bleu", ["unknown metric 'bleu'"]),
    ],
    ids=["no-module", "no-file", "no-attribute", "not-decorated", "wrong-task-type", "unknown-name"],
)
def test_a_bad_metric_reference_is_one_line_and_exit_2(ref, words, tiny_suite, tmp_path, capsys):
    suite = custom_task_suite(tiny_suite, tmp_path, f"['{ref.format(dir=tmp_path)}']")
    assert main(["validate", str(suite)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("error: ") and "tasks[0].metrics" in err and "; fix: " in err, err
    for word in words:
        assert word in err, err
