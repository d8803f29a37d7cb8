"""The protocol: sweeps expand into cells, every task holds out dev data disjoint from its training data, and
selection picks each entry's point by its mean dev score over seeds, never by the eval split."""

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

from harness import data, report, results, runner, selection, significance
from harness.config import Cell, load_suite
from harness.summary import selected_points, summarize
from harness.tasks import BUILTIN_TASKS


def suite_file(tmp_path, methods: str, tasks: str = "[sst2]", seeds: str = "[0, 1]"):
    path = tmp_path / "sweep.yaml"
    path.write_text(
        f"name: sweep\ntasks: {tasks}\nmethods:\n{methods}seeds: {seeds}\n"
        "train: {max_steps: 2, batch_size: 4, max_seq_length: 16, max_train_samples: 8, max_eval_samples: 8}\n"
    )
    return path


def test_a_sweep_expands_into_one_cell_per_point_and_seed_each_named_by_its_point(tmp_path):
    suite = load_suite(
        suite_file(
            tmp_path,
            "  - {method: lora, sweep: {lr: [1.0e-4, 1.0e-3], r: [4, 8]}}\n"
            "  - {method: bitfit, lr: 1.0e-3, sweep: {warmup_ratio: [0.0, 0.1]}}\n"
            "  - {stack: [{method: lora}, {method: tokentune}], label: lt, sweep: {fraction: [0.25, 0.5]}}\n"
            "  - {method: full}\n",
        )
    )
    cells = suite.cells()
    lora = [c for c in cells if c.entry.group == "lora"]
    assert len(lora) == 2 * 2 * 2 and len(cells) == 8 + 4 + 4 + 2
    assert sorted({c.entry.label for c in lora}) == [
        "lora@lr=0.0001,r=4",
        "lora@lr=0.0001,r=8",
        "lora@lr=0.001,r=4",
        "lora@lr=0.001,r=8",
    ]
    point = next(c for c in lora if c.entry.label == "lora@lr=0.001,r=8" and c.seed == 1)
    assert point.entry.lr == 1.0e-3 and point.entry.components[0].hparams["r"] == 8
    assert {c.train.warmup_ratio for c in cells if c.entry.group == "bitfit"} == {0.0, 0.1}
    stacked = {c.entry.label: c.entry.components[1].hparams["fraction"] for c in cells if c.entry.group == "lt"}
    assert stacked == {"lt@fraction=0.25": 0.25, "lt@fraction=0.5": 0.5}
    # the record names the point, and reads back as the same cell
    as_dict = point.to_dict()
    assert as_dict["entry"] == "lora" and as_dict["point"] == {"lr": 1.0e-3, "r": 8}
    assert Cell.from_dict(json.loads(json.dumps(as_dict))).to_dict() == as_dict
    assert "point" not in next(c for c in cells if c.entry.label == "full").to_dict()


def test_dev_data_is_carved_from_training_data_the_same_way_every_time_and_disjoint_from_it(data_dir):
    task = BUILTIN_TASKS["rte"]
    whole = data.load_split(task, task.train_split, data_dir)
    train, dev = data.train_and_dev(task, data_dir)
    assert len(dev) == min(data.DEFAULT_DEV_SIZE, int(len(whole) * data.DEFAULT_DEV_FRACTION)) == 249
    assert set(train["idx"]).isdisjoint(dev["idx"]) and len(train) + len(dev) == len(whole)
    again_train, again_dev = data.train_and_dev(task, data_dir)
    assert again_dev.equals(dev) and again_train.equals(train)
    sized = data.train_and_dev(dataclasses.replace(task, dev_size=100), data_dir)[1]
    assert len(sized) == 100


def test_a_task_can_name_its_dev_split(tmp_path):
    for split, rows in (("train", 6), ("dev", 3), ("test", 4)):
        pd.DataFrame({"text": [f"{split} {i}" for i in range(rows)], "label": [i % 2 for i in range(rows)]}).to_csv(
            tmp_path / f"{split}.csv", index=False
        )
    suite = tmp_path / "named.yaml"
    suite.write_text(
        "tasks:\n  - {name: mine, text_columns: [text], num_labels: 2, metrics: [accuracy], eval_split: test,"
        " dev_split: dev, data_files: {train: train.csv, dev: dev.csv, test: test.csv}}\n"
        "methods: [linear_probe]\n"
    )
    (task,) = load_suite(suite).tasks
    train, dev = data.train_and_dev(task, None)
    assert len(train) == 6 and list(dev["text"]) == ["dev 0", "dev 1", "dev 2"]


