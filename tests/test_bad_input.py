"""Every kind of bad input gets one line naming where, what and the fix, and exit
status 2, before any training (no results directory is even created)."""

import subprocess
import sys
import textwrap

import pytest

from harness.cli import main

GOOD_METHOD = "methods: [{method: linear_probe}]"

# (id, suite text, extra files {name: content}, words the one-line message must contain)
CASES = [
    ("yaml-syntax", "tasks: [sst2\nmethods: [full]", {}, ["YAML syntax error", ":"]),
    ("not-a-mapping", "- sst2\n- full", {}, ["must be a YAML mapping"]),
    ("unknown-top-key", f"tasks: [sst2]\nmethds: [full]\n{GOOD_METHOD}", {}, ["methds", "did you mean 'methods'"]),
    ("no-tasks", GOOD_METHOD, {}, ["tasks", "missing or empty"]),
    ("empty-methods", "tasks: [sst2]\nmethods: []", {}, ["methods", "missing or empty"]),
    ("unknown-task", f"tasks: [sst3]\n{GOOD_METHOD}", {}, ["unknown task 'sst3'", "did you mean 'sst2'"]),
    ("unknown-method", "tasks: [sst2]\nmethods: [{method: lroa}]", {}, ["unknown method 'lroa'", "did you mean 'lora'"]),
    ("unknown-hparam", "tasks: [sst2]\nmethods: [{method: lora, hparams: {rank: 8}}]", {}, ["methods[0].hparams", "rank"]),
    ("hparam-type", "tasks: [sst2]\nmethods: [{method: lora, hparams: {r: eight}}]", {}, ["methods[0].hparams", "'r'", "int"]),
    ("zero-batch", f"tasks: [sst2]\n{GOOD_METHOD}\ntrain: {{batch_size: 0}}", {}, ["train.batch_size", "positive"]),
    ("negative-lr", "tasks: [sst2]\nmethods: [{method: full, lr: -1.0e-5}]", {}, ["methods[0].lr", "positive"]),
    ("lr-type", "tasks: [sst2]\nmethods: [{method: full, lr: fast}]", {}, ["methods[0].lr", "float"]),
    ("unknown-train-key", f"tasks: [sst2]\n{GOOD_METHOD}\ntrain: {{batchsize: 8}}", {}, ["train.batchsize", "batch_size"]),
    ("memory-limit-negative", f"tasks: [sst2]\n{GOOD_METHOD}\ntrain: {{host_memory_limit_gb: -4}}", {}, ["train.host_memory_limit_gb", "positive"]),
    ("bad-padding", f"tasks: [sst2]\n{GOOD_METHOD}\ntrain: {{padding: left}}", {}, ["train.padding", "dynamic"]),
    ("bad-precision", f"tasks: [sst2]\n{GOOD_METHOD}\ntrain: {{precision: fp8}}", {}, ["train.precision", "bf16"]),
    ("micro-batch", f"tasks: [sst2]\n{GOOD_METHOD}\ntrain: {{batch_size: 32, micro_batch_size: 5}}", {}, ["micro_batch_size", "divide"]),
    ("duplicate-label", "tasks: [sst2]\nmethods: [{method: lora}, {method: lora, hparams: {r: 4}}]", {}, ["appears twice", "label"]),
    ("bad-seeds", f"tasks: [sst2]\n{GOOD_METHOD}\nseeds: [0, one]", {}, ["seeds", "integers"]),
    ("method-override-bad", "tasks: [sst2]\nmethods: [{method: full, train: {max_steps: -3}}]", {}, ["methods[0].train.max_steps", "positive"]),
    ("plugin-missing", "tasks: [sst2]\nmethods: [{method: 'no_such_module:Thing'}]", {}, ["cannot import plugin", "no_such_module"]),
    ("custom-missing-column", "tasks: [{name: mine, data_files: {train: d.csv, validation: d.csv}, text_columns: [text], num_labels: 2, metrics: [accuracy]}]\n" + GOOD_METHOD,
     {"d.csv": "sentence,label\nhello,0\nbye,1\n"}, ["task mine", "missing column", "text"]),
    ("custom-file-missing", "tasks: [{name: mine, data_files: {train: nope.csv, validation: nope.csv}, text_columns: [text], num_labels: 2, metrics: [accuracy]}]\n" + GOOD_METHOD,
     {}, ["data_files.train", "does not exist"]),
    ("custom-empty", "tasks: [{name: mine, data_files: {train: e.csv, validation: e.csv}, text_columns: [text], num_labels: 2, metrics: [accuracy]}]\n" + GOOD_METHOD,
     {"e.csv": "text,label\n"}, ["task mine", "is empty"]),
    ("custom-label-range", "tasks: [{name: mine, data_files: {train: d.csv, validation: d.csv}, text_columns: [text], num_labels: 2, metrics: [accuracy]}]\n" + GOOD_METHOD,
     {"d.csv": "text,label\nhello,0\nbye,3\n"}, ["labels [3]", "outside 0..1"]),
    ("custom-unknown-metric", "tasks: [{name: mine, data_files: {train: d.csv}, text_columns: [text], num_labels: 2, metrics: [bleu]}]\n" + GOOD_METHOD,
     {"d.csv": "text,label\nhello,0\n"}, ["metrics", "unknown metric 'bleu'"]),
    ("regression-metric-mismatch", "tasks: [{name: mine, data_files: {train: d.csv}, text_columns: [text], type: regression, metrics: [accuracy]}]\n" + GOOD_METHOD,
     {"d.csv": "text,label\nhello,0.5\n"}, ["does not fit a regression task"]),
]


