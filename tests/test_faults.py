"""Faults inside a run, with real processes and real signals: each is recorded,
the suite goes on, nothing finished is lost, and a rerun completes exactly what
is missing."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from harness import results
from harness.cli import main
from harness.runner import lock_path

SETTINGS = (
    "train: {max_steps: 3, batch_size: 8, max_train_samples: 32, max_eval_samples: 16, max_seq_length: 32,\n"
    "        timing_warmup_steps: 1}\n"
)

# A plugin method that misbehaves on request, so a fault lands exactly where a test wants it.
PLUGIN = '''
import os, signal, time
import torch
from methods.full_finetune import FullFineTune

class Misbehave(FullFineTune):
    name = "test_misbehave"
    defaults = {"fault": "none", "seconds": 0.0, "marker": ""}

    def apply(self, model, task):
        fault = self.hparams["fault"]
        if fault == "raise":
            raise RuntimeError("boom in apply")
        if fault == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        if fault == "sleep":  # a run started with TEST_FAULT_SLEEP sleeps that long, else `seconds` (a fork server
            # already warm in this process would not see the variable set later)
            time.sleep(float(os.environ.get("TEST_FAULT_SLEEP", self.hparams["seconds"])))
        model = super().apply(model, task)
        if fault == "sleep_in_training" and os.environ.get("TEST_FAULT_MARKER"):
            def say_so_then_sleep(module):
                open(os.environ["TEST_FAULT_MARKER"] + self.hparams["marker"], "w").close()
                time.sleep(float(os.environ["TEST_FAULT_SLEEP"]))
            on_forward(model, 2, say_so_then_sleep)
        if fault == "hog":  # asks for 16 GiB of host memory (untouched, so harmless if granted)
            on_forward(model, 3, lambda module: setattr(module, "hogged", torch.empty(16 * 2**30, dtype=torch.uint8)))
        return model


def on_forward(model, n, action):
    """Run action(model) at the start of the model's n-th forward pass."""
    calls = []
    def hook(module, args):
        calls.append(1)
        if len(calls) == n:
            action(module)
    model.register_forward_pre_hook(hook)
