"""The runner end to end on a tiny backbone: records, resume, determinism, results API."""

import json

import numpy as np
import pandas as pd
import pytest

from harness import results
from harness.cli import main

BODY = """
tasks: [sst2, stsb]
methods:
  - {method: full, lr: 1.0e-3}
  - {method: linear_probe, lr: 1.0e-2}
train: {max_steps: 4, batch_size: 8, max_train_samples: 64, max_eval_samples: 32, max_seq_length: 32,
        timing_warmup_steps: 1}
"""


def run(suite, out, data_dir, *extra):
    return main(["run", str(suite), "--out", str(out), "--data-dir", str(data_dir), "--no-report", *extra])


def test_run_writes_one_complete_record_per_cell(tiny_suite, tmp_path, data_dir):
    out = tmp_path / "out"
    assert run(tiny_suite(BODY), out, data_dir) == 0
    files = sorted(p.name for p in out.glob("*.json"))
    assert files == [
        "sst2__full__seed0.json",
        "sst2__linear_probe__seed0.json",
        "stsb__full__seed0.json",
        "stsb__linear_probe__seed0.json",
    ]
    record = json.loads((out / "sst2__full__seed0.json").read_text())
    assert record["status"] == "ok"
    assert record["cell"]["train"]["max_steps"] == 4 and record["train"]["steps"] == 4
    assert set(record["env"]["packages"]) >= {"torch", "transformers", "peft"} and "device" in record["env"]
    assert "git_commit" in record["env"] and record["config_hash"]
    assert record["params"]["trainable"] == record["params"]["total"] == record["params"]["declared_trainable"]

    frame = results.load(out)
    assert len(frame) == 4 and set(results.CORE_COLUMNS) <= set(frame.columns)
    assert set(frame["metric_name"]) == {"accuracy", "pearson"}
    probe = frame[(frame.task == "sst2") & (frame.method == "linear_probe")].iloc[0]
    assert probe.trainable_params == 32 * 2 + 2 and probe.status == "ok" and probe.train_seconds > 0


def test_a_cell_survives_its_trip_through_a_record(tiny_suite):
    """The worker rebuilds the cell from the job's dict: every setting, the hash and the key come back."""
    from harness.config import Cell, load_suite

    body = BODY.replace(
        "{method: full, lr: 1.0e-3}",
        "{stack: [{method: lora, hparams: {r: 4}}, {method: mesa}], lr: 3.0e-4, train: {batch_size: 4}}",
    )
    for cell in load_suite(tiny_suite(body)).cells():
        back = Cell.from_dict(json.loads(json.dumps(cell.to_dict())))
        assert back.to_dict() == cell.to_dict() and back.config_hash() == cell.config_hash() and back.key == cell.key
        assert back.task == cell.task and back.train == cell.train


def test_a_plugin_entry_is_labelled_by_its_class_name(tiny_suite, tmp_path):
    from harness.config import load_suite

    plugin = tmp_path / "plugins" / "head_only.py"
    plugin.parent.mkdir()
    plugin.write_text(
        "from methods.linear_probe import LinearProbe\n\nclass HeadOnly(LinearProbe):\n    name = 'head_only'\n"
    )
    body = BODY.replace(
        "{method: full, lr: 1.0e-3}",
        f"{{method: '{plugin}:HeadOnly'}}\n  - {{stack: [{{method: '{plugin}:HeadOnly'}}, {{method: mesa}}]}}",
    )
    labels = [cell.entry.label for cell in load_suite(tiny_suite(body)).cells() if cell.task.name == "sst2"]
    assert labels == ["head_only", "head_only+mesa", "linear_probe"]


def test_rerun_skips_finished_cells_and_fresh_reruns_all(tiny_suite, tmp_path, data_dir, capsys):
    out = tmp_path / "out"
    suite = tiny_suite(BODY)
    assert run(suite, out, data_dir) == 0
    kept = out / "sst2__full__seed0.json"
    stamp = kept.stat().st_mtime_ns
    (out / "stsb__linear_probe__seed0.json").unlink()
    capsys.readouterr()
    assert run(suite, out, data_dir) == 0
    log = capsys.readouterr().out
    assert log.count("already done") == 3 and "stsb / linear_probe / seed 0: ok" in log
    assert kept.stat().st_mtime_ns == stamp, "a finished record is not rewritten"

    changed = tiny_suite(BODY.replace("max_steps: 4", "max_steps: 3"))  # new config: every cell is new work
    assert run(changed, out, data_dir) == 0
    assert "already done" not in capsys.readouterr().out
    assert run(changed, out, data_dir, "--fresh") == 0
    assert "already done" not in capsys.readouterr().out


