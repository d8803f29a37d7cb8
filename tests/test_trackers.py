"""`--track`: each cell run also lands as a run of MLflow or TensorBoard, read back here through their own
readers: the settings as parameters, loss and learning rate per step, the metrics and the measured figures."""

import sys

import pytest

from harness import results
from harness.cli import main

GRID = (
    "tasks: [sst2]\nmethods: [{method: full, lr: 1.0e-3}, {method: bitfit, lr: 1.0e-2}]\nseeds: [0]\n"
    "train: {max_steps: 5, batch_size: 4, max_seq_length: 32, max_train_samples: 20, max_eval_samples: 16,"
    " warmup_ratio: 0.4}\n"
)


def run(tiny_suite, tmp_path, data_dir, kind) -> dict:
    out = tmp_path / "results" / "tiny"
    argv = ["run", str(tiny_suite(GRID)), "--out", str(out), "--data-dir", str(data_dir), "--no-report"]
    assert main([*argv, "--track", kind]) == 0
    return {f"sst2/{r['cell']['label']}/seed0": r for r in results.scan(out).records}


def test_each_cell_is_an_mlflow_run_of_the_suite_s_experiment(tiny_suite, tmp_path, data_dir, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    records = run(tiny_suite, tmp_path, data_dir, "mlflow")
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}")  # the default: beside the results
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert sorted(r.info.run_name for r in runs) == sorted(records)
    for tracked in runs:
        record = records[tracked.info.run_name]
        assert tracked.data.params["lr"] == str(record["cell"]["lr"])
        assert tracked.data.params["train.batch_size"] == "4" and tracked.data.tags["status"] == "ok"
        assert tracked.data.metrics["eval/accuracy"] == record["metrics"]["accuracy"]["value"]
        assert tracked.data.metrics["dev/accuracy"] == record["dev_metrics"]["accuracy"]["value"]
        m = record["measurements"]
        assert tracked.data.metrics["measurements/activation_bytes"] == m["activation_bytes"]
        assert tracked.data.metrics["params/trainable"] == record["params"]["trainable"]
        losses = client.get_metric_history(tracked.info.run_id, "train/loss")
        assert [x.value for x in sorted(losses, key=lambda x: x.step)] == record["train"]["losses"]
        rates = [
            x.value for x in sorted(client.get_metric_history(tracked.info.run_id, "train/lr"), key=lambda x: x.step)
        ]
        lr = record["cell"]["lr"]  # 5 steps, 2 of warm-up: the schedule of harness.train
        assert rates == pytest.approx([lr / 2, lr, lr, 2 * lr / 3, lr / 3])


def test_each_cell_is_a_tensorboard_run_in_the_suite_s_folder(tiny_suite, tmp_path, data_dir):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = run(tiny_suite, tmp_path, data_dir, "tensorboard")
    for name, record in records.items():
        events = EventAccumulator(str(tmp_path / "results" / "tensorboard" / "tiny" / name))
        events.Reload()
        losses = [e.value for e in events.Scalars("train/loss")]
        assert losses == pytest.approx(record["train"]["losses"], rel=1e-6)  # stored as float32
        assert events.Scalars("eval/accuracy")[0].value == pytest.approx(record["metrics"]["accuracy"]["value"])
        activations = events.Scalars("measurements/activation_bytes")[0].value
        assert activations == pytest.approx(record["measurements"]["activation_bytes"], rel=1e-6)
        assert "settings" in str(events.Tags()["tensors"])


@pytest.mark.parametrize("kind, module", [("mlflow", "mlflow"), ("tensorboard", "torch.utils.tensorboard")])
def test_a_tracker_not_installed_stops_the_run_before_any_cell(kind, module, tiny_suite, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if the package were missing
    out = tmp_path / "out"
    assert main(["run", str(tiny_suite(GRID)), "--out", str(out), "--track", kind, "--no-report"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--track {kind}" in err and "not installed" in err
    assert not list(out.glob("*.json"))


def test_a_tracking_store_out_of_reach_stops_the_run_before_any_cell(tiny_suite, tmp_path, monkeypatch, capsys):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # the discard port: nothing answers
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    out = tmp_path / "out"
    assert main(["run", str(tiny_suite(GRID)), "--out", str(out), "--track", "mlflow", "--no-report"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot use the tracking store http://127.0.0.1:9" in err
    assert not list(out.glob("*.json"))