def frame(rows) -> pd.DataFrame:
    """Rows of (label, point, seed, dev score, eval score) of one entry `lora` on one task."""
    return pd.DataFrame(
        [
            {
                "suite": "s",
                "task": "t",
                "entry": "lora",
                "method": label,
                "point": json.dumps(point),
                "seed": seed,
                "status": "ok",
                "dev_metric": dev,
                "metric": test,
                "higher_is_better": True,
            }
            for label, point, seed, dev, test in rows
        ]
    )


def test_selection_takes_the_best_mean_dev_score_over_seeds_and_never_the_eval_score():
    rows = [  # lr=1e-3 is best on eval, lr=3e-4 on mean dev; one seed of lr=1e-4 is best on dev alone
        ("lora@lr=0.0001", {"lr": 1e-4}, 0, 0.90, 0.70),
        ("lora@lr=0.0001", {"lr": 1e-4}, 1, 0.50, 0.70),
        ("lora@lr=0.0003", {"lr": 3e-4}, 0, 0.80, 0.75),
        ("lora@lr=0.0003", {"lr": 3e-4}, 1, 0.80, 0.75),
        ("lora@lr=0.001", {"lr": 1e-3}, 0, 0.60, 0.95),
        ("lora@lr=0.001", {"lr": 1e-3}, 1, 0.60, 0.95),
    ]
    marked = selection.mark(frame(rows))
    assert set(marked.loc[marked["selected"], "method"]) == {"lora@lr=0.0003"}
    assert marked.loc[marked["selected"], "grid_edge"].tolist() == ["", ""]  # the middle of its grid


def test_selection_follows_the_metrics_direction_and_flags_a_point_at_the_edge_of_its_grid():
    rows = [
        ("lora@lr=0.0001", {"lr": 1e-4}, 0, 2.0, 0.0),
        ("lora@lr=0.0003", {"lr": 3e-4}, 0, 1.0, 0.0),
        ("lora@lr=0.001", {"lr": 1e-3}, 0, 0.5, 9.0),
    ]
    lower = frame(rows).assign(higher_is_better=False)  # e.g. perplexity
    marked = selection.mark(lower)
    assert marked.loc[marked["selected"], "method"].tolist() == ["lora@lr=0.001"]
    assert marked.loc[marked["selected"], "grid_edge"].tolist() == ["lr"]


def test_a_failed_point_is_not_selected_and_an_unswept_entry_is_its_own_selection():
    rows = [("lora@lr=0.0001", {"lr": 1e-4}, 0, 0.99, 0.0), ("lora@lr=0.001", {"lr": 1e-3}, 0, 0.5, 0.0)]
    failed = frame(rows)
    failed.loc[0, "status"] = "failed"
    marked = selection.mark(failed)
    assert marked.loc[marked["selected"], "method"].tolist() == ["lora@lr=0.001"]
    single = selection.mark(frame([("lora", {}, 0, None, 0.5), ("lora", {}, 1, None, 0.6)]))
    assert single["selected"].all()


def test_a_swept_suite_runs_scores_dev_and_eval_and_selects_by_dev(tmp_path, tiny_suite, data_dir):
    path = tiny_suite(
        "tasks: [{task: sst2, dev_size: 16}, stsb]\n"
        "methods:\n  - {method: bitfit, sweep: {lr: [1.0e-4, 1.0e-2]}}\n  - {method: linear_probe, lr: 1.0e-3}\n"
        "seeds: [0, 1]\n"
        "train: {max_steps: 3, batch_size: 8, max_seq_length: 32, max_train_samples: 32, max_eval_samples: 24,"
        " timing_warmup_steps: 0}\n"
    )
    records = runner.run_suite(load_suite(path), tmp_path / "out", data_dir, device="cpu", log=lambda *_: None)
    assert len(records) == 2 * 3 * 2 and all(r["status"] == "ok" for r in records)
    for r in records:
        assert r["dev_metrics"] and r["metrics"]
        assert r["train"]["dev_examples"] == (
            16 if r["cell"]["task"]["name"] == "sst2" else 24
        )  # max_eval_samples caps it
        predicted, reference = r["predictions"]["predictions"]
        assert len(predicted) == len(reference) == 24
    loaded = results.load(tmp_path / "out")
    for task in ("sst2", "stsb"):
        bitfit = loaded[(loaded["task"] == task) & (loaded["entry"] == "bitfit")]
        mean_dev = bitfit.groupby("method")["dev_metric"].mean()
        assert set(bitfit.loc[bitfit["selected"], "method"]) == {mean_dev.idxmax()}
        assert bitfit["selected"].sum() == 2  # both seeds of the point
        assert loaded[(loaded["task"] == task) & (loaded["entry"] == "linear_probe")]["selected"].all()
    # the report's tables show each entry once, at its selected point, and the sweep section shows every point
    report.write_report(tmp_path / "out", tmp_path / "report")
    summary = summarize(tmp_path / "out")
    assert sorted(summary.per_task["method"]) == ["bitfit", "bitfit", "linear_probe", "linear_probe"]
    for row in summary.per_task[summary.per_task["method"] == "bitfit"].to_dict("records"):
        chosen = loaded[(loaded["task"] == row["task"]) & (loaded["entry"] == "bitfit") & loaded["selected"]]
        assert row["chosen"] == chosen["method"].iloc[0].partition("@")[2]
        assert row["metric_mean"] == pytest.approx(chosen["metric"].mean())
    assert len(summary.sweeps) == 2 * 2 and summary.sweeps["selected"].sum() == 2
    assert len(summary.paired) == 2 * 2 and summary.paired["best"].sum() == 2  # each task's two entries, one best
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "### Sweeps: selection on dev data" in markdown and "(sweeps.png)" in markdown
    assert "### Paired comparison with the best" in markdown
    assert (tmp_path / "report" / "sweeps.png").stat().st_size > 0
    assert "selected point" in (tmp_path / "report" / "report.html").read_text()