'''


def suite_with(tiny_suite, tmp_path, methods: str, name="faults"):
    (tmp_path / "misbehave.py").write_text(PLUGIN)
    plugin = tmp_path / "misbehave.py"
    return tiny_suite(f"tasks: [sst2]\nmethods:\n{methods.replace('PLUGIN', str(plugin))}\n{SETTINGS}", name)


def record(out, label):
    return json.loads((out / f"sst2__{label}__seed0.json").read_text())


def run_command(suite, out, data_dir, *extra) -> list[str]:
    """`harness run` as a user types it, for a process of its own."""
    return [
        sys.executable,
        "-m",
        "harness",
        "run",
        str(suite),
        "--out",
        str(out),
        "--data-dir",
        str(data_dir),
        "--no-report",
        *extra,
    ]


def start(suite, out, data_dir, *extra, **env):
    """The CLI as a user runs it, in its own process group (as a terminal's foreground job)."""
    return subprocess.Popen(
        run_command(suite, out, data_dir, *extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, **env},
        preexec_fn=_default_sigint,
    )


def _default_sigint():
    """A terminal's foreground job takes Ctrl-C; a job started in the background (`cmd &`) inherits SIGINT
    ignored, and so would this test's child, whatever the harness does."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for(path, proc, seconds=900):
    deadline = time.time() + seconds
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.2)


def test_crash_diverged_and_timeout_are_recorded_and_the_suite_goes_on(tiny_suite, tmp_path, data_dir):
    suite = suite_with(
        tiny_suite,
        tmp_path,
        """
  - {method: PLUGIN, label: crash, hparams: {fault: raise}}
  - {method: PLUGIN, label: killed, hparams: {fault: sigkill}}
  - {method: full, label: diverge, lr: 1.0e+30, train: {max_grad_norm: null}}
  - {method: PLUGIN, label: slow, hparams: {fault: sleep, seconds: 60.0}, train: {time_limit_s: 1.0}}
  - {method: PLUGIN, label: hog, hparams: {fault: hog}, train: {host_memory_limit_gb: 8}}
  - {method: full, label: fine}""",
    )
    out = tmp_path / "out"
    assert main(["run", str(suite), "--out", str(out), "--data-dir", str(data_dir), "--no-report"]) == 1
    crash = record(out, "crash")
    assert crash["status"] == "failed" and "boom in apply" in crash["error"]["message"]
    assert "RuntimeError" in crash["error"]["traceback_tail"]
    killed = record(out, "killed")
    assert killed["status"] == "failed" and "SIGKILL" in killed["error"]["message"]
    # The runner's record of a killed cell is built like the worker's: every section, and what produced it.
    assert set(killed) == set(record(out, "fine"))
    assert killed["method_info"] == crash["method_info"] and killed["method_info"][0]["name"] == "test_misbehave"
    diverged = record(out, "diverge")
    assert diverged["status"] == "diverged" and "loss is" in diverged["error"]["message"]
    assert diverged["train"] == {} and diverged["measurements"]["activation_bytes"] > 0, (
        "figures known up to then are kept"
    )
    assert record(out, "slow")["status"] == "timeout"
    hog = record(out, "hog")
    assert hog["status"] == "oom" and "allocate" in hog["error"]["message"], hog["error"]
    assert hog["measurements"]["activation_bytes"] > 0, "figures known up to then are kept"
    assert record(out, "fine")["status"] == "ok"
    frame = results.load(out)
    assert sorted(frame.status) == ["diverged", "failed", "failed", "ok", "oom", "timeout"]


@pytest.mark.parametrize("stop", ["ctrl_c", "sigterm"])
def test_ctrl_c_keeps_finished_cells_and_rerun_resumes(stop, tiny_suite, tmp_path, data_dir):
    """Ctrl-C reaches every process of the terminal's group; SIGTERM (`kill`, a CI job cancelled) the run alone."""
    suite = suite_with(
        tiny_suite,
        tmp_path,
        """
  - {method: full, label: first}
  - {method: PLUGIN, label: second, hparams: {fault: sleep_in_training}}
  - {method: full, label: third}""",
    )
    out, training = tmp_path / "out", tmp_path / "second-is-training"
    proc = start(suite, out, data_dir, TEST_FAULT_SLEEP="120", TEST_FAULT_MARKER=str(training))
    wait_for(training, proc)  # the second cell is under way, asleep in its second step
    if stop == "ctrl_c":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.terminate()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err
    assert "leaked" not in err, err  # a cell's process stopped mid-training leaves nothing behind
    assert record(out, "first")["status"] == "ok"
    assert record(out, "second")["status"] == "interrupted"
    assert not (out / "sst2__third__seed0.json").exists()
    first_written = (out / "sst2__first__seed0.json").stat().st_mtime_ns

    rerun = subprocess.run(
        run_command(suite, out, data_dir),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rerun.returncode == 0, rerun.stderr
    assert "first / seed 0: already done" in rerun.stdout
    assert {r["cell"]["label"]: r["status"] for r in results.scan(out).records} == {
        "first": "ok",
        "second": "ok",
        "third": "ok",
    }
    assert (out / "sst2__first__seed0.json").stat().st_mtime_ns == first_written


def test_sigkill_of_the_whole_run_loses_only_the_cell_under_way(tiny_suite, tmp_path, data_dir):
    suite = suite_with(
        tiny_suite,
        tmp_path,
        """
  - {method: full, label: first}
  - {method: PLUGIN, label: second, hparams: {fault: sleep}}""",
    )
    out = tmp_path / "out"
    proc = start(suite, out, data_dir, TEST_FAULT_SLEEP="120")
    wait_for(out / "sst2__first__seed0.json", proc)
    time.sleep(3)
    os.killpg(proc.pid, signal.SIGKILL)  # runner, fork server and worker, with no chance to clean up
    proc.wait(timeout=30)
    assert [p.name for p in out.glob("*.json")] == ["sst2__first__seed0.json"]

    assert main(["run", str(suite), "--out", str(out), "--data-dir", str(data_dir), "--no-report"]) == 0
    names = sorted(p.name for p in out.glob("*.json"))
    assert names == ["sst2__first__seed0.json", "sst2__second__seed0.json"], "exactly the missing cell, no duplicates"
    assert not list(out.glob(".*.tmp")), "no half-written file is left behind"


def test_second_run_on_the_same_results_is_refused(tiny_suite, tmp_path, glue_like_data, capsys):
    """A configuration error: the cell sleeps in `apply`, before any training, so made-up data will do."""
    suite = suite_with(tiny_suite, tmp_path, "  - {method: PLUGIN, label: slow, hparams: {fault: sleep}}")
    out = tmp_path / "out"
    proc = start(suite, out, glue_like_data, TEST_FAULT_SLEEP="30")
    try:
        lock = lock_path(out)
        deadline = time.time() + 900
        while str(proc.pid) not in (lock.read_text() if lock.exists() else ""):
            assert time.time() < deadline and proc.poll() is None
            time.sleep(0.2)
        shutil.rmtree(out)  # the lock lives outside the folder: deleting it does not let a second run in
        assert main(["run", str(suite), "--out", str(out), "--data-dir", str(glue_like_data), "--no-report"]) == 2
        err = capsys.readouterr().err
        assert "in use by pid" in err and len(err.strip().splitlines()) == 1
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_corrupt_record_is_reported_and_rerun(tiny_suite, tmp_path, data_dir, capsys):
    suite = suite_with(tiny_suite, tmp_path, "  - {method: full, label: only}")
    out = tmp_path / "out"
    assert main(["run", str(suite), "--out", str(out), "--data-dir", str(data_dir), "--no-report"]) == 0
    path = out / "sst2__only__seed0.json"
    path.write_text(path.read_text()[:200])  # truncated, as by a full disk
    assert results.scan(out).broken and not results.scan(out).records
    capsys.readouterr()
    assert main(["run", str(suite), "--out", str(out), "--data-dir", str(data_dir), "--no-report"]) == 0
    assert "corrupt record, rerunning" in capsys.readouterr().out
    assert results.read_record(path)["status"] == "ok"