def write_case(tmp_path, text, files):
    for name, content in files.items():
        (tmp_path / name).write_text(content)
    suite = tmp_path / "suite.yaml"
    suite.write_text(textwrap.dedent(text))
    return suite


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize("case_id,text,files,words", CASES, ids=[c[0] for c in CASES])
def test_bad_suite_is_one_line_and_exit_2(case_id, text, files, words, command, tmp_path, capsys, data_dir):
    suite = write_case(tmp_path, text, files)
    out = tmp_path / "results"
    args = [command, str(suite), "--data-dir", str(data_dir)] + (["--out", str(out)] if command == "run" else [])
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and "fix:" in err or "did you mean" in err, err
    for word in words:
        assert word in err, f"{word!r} not in {err!r}"
    assert not out.exists(), "nothing may be written before the input is known to be good"


def test_missing_suite_file(capsys):
    assert main(["validate", "nope/suite.yaml"]) == 2
    assert "suite file not found" in capsys.readouterr().err


def test_missing_data_directory(tmp_path, capsys):
    suite = write_case(tmp_path, f"tasks: [sst2]\n{GOOD_METHOD}", {})
    assert main(["run", str(suite), "--data-dir", str(tmp_path / "absent")]) == 2
    err = capsys.readouterr().err
    assert "--data-dir" in err and "does not exist" in err


@pytest.mark.parametrize("case_id", ["yaml-syntax", "unknown-method", "custom-label-range"])
def test_real_process_exits_2_without_traceback(case_id, tmp_path, data_dir):
    _, text, files, words = next(c for c in CASES if c[0] == case_id)
    suite = write_case(tmp_path, text, files)
    proc = subprocess.run([sys.executable, "-m", "harness", "run", str(suite), "--data-dir", str(data_dir),
                           "--out", str(tmp_path / "r")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert words[0] in proc.stderr


def test_yaml_tags_that_would_run_code_are_refused(tmp_path, capsys, data_dir):
    """Suites are read with a safe loader: a python/object tag is an error, never a call."""
    marker = tmp_path / "pwned"
    suite = write_case(tmp_path, f"tasks: [sst2]\n{GOOD_METHOD}\nnote: !!python/object/apply:os.system ['touch {marker}']", {})
    assert main(["validate", str(suite), "--data-dir", str(data_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "YAML tag not allowed" in err and "python/object" in err, err
    assert not marker.exists()


def test_remote_code_is_off_unless_the_suite_turns_it_on(tmp_path):
    from harness.config import load_suite
    plain = load_suite(write_case(tmp_path, f"tasks: [sst2]\n{GOOD_METHOD}", {}))
    assert plain.trust_remote_code is False and all(c.trust_remote_code is False for c in plain.cells())
    with pytest.warns(UserWarning, match="trust_remote_code is on"):
        trusting = load_suite(write_case(tmp_path, f"backbone: {{name: minilm-l6, trust_remote_code: true}}\ntasks: [sst2]\n{GOOD_METHOD}", {}))
    assert all(c.trust_remote_code for c in trusting.cells())