def test_the_paired_bootstrap_tells_a_clearly_worse_method_from_the_best_and_not_a_near_twin():
    rng = np.random.default_rng(0)
    reference = rng.integers(0, 2, 400)
    wrong = rng.random(400) < 0.3
    outputs = {
        "best": reference,  # always right
        "twin": np.where(np.arange(400) == 7, 1 - reference, reference),  # wrong on one example
        "worse": np.where(wrong, 1 - reference, reference),  # wrong on about 30%
    }
    cells = pd.DataFrame(
        [
            {"task": "t", "method": m, "status": "ok", "metric_name": "accuracy", "path": m}
            for m in ("worse", "twin", "best")
        ]
    )
    records = {m: {"predictions": {"predictions": [p.tolist(), reference.tolist()]}} for m, p in outputs.items()}
    table = significance.paired_comparison(cells, records).set_index("method")
    assert list(table.index) == ["best", "twin", "worse"] and table.loc["best", "best"]
    worse = table.loc["worse"]
    assert worse["difference"] == pytest.approx(-wrong.mean())
    assert worse["low"] < -wrong.mean() < worse["high"] < 0 and worse["distinguishable"]
    twin = table.loc["twin"]
    assert twin["difference"] == pytest.approx(-1 / 400) and twin["low"] <= 0 <= twin["high"]
    assert not twin["distinguishable"]


def test_the_tables_show_an_entry_at_its_selected_point_or_every_point_when_none_could_be_selected():
    rows = frame([("lora@lr=0.0001", {"lr": 1e-4}, 0, None, 0.1), ("lora@lr=0.001", {"lr": 1e-3}, 0, None, 0.2)])
    scored = frame([("b@lr=0.0001", {"lr": 1e-4}, 0, 0.1, 0.1), ("b@lr=0.001", {"lr": 1e-3}, 0, 0.2, 0.2)])
    chosen = selected_points(selection.mark(pd.concat([rows, scored.assign(entry="b")], ignore_index=True)))
    assert sorted(zip(chosen["method"], chosen["point_label"])) == [
        ("b", "b@lr=0.001"),
        ("lora@lr=0.0001", "lora@lr=0.0001"),  # a plan, or evaluate: false: no dev score to select by
        ("lora@lr=0.001", "lora@lr=0.001"),
    ]


def test_regression_targets_are_learned_standardised_by_the_training_examples(data_dir):
    from transformers import AutoTokenizer

    from harness import backbone

    task = BUILTIN_TASKS["stsb"]
    train, dev = data.train_and_dev(task, data_dir)
    scale = data.TargetScale.of(task, train)
    assert scale.mean == pytest.approx(train["label"].mean()) and scale.std == pytest.approx(train["label"].std(ddof=0))
    tokenizer = AutoTokenizer.from_pretrained(backbone.resolve(backbone.Backbone()))
    learned = data.examples(task, train, tokenizer, 32, scale).labels
    assert abs(learned.mean()) < 1e-5 and learned.std() == pytest.approx(1.0, abs=1e-5)
    assert np.allclose(data.examples(task, dev, tokenizer, 32).labels, dev["label"])  # scored as they are
    assert data.TargetScale.of(BUILTIN_TASKS["sst2"], train) is None  # classification labels stay class ids
