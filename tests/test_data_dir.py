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


def test_a_relative_value_is_made_absolute_against_the_current_directory(glue_like_data, tmp_path, monkeypatch):
    data_dir = glue_like_data  # only resolved here, never read
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


def test_the_cli_resolves_once_and_passes_the_absolute_path_on(glue_like_data, tmp_path, monkeypatch, tiny_suite):
    """What the runner receives is absolute, whatever the working directory is by the time it reads it."""
    from harness import runner

    data_dir = glue_like_data  # preflight is replaced: nothing is read
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
    validate and a one-cell run (the cell's worker process reads the data too) both find it. It trains and
    evaluates a cell, so it reads the real data."""
    suite = tiny_suite(
        "tasks: [sst2]\nmethods: [{method: linear_probe, lr: 1.0e-2}]\n"
        "train: {max_steps: 2, batch_size: 8, max_train_samples: 16, max_eval_samples: 16, "
        "max_seq_length: 32, timing_warmup_steps: 0}\n"
    )
    start = tmp_path / "somewhere" / "else"
    start.mkdir(parents=True)
    env = {**os.environ, data.DATA_DIR_ENV: os.path.relpath(data_dir, start)}
    assert not Path(env[data.DATA_DIR_ENV]).is_absolute()
    for command in (["validate", str(suite)], ["run", str(suite), "--out", "results", "--no-report"]):
        proc = subprocess.run(
            [sys.executable, "-m", "harness", *command], cwd=start, env=env, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stderr
    record = json.loads((start / "results" / "sst2__linear_probe__seed0.json").read_text())
    assert record["status"] == "ok", record.get("error")
    assert record["train"]["steps"] == 2 and "accuracy" in record["metrics"]


# ---- the made-up data that tests of bad input use in place of the real files (conftest's glue_like_data) ----

GLUE_LIKE_TASKS = "[cola, sst2, mrpc, rte, stsb, wnli]"


def test_the_glue_like_data_passes_preflight(glue_like_data, tiny_suite, capsys):
    """Tests of bad input pass it as --data-dir and expect exit 2: that must come from their input, never from it."""
    suite = tiny_suite(f"tasks: {GLUE_LIKE_TASKS}\nmethods: [linear_probe]\n")
    assert main(["validate", str(suite), "--data-dir", str(glue_like_data)]) == 0, capsys.readouterr().err
    assert "6 tasks" in capsys.readouterr().out


def _files(root: Path) -> dict:
    import pyarrow.parquet as pq

    return {
        str(p.relative_to(root)): pq.read_schema(p).remove_metadata() if p.suffix == ".parquet" else None
        for p in sorted(root.glob("glue/*/*"))
    }


def test_the_glue_like_data_has_the_real_layout_and_schema(glue_like_data, data_dir):
    """Where the real data is present: the same files, each with the same columns and types, and labels from the
    real ones (the made-up rows stand in for real files only if preflight cannot tell them apart)."""
    import pandas as pd

    fake, real = _files(glue_like_data), _files(data_dir)
    assert sorted(fake) == sorted(real)
    for name, schema in fake.items():
        assert schema is not None and schema.equals(real[name]), f"{name}: {schema} != {real[name]}"
        fake_labels = pd.read_parquet(glue_like_data / name, columns=["label"])["label"]
        real_labels = pd.read_parquet(data_dir / name, columns=["label"])["label"]
        if name.startswith("glue/stsb/"):
            assert real_labels.min() <= fake_labels.min() and fake_labels.max() <= real_labels.max(), name
        else:
            assert set(fake_labels) == set(real_labels), name