def test_same_seed_same_result(tiny_suite, tmp_path, data_dir):
    suite = tiny_suite(BODY.replace("[sst2, stsb]", "[sst2]"))
    first, second = tmp_path / "a", tmp_path / "b"
    assert run(suite, first, data_dir) == 0 and run(suite, second, data_dir) == 0
    for name in ["sst2__full__seed0.json", "sst2__linear_probe__seed0.json"]:
        a, b = (json.loads((d / name).read_text()) for d in (first, second))
        assert a["train"]["losses"] == b["train"]["losses"]
        assert a["metrics"] == b["metrics"]
        assert a["measurements"]["activation_bytes"] == b["measurements"]["activation_bytes"]


def test_a_memory_only_cell_has_figures_but_no_metric(tiny_suite, tmp_path, data_dir):
    """`evaluate: false` (e.g. the fixed-length rows of suites/metl_memory.yaml): trained and metered, not
    evaluated; the results, the report and the gate take it as a cell without a score, not as a failure."""
    out = tmp_path / "out"
    body = BODY.replace("tasks: [sst2, stsb]", "tasks: [sst2]").replace(
        "{method: linear_probe, lr: 1.0e-2}", "{method: linear_probe, lr: 1.0e-2, train: {evaluate: false}}"
    )
    assert run(tiny_suite(body), out, data_dir) == 0
    record = json.loads((out / "sst2__linear_probe__seed0.json").read_text())
    assert record["status"] == "ok" and record["metrics"] == {} and record["train"]["steps"] == 4
    assert record["measurements"]["modelled_peak_bytes"] > 0 and "eval_seconds" not in record["measurements"]
    frame = results.load(out).set_index("method")
    assert frame.loc["linear_probe", "status"] == "ok" and frame.isna().loc["linear_probe", "metric"]
    # the full cell was evaluated on max_eval_samples=32 examples: its accuracy is some k/32 with 0 <= k <= 32
    # (a NaN, a score over another number of examples, or one outside [0, 1] fails)
    correct = frame.loc["full", "metric"] * 32
    assert (
        frame.loc["full", "metric_name"] == "accuracy"
        and 0 <= correct <= 32
        and correct == pytest.approx(round(correct))
    )
    assert main(["report", str(out), "--out", str(tmp_path / "report")]) == 0
    assert "linear\\_probe | baseline | ok | —" in (tmp_path / "report" / "report.md").read_text(), (
        "no score, not a failure"
    )
    assert main(["compare", str(out), str(out)]) == 0


def test_recorded_metrics_are_those_of_the_predictions(tiny_suite, data_dir, monkeypatch):
    """In this process, with the evaluation's output kept: the references are the validation file's labels in
    order, and each recorded metric is what its definition gives on those predictions, computed here by hand."""
    from harness import worker
    from harness.config import load_suite

    body = BODY.replace("{method: full, lr: 1.0e-3}\n  - ", "").replace(" max_eval_samples: 32,", "")
    cells = load_suite(tiny_suite(body)).cells()
    outputs = []
    real_predict = worker.predict

    def keep(*args, **kwargs):
        outputs.append(real_predict(*args, **kwargs))
        return outputs[-1]

    monkeypatch.setattr(worker, "predict", keep)
    records = {cell.task.name: worker.run_cell(cell, data_dir, "cpu", progress=False) for cell in cells}
    assert [r["status"] for r in records.values()] == ["ok", "ok"], [r.get("error") for r in records.values()]
    _, (sst2, n), _, (stsb, _) = outputs  # each cell scores its dev data, then the eval split
    (sst2_pred, sst2_ref), (stsb_pred, stsb_ref) = sst2["predictions"], stsb["predictions"]
    assert records["sst2"]["predictions"]["predictions"] == [sst2_pred.tolist(), sst2_ref.tolist()]

    labels = pd.read_parquet(data_dir / "glue" / "sst2" / "validation.parquet")["label"].to_numpy()
    assert n == len(labels) and np.array_equal(sst2_ref, labels)
    assert set(np.unique(sst2_pred)) <= {0, 1}
    assert records["sst2"]["metrics"]["accuracy"]["value"] == pytest.approx(np.mean(sst2_pred == labels))

    scores = pd.read_parquet(data_dir / "glue" / "stsb" / "validation.parquet")["label"].to_numpy()
    assert np.allclose(stsb_ref, scores)

    def pearson(x, y):
        dx, dy = x - x.mean(), y - y.mean()
        return (dx * dy).sum() / np.sqrt((dx**2).sum() * (dy**2).sum())

    metrics = records["stsb"]["metrics"]
    assert np.std(stsb_pred) > 0, "a constant prediction would make both correlations 0 and prove nothing"
    # trained on standardised targets, predicting in the targets' own units (a fresh head outputs about 0)
    scale = records["stsb"]["train"]["target_scale"]
    assert scale["std"] > 0 and abs(stsb_pred.mean() - scale["mean"]) < scale["std"]
    assert metrics["pearson"]["value"] == pytest.approx(
        pearson(stsb_pred.astype(float), scores.astype(float)), abs=1e-6
    )
    ranks = lambda v: pd.Series(v).rank(method="average").to_numpy()
    assert metrics["spearman"]["value"] == pytest.approx(pearson(ranks(stsb_pred), ranks(scores)), abs=1e-6)
