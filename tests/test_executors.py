"""Several cells at once on one machine (`--jobs N`): each in its own process with its own share of the machine,
the same records as one cell at a time, a log per cell beside its record, and one progress line over the grid."""

import os
import re
import signal

import pytest

from harness import executors, results, worker
from harness.cli import main
from harness.errors import UserError
from harness.meter import EXACT_FIGURES
from tests.test_faults import record, start, suite_with, wait_for

GRID = (
    "tasks: [sst2, stsb]\nmethods: [{method: full}, {method: lora, lr: 1.0e-3}]\nseeds: [0]\n"
    "train: {max_steps: 3, batch_size: 4, max_seq_length: 32, max_train_samples: 16, max_eval_samples: 16}\n"
)


def run(suite, out, data_dir, *extra) -> int:
    return main(["run", str(suite), "--out", str(out), "--data-dir", str(data_dir), "--no-report", *extra])


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="two jobs need two cores")
def test_two_jobs_give_the_records_of_one_at_a_time(tiny_suite, tmp_path, data_dir, capsys):
    suite = tiny_suite(GRID)
    assert run(suite, tmp_path / "one", data_dir) == 0
    capsys.readouterr()
    assert run(suite, tmp_path / "two", data_dir, "--jobs", "2") == 0
    out = capsys.readouterr().out
    one, two = (
        {r["cell"]["label"] + r["cell"]["task"]["name"]: r for r in results.scan(tmp_path / d).records}
        for d in ("one", "two")
    )
    assert sorted(one) == sorted(two) and len(two) == 4
    cores = len(os.sched_getaffinity(0))
    for key, alone in one.items():
        beside = two[key]
        assert beside["status"] == alone["status"] == "ok"
        for figure in EXACT_FIGURES:
            assert beside["measurements"].get(figure) == alone["measurements"].get(figure), (key, figure)
        assert beside["params"] == alone["params"]
        for name, metric in alone["metrics"].items():  # other thread counts sum in other orders
            assert beside["metrics"][name]["value"] == pytest.approx(metric["value"], abs=1e-3), (key, name)
        assert f"{cores // 2} threads" in beside["env"]["device"] and f"{cores} threads" in alone["env"]["device"]
    assert sorted(p.name for p in (tmp_path / "two").glob("*.log")) == sorted(
        p.with_suffix(".log").name for p in (tmp_path / "two").glob("*.json")
    )
    states = re.findall(r"\[(\d)/4 done, (\d) running, (\d) left, \S+ elapsed(?:, ~\S+ to go)?\]", out)
    assert [int(done) for done, _, _ in states] == [1, 2, 3, 4], out
    assert all(int(d) + int(r) + int(left) == 4 for d, r, left in states)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="two jobs need two cores")
def test_cells_run_side_by_side_and_ctrl_c_records_each_running_one(tiny_suite, tmp_path, data_dir):
    suite = suite_with(
        tiny_suite,
        tmp_path,
        """
  - {method: PLUGIN, label: left, hparams: {fault: sleep_in_training, marker: left}}
  - {method: PLUGIN, label: right, hparams: {fault: sleep_in_training, marker: right}}
  - {method: full, label: third}""",
    )
    out, marker = tmp_path / "out", tmp_path / "training-"
    proc = start(suite, out, data_dir, "--jobs", "2", TEST_FAULT_SLEEP="120", TEST_FAULT_MARKER=str(marker))
    wait_for(tmp_path / "training-left", proc)
    wait_for(tmp_path / "training-right", proc)  # both asleep in training at once
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert record(out, "left")["status"] == record(out, "right")["status"] == "interrupted"
    assert not (out / "sst2__third__seed0.json").exists()
    assert (out / "sst2__left__seed0.log").exists()


def test_jobs_beyond_the_machine_are_refused_before_anything_runs(tiny_suite, tmp_path, data_dir, capsys):
    cores = len(os.sched_getaffinity(0))
    assert run(tiny_suite(GRID), tmp_path / "out", data_dir, "--jobs", str(cores + 1), "--device", "cpu") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"on {cores} CPU cores" in err
    assert not list((tmp_path / "out").glob("*.json"))


def test_on_cuda_each_job_gets_one_gpu_of_those_visible(monkeypatch):
    import torch

    monkeypatch.setattr(worker, "pick_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert executors.slots("cuda", 2) == [{"visible_devices": "0"}, {"visible_devices": "1"}]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    assert executors.slots("auto", 2) == [{"visible_devices": "5"}, {"visible_devices": "7"}]
    with pytest.raises(UserError, match="need 3 GPUs, one each, and this machine has 2"):
        executors.slots("cuda", 3)
    assert executors.slots("cuda", 1) == [{}]  # one job: the machine as the process finds it
