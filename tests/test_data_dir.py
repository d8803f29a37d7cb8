"""The data directory is resolved once, when a command starts, against the directory it started in.

README's set-up line writes it relative (`HARNESS_DATA_DIR=../shared/data`); whatever changes directory
later (a test, a worker process) must still see the same absolute folder.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

from harness import data
from harness.cli import main


def test_a_relative_value_is_made_absolute_against_the_current_directory(data_dir, tmp_path, monkeypatch):
    start = tmp_path / "a" / "b"
    start.mkdir(parents=True)
    monkeypatch.chdir(start)
    relative = os.path.relpath(data_dir, start)
    assert not Path(relative).is_absolute()
    monkeypatch.setenv(data.DATA_DIR_ENV, relative)
    assert data.resolve_data_dir(None) == data_dir
    assert data.resolve_data_dir(relative) == data_dir  # the flag the same way
    monkeypatch.setenv(data.DATA_DIR_ENV, "no/such/folder")
    assert data.resolve_data_dir(relative) == data_dir, "--data-dir wins over the variable"


def test_the_cli_resolves_once_and_passes_the_absolute_path_on(data_dir, tmp_path, monkeypatch, tiny_suite):
    """What the runner receives is absolute, whatever the working directory is by the time it reads it."""
    from harness import runner
    seen = []
    monkeypatch.setattr(runner, "preflight", lambda suite, folder: seen.append(folder))
    start = tmp_path / "start"
    start.mkdir()
    monkeypatch.chdir(start)
    monkeypatch.setenv(data.DATA_DIR_ENV, os.path.relpath(data_dir, start))
    assert main(["validate", str(tiny_suite("tasks: [sst2]\nmethods: [linear_probe]\n"))]) == 0
    assert seen == [data_dir] and seen[0].is_absolute()


def test_a_relative_data_dir_works_from_a_process_started_elsewhere(data_dir, tmp_path, tiny_suite):
    """The README's form, in a real process whose working directory is neither the checkout nor the data's parent:
    validate and a one-cell run (the cell's worker process reads the data too) both find it."""
    suite = tiny_suite("tasks: [sst2]\nmethods: [{method: linear_probe, lr: 1.0e-2}]\n"
                       "train: {max_steps: 2, batch_size: 8, max_train_samples: 16, max_eval_samples: 16, "
                       "max_seq_length: 32, timing_warmup_steps: 0}\n")
    start = tmp_path / "somewhere" / "else"
    start.mkdir(parents=True)
    env = {**os.environ, data.DATA_DIR_ENV: os.path.relpath(data_dir, start)}
    assert not Path(env[data.DATA_DIR_ENV]).is_absolute()
    for command in (["validate", str(suite)], ["run", str(suite), "--out", "results", "--no-report"]):
        proc = subprocess.run([sys.executable, "-m", "harness", *command], cwd=start, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
    record = json.loads((start / "results" / "sst2__linear_probe__seed0.json").read_text())
    assert record["status"] == "ok", record.get("error")
    assert record["train"]["steps"] == 2 and "accuracy" in record["metrics"]
