"""Every kind of bad input gets one line naming where, what and the fix, and exit
status 2, before any training (no results directory is even created).

Suites that name GLUE tasks get `glue_like_data` (conftest): a few made-up rows per split, laid out like the real
files, so that these tests need no real data; test_data_dir.py checks that it passes preflight and has the
real files' layout and schema, so an error here comes from the input under test, not from the data."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from harness.cli import main

GOOD_METHOD = "methods: [{method: linear_probe}]"
GOOD_LM = "methods: [{method: lora}]"  # a method that trains a causal LM (a linear probe has no head to train there)

# (id, suite text, extra files {name: content}, words the one-line message must contain)
CASES = [
    (
        "sweep-unknown-key",
        "tasks: [sst2]\nmethods: [{method: lora, sweep: {rank: [4, 8]}}]",
        {},
        ["methods[0].sweep.rank", "unknown key"],
    ),
    ("sweep-empty", "tasks: [sst2]\nmethods: [{method: lora, sweep: {lr: []}}]", {}, ["sweep.lr", "non-empty list"]),
    ("sweep-not-a-list", "tasks: [sst2]\nmethods: [{method: lora, sweep: {r: 8}}]", {}, ["sweep.r", "list"]),
    ("sweep-bad-point", "tasks: [sst2]\nmethods: [{method: lora, sweep: {r: [4, 0]}}]", {}, ["at r=0", "at least 1"]),
    (
        "sweep-and-set",
        "tasks: [sst2]\nmethods: [{method: lora, lr: 1.0e-3, sweep: {lr: [1.0e-4, 1.0e-3]}}]",
        {},
        ["sweep.lr", "both set in the entry and swept"],
    ),
    (
        "sweep-repeats",
        "tasks: [sst2]\nmethods: [{method: lora, sweep: {lr: [1.0e-4, 1.0e-4]}}]",
        {},
        ["sweep.lr", "twice"],
    ),
    (
        "sweep-stack-ambiguous",
        "tasks: [sst2]\nmethods: [{stack: [{method: lora}, {method: dora}], sweep: {r: [4, 8]}}]",
        {},
        ["sweep.r", "lora and dora", "cannot say which"],
    ),
    ("dev-size-all", f"tasks: [{{task: sst2, dev_size: 6}}]\n{GOOD_METHOD}", {}, ["dev_size", "leave none"]),
    ("dev-size-more", f"tasks: [{{task: sst2, dev_size: 60}}]\n{GOOD_METHOD}", {}, ["60 dev examples", "out of 6"]),
    ("dev-size-zero", f"tasks: [{{task: sst2, dev_size: 0}}]\n{GOOD_METHOD}", {}, ["dev_size", "positive integer"]),
    ("dev-split-missing", f"tasks: [{{task: sst2, dev_split: dev}}]\n{GOOD_METHOD}", {}, ["no dev split under"]),
    (
        "dev-split-is-eval",
        f"tasks: [{{task: sst2, dev_split: validation}}]\n{GOOD_METHOD}",
        {},
        ["dev_split", "eval split", "held out"],
    ),
    (
        "dev-size-and-split",
        f"tasks: [{{task: sst2, dev_split: dev, dev_size: 2}}]\n{GOOD_METHOD}",
        {},
        ["dev_split or dev_size, not both"],
    ),
    ("yaml-syntax", "tasks: [sst2\nmethods: [full]", {}, ["YAML syntax error", ":"]),
    ("not-a-mapping", "- sst2\n- full", {}, ["must be a YAML mapping"]),
    ("unknown-top-key", f"tasks: [sst2]\nmethds: [full]\n{GOOD_METHOD}", {}, ["methds", "did you mean 'methods'"]),
    ("no-tasks", GOOD_METHOD, {}, ["tasks", "missing or empty"]),
    ("empty-methods", "tasks: [sst2]\nmethods: []", {}, ["methods", "missing or empty"]),
    ("unknown-task", f"tasks: [sst3]\n{GOOD_METHOD}", {}, ["unknown task 'sst3'", "did you mean 'sst2'"]),
    (
        "unknown-method",
        "tasks: [sst2]\nmethods: [{method: lroa}]",
        {},
        ["unknown method 'lroa'", "did you mean 'lora'"],
    ),
    (
        "unknown-hparam",
        "tasks: [sst2]\nmethods: [{method: lora, hparams: {rank: 8}}]",
        {},
        ["methods[0].hparams", "rank"],
    ),
    (
        "hparam-type",
        "tasks: [sst2]\nmethods: [{method: lora, hparams: {r: eight}}]",
        {},
        ["methods[0].hparams", "'r'", "int"],
    ),
    ("zero-batch", f"tasks: [sst2]\n{GOOD_METHOD}\ntrain: {{batch_size: 0}}", {}, ["train.batch_size", "positive"]),
    ("negative-lr", "tasks: [sst2]\nmethods: [{method: full, lr: -1.0e-5}]", {}, ["methods[0].lr", "positive"]),
    ("lr-type", "tasks: [sst2]\nmethods: [{method: full, lr: fast}]", {}, ["methods[0].lr", "float"]),
    (
        "unknown-train-key",
        f"tasks: [sst2]\n{GOOD_METHOD}\ntrain: {{batchsize: 8}}",
        {},
        ["train.batchsize", "batch_size"],
    ),
    (
        "memory-limit-negative",
        f"tasks: [sst2]\n{GOOD_METHOD}\ntrain: {{host_memory_limit_gb: -4}}",
        {},
        ["train.host_memory_limit_gb", "positive"],
    ),
    ("bad-padding", f"tasks: [sst2]\n{GOOD_METHOD}\ntrain: {{padding: left}}", {}, ["train.padding", "dynamic"]),
    ("bad-precision", f"tasks: [sst2]\n{GOOD_METHOD}\ntrain: {{precision: fp8}}", {}, ["train.precision", "bf16"]),
    (
        "micro-batch",
        f"tasks: [sst2]\n{GOOD_METHOD}\ntrain: {{batch_size: 32, micro_batch_size: 5}}",
        {},
        ["micro_batch_size", "divide"],
    ),
    (
        "duplicate-label",
        "tasks: [sst2]\nmethods: [{method: lora}, {method: lora, hparams: {r: 4}}]",
        {},
        ["appears twice", "label"],
    ),
    ("bad-seeds", f"tasks: [sst2]\n{GOOD_METHOD}\nseeds: [0, one]", {}, ["seeds", "integers"]),
    (
        "method-override-bad",
        "tasks: [sst2]\nmethods: [{method: full, train: {max_steps: -3}}]",
        {},
        ["methods[0].train.max_steps", "positive"],
    ),
    (
        "plugin-missing",
        "tasks: [sst2]\nmethods: [{method: 'no_such_module:Thing'}]",
        {},
        ["cannot import plugin", "no_such_module"],
    ),
    (
        "custom-missing-column",
        "tasks: [{name: mine, data_files: {train: d.csv, validation: d.csv}, text_columns: [text], "
        "num_labels: 2, metrics: [accuracy]}]\n" + GOOD_METHOD,
        {"d.csv": "sentence,label\nhello,0\nbye,1\n"},
        ["task mine", "missing column", "text"],
    ),
    (
        "custom-file-missing",
        "tasks: [{name: mine, data_files: {train: nope.csv, validation: nope.csv}, text_columns: [text], "
        "num_labels: 2, metrics: [accuracy]}]\n" + GOOD_METHOD,
        {},
        ["data_files.train", "does not exist"],
    ),
    (
        "custom-empty",
        "tasks: [{name: mine, data_files: {train: e.csv, validation: e.csv}, text_columns: [text], "
        "num_labels: 2, metrics: [accuracy]}]\n" + GOOD_METHOD,
        {"e.csv": "text,label\n"},
        ["task mine", "is empty"],
    ),
    (
        "custom-label-range",
        "tasks: [{name: mine, data_files: {train: d.csv, validation: d.csv}, text_columns: [text], "
        "num_labels: 2, metrics: [accuracy]}]\n" + GOOD_METHOD,
        {"d.csv": "text,label\nhello,0\nbye,3\n"},
        ["labels [3]", "outside 0..1"],
    ),
    (
        "custom-unknown-metric",
        "tasks: [{name: mine, data_files: {train: d.csv}, text_columns: [text], num_labels: 2, metrics: [bleu]}]\n"
        + GOOD_METHOD,
        {"d.csv": "text,label\nhello,0\n"},
        ["metrics", "unknown metric 'bleu'"],
    ),
    ("number-key", f"tasks: [sst2]\n{GOOD_METHOD}\ntrain: {{1: 8}}", {}, ["train.1", "unknown key"]),
    ("number-key-in-entry", "tasks: [sst2]\nmethods: [{method: full, 3: x}]", {}, ["methods[0].3", "unknown key"]),
    ("infinite-epochs", f"tasks: [sst2]\n{GOOD_METHOD}\ntrain: {{epochs: .inf}}", {}, ["train.epochs", "finite"]),
    (
        "nan-weight-decay",
        f"tasks: [sst2]\n{GOOD_METHOD}\ntrain: {{weight_decay: .nan}}",
        {},
        ["train.weight_decay", "finite"],
    ),
    ("nan-lr", "tasks: [sst2]\nmethods: [{method: full, lr: .nan}]", {}, ["methods[0].lr", "positive number"]),
    (
        "task-name-with-slash",
        "tasks: [{name: a/b, data_files: {train: d.csv, validation: d.csv}, text_columns: [text], "
        "num_labels: 2, metrics: [accuracy]}]\n" + GOOD_METHOD,
        {"d.csv": "text,label\nhello,0\n"},
        ["tasks[0].name", "'a/b'"],
    ),
    ("unhashable-yaml-key", f"? [a, b]\n: 1\ntasks: [sst2]\n{GOOD_METHOD}", {}, ["YAML", "unhashable key"]),
    (
        "three-text-columns",
        "tasks: [{name: mine, data_files: {train: d.csv}, text_columns: [a, b, c], num_labels: 2, "
        "metrics: [accuracy]}]\n" + GOOD_METHOD,
        {"d.csv": "a,b,c,label\nx,y,z,0\n"},
        ["tasks[0].text_columns", "3 text columns", "one or two"],
    ),
    (
        "regression-metric-mismatch",
        "tasks: [{name: mine, data_files: {train: d.csv}, text_columns: [text], type: regression, "
        "metrics: [accuracy]}]\n" + GOOD_METHOD,
        {"d.csv": "text,label\nhello,0.5\n"},
        ["does not fit a regression task"],
    ),
    # causal-LM tasks, random-weights configs and frozen-weight dtypes
    (
        "lm-without-prompt",
        "tasks: [{name: gen, local: glue/sst2, type: causal_lm, target: ' {label}', metrics: [exact_match]}]\n"
        + GOOD_LM,
        {},
        ["tasks[0].prompt", "needs a prompt template"],
    ),
    (
        "lm-without-target",
        "tasks: [{name: gen, local: glue/sst2, type: causal_lm, prompt: '{sentence}', metrics: [exact_match]}]\n"
        + GOOD_LM,
        {},
        ["tasks[0].target", "needs a target template"],
    ),
    (
        "lm-template-names-a-missing-column",
        "tasks: [{name: gen, local: glue/sst2, type: causal_lm, prompt: 'Review: {review}', target: ' {label}', "
        "metrics: [exact_match]}]\n" + GOOD_LM,
        {},
        ["task gen", "missing column(s) ['review']", "templates"],
    ),
    (
        "lm-verbalizer-gap",
        "tasks: [{name: gen, local: glue/sst2, type: causal_lm, prompt: '{sentence}', target: ' {label}', "
        "verbalizer: {label: {0: negative}}, metrics: [exact_match]}]\n" + GOOD_LM,
        {},
        ["column 'label' holds ['1']", "verbalizer"],
    ),
    (
        "lm-metric-on-a-classifier",
        "tasks: [{name: mine, local: glue/sst2, text_columns: [sentence], num_labels: 2, metrics: [exact_match]}]\n"
        + GOOD_METHOD,
        {},
        ["exact_match", "does not fit a classification task"],
    ),
    ("lm-on-an-encoder", "tasks: [sst2_lm]\n" + GOOD_LM, {}, ["sst2_lm is causal_lm", "bidirectional encoder"]),
    (
        "unknown-config-name",
        "backbone: {config: llama-3.2-1B, weights: random}\ntasks: [sst2_lm]\n" + GOOD_LM,
        {},
        ["llama-3.2-1B", "did you mean 'llama-3.2-1b'"],
    ),
    (
        "four-bit-weights",
        "backbone: {config: llama-tiny, dtype: nf4}\ntasks: [sst2_lm]\n" + GOOD_LM,
        {},
        ["backbone.dtype", "nf4"],
    ),
    (
        "fill-on-pretrained-weights",
        "tasks: [sst2]\n" + GOOD_METHOD + "\ntrain: {padding: fill}",
        {},
        ["train.padding", "pretrained model's input"],
    ),
    (
        "bf16-weights-trained-in-fp32",
        "backbone: {config: llama-tiny, dtype: bf16}\ntasks: [sst2_lm]\n" + GOOD_LM,
        {},
        ["backbone.dtype", "precision: bf16"],
    ),
]


def write_case(tmp_path, text, files):
    for name, content in files.items():
        (tmp_path / name).write_text(content)
    suite = tmp_path / "suite.yaml"
    suite.write_text(textwrap.dedent(text))
    return suite


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize("case_id,text,files,words", CASES, ids=[c[0] for c in CASES])
def test_bad_suite_is_one_line_and_exit_2(case_id, text, files, words, command, tmp_path, capsys, glue_like_data):
    suite = write_case(tmp_path, text, files)
    out = tmp_path / "results"
    args = [command, str(suite), "--data-dir", str(glue_like_data)] + (["--out", str(out)] if command == "run" else [])
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and "; fix: " in err, err  # every message names the fix, suggestions included
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
def test_real_process_exits_2_without_traceback(case_id, tmp_path, glue_like_data):
    _, text, files, words = next(c for c in CASES if c[0] == case_id)
    suite = write_case(tmp_path, text, files)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "harness",
            "run",
            str(suite),
            "--data-dir",
            str(glue_like_data),
            "--out",
            str(tmp_path / "r"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert words[0] in proc.stderr


def test_yaml_tags_that_would_run_code_are_refused(tmp_path, capsys, glue_like_data):
    """Suites are read with a safe loader: a python/object tag is an error, never a call."""
    marker = tmp_path / "pwned"
    suite = write_case(
        tmp_path, f"tasks: [sst2]\n{GOOD_METHOD}\nnote: !!python/object/apply:os.system ['touch {marker}']", {}
    )
    assert main(["validate", str(suite), "--data-dir", str(glue_like_data)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "YAML tag not allowed" in err and "python/object" in err, err
    assert not marker.exists()


def test_remote_code_is_off_unless_the_suite_turns_it_on(tmp_path):
    from harness.config import load_suite

    plain = load_suite(write_case(tmp_path, f"tasks: [sst2]\n{GOOD_METHOD}", {}))
    assert plain.backbone.trust_remote_code is False and all(not c.backbone.trust_remote_code for c in plain.cells())
    with pytest.warns(UserWarning, match="trust_remote_code is on"):
        trusting = load_suite(
            write_case(
                tmp_path, f"backbone: {{name: minilm-l6, trust_remote_code: true}}\ntasks: [sst2]\n{GOOD_METHOD}", {}
            )
        )
    assert all(c.backbone.trust_remote_code for c in trusting.cells())


# ---- files that exist but cannot be read -------------------------------------------------------------
# Each case builds one bad train file in tmp_path and names it in a custom task; the message must name the
# task, the file and a fix, in one line, with exit 2 and nothing written, for validate and run alike.

GOOD_CSV = "text,label\nhello,0\nbye,1\n"
CLASSES = "num_labels: 2, metrics: [accuracy]"
REGRESSION = "type: regression, metrics: [pearson]"


def content(name, data: bytes):
    def make(tmp_path):
        (tmp_path / name).write_bytes(data)
        return name

    return make


def truncated_parquet(tmp_path):
    whole = tmp_path / "whole.parquet"
    pd.DataFrame({"text": ["a", "b", "c"], "label": [0, 1, 0]}).to_parquet(whole)
    data = whole.read_bytes()
    whole.unlink()
    (tmp_path / "cut.parquet").write_bytes(data[: len(data) // 2])
    return "cut.parquet"


def a_folder(tmp_path):
    (tmp_path / "train.csv").mkdir()
    (tmp_path / "train.csv" / "part-0.csv").write_text(GOOD_CSV)
    return "train.csv"


def broken_link(tmp_path):
    """A link to a file moved away: suite paths are resolved, so the message names where the link points."""
    (tmp_path / "train.csv").symlink_to(tmp_path / "moved-away.csv")
    return "train.csv", "moved-away.csv"


FILE_CASES = [
    ("parquet-zero-bytes", content("train.parquet", b""), CLASSES, ["empty (0 bytes)"]),
    (
        "parquet-corrupt",
        content("train.parquet", b"PAR1 not really a parquet file\n" * 8),
        CLASSES,
        ["cannot be read as PARQUET"],
    ),
    ("parquet-truncated", truncated_parquet, CLASSES, ["cannot be read as PARQUET"]),
    ("parquet-that-is-csv", content("train.parquet", GOOD_CSV.encode()), CLASSES, ["cannot be read as PARQUET"]),
    ("csv-latin1", content("train.csv", "text,label\ncafé crème,0\n".encode("latin-1")), CLASSES, ["not UTF-8"]),
    ("csv-utf16", content("train.csv", GOOD_CSV.encode("utf-16")), CLASSES, ["not UTF-8"]),
    ("csv-zero-bytes", content("train.csv", b""), CLASSES, ["empty (0 bytes)"]),
    ("csv-no-columns", content("train.csv", b"\n\n\n"), CLASSES, ["has no columns"]),
    (
        "csv-open-quote",
        content("train.csv", b'text,label\n"never closed,0\nbye,1\n'),
        CLASSES,
        ["cannot be read as CSV"],
    ),
    ("json-malformed", content("train.json", b'[{"text": "a", "label": 0}'), CLASSES, ["cannot be read as JSON"]),
    (
        "json-holding-lines",
        content("train.json", b'{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n'),
        CLASSES,
        ["cannot be read as JSON", ".jsonl"],
    ),
    ("json-scalar", content("train.json", b"5\n"), CLASSES, ["JSON"]),
    ("json-zero-bytes", content("train.json", b""), CLASSES, ["empty (0 bytes)"]),
    (
        "jsonl-malformed",
        content("train.jsonl", b'{"text": "a", "label": 0}\n{"text": \n'),
        CLASSES,
        ["cannot be read as JSONL"],
    ),
    (
        "jsonl-not-utf8",
        content("train.jsonl", '{"text": "café", "label": 0}\n'.encode("latin-1")),
        CLASSES,
        ["not UTF-8"],
    ),
    ("a-folder", a_folder, CLASSES, ["is a folder"]),
    ("broken-symlink", broken_link, CLASSES, ["does not exist"]),
    ("extension-txt", content("train.txt", GOOD_CSV.encode()), CLASSES, ["extension '.txt'", ".csv"]),
    ("extension-tsv", content("train.tsv", b"text\tlabel\na\t0\n"), CLASSES, ["extension '.tsv'"]),
    ("no-extension", content("train", GOOD_CSV.encode()), CLASSES, ["extension '(none)'"]),
    (
        "labels-that-are-lists",
        content("train.json", b'[{"text": "a", "label": [0]}]'),
        CLASSES,
        ["labels are not single values"],
    ),
    (
        "regression-labels-words",
        content("train.csv", b"text,label\na,high\nb,0.5\n"),
        REGRESSION,
        ["not finite numbers", "high"],
    ),
    (
        "regression-labels-infinite",
        content("train.csv", b"text,label\na,inf\nb,0.5\n"),
        REGRESSION,
        ["not finite numbers"],
    ),
]


def file_case_suite(tmp_path, make, fields):
    """(suite, the file name the message must show): a maker returns the name the suite gives, or (that,
    the name shown)."""
    made = make(tmp_path)
    name, shown = made if isinstance(made, tuple) else (made, made)
    (tmp_path / "good.csv").write_text("text,label\nhello,0.5\nbye,1\n" if "regression" in fields else GOOD_CSV)
    suite = tmp_path / "suite.yaml"
    suite.write_text(
        f"tasks: [{{name: mine, data_files: {{train: '{name}', validation: good.csv}}, text_columns: [text], "
        f"{fields}}}]\n{GOOD_METHOD}\n"
    )
    return suite, shown


def one_line_error(err: str) -> str:
    """The CLI's answer to bad input: one line, `error: where: problem; fix: ...`, no traceback."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "; fix: " in lines[0], err
    return lines[0]


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize("case_id,make,fields,words", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_unreadable_data_file_is_one_line_and_exit_2(case_id, make, fields, words, command, tmp_path, capsys):
    suite, name = file_case_suite(tmp_path, make, fields)
    out = tmp_path / "results"
    assert main([command, str(suite)] + (["--out", str(out)] if command == "run" else [])) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "task mine" in line and name in line, line
    for word in words:
        assert word in line, f"{word!r} not in {line!r}"
    assert not out.exists(), "nothing may be written before the input is known to be good"


@pytest.mark.parametrize("case_id", ["parquet-corrupt", "csv-latin1", "json-malformed"])
def test_unreadable_data_file_in_a_real_process(case_id, tmp_path):
    _, make, fields, words = next(c for c in FILE_CASES if c[0] == case_id)
    suite, name = file_case_suite(tmp_path, make, fields)
    proc = subprocess.run(
        [sys.executable, "-m", "harness", "run", str(suite), "--out", str(tmp_path / "r")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    line = one_line_error(proc.stderr)
    assert name in line and words[0] in line, line
    assert not (tmp_path / "r").exists()


def test_an_upper_case_extension_is_read(tmp_path, capsys):
    suite, _ = file_case_suite(tmp_path, content("TRAIN.CSV", GOOD_CSV.encode()), CLASSES)
    assert main(["validate", str(suite)]) == 0, capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_data_file_without_read_permission(tmp_path, capsys):
    suite, name = file_case_suite(tmp_path, content("train.csv", GOOD_CSV.encode()), CLASSES)
    (tmp_path / name).chmod(0)
    assert main(["validate", str(suite)]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert name in line and "permission denied" in line


def test_a_reader_refused_permission_is_one_line(tmp_path, capsys, monkeypatch):
    """What the reader meets when the mode check passes but the open fails (e.g. an ACL, or root squash on NFS)."""
    from harness import data

    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setitem(data.READERS, ".csv", refuse)
    suite, name = file_case_suite(tmp_path, content("train.csv", GOOD_CSV.encode()), CLASSES)
    assert main(["validate", str(suite)]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert name in line and "permission denied" in line and "task mine" in line


# ---- a data directory holding bad files -----------------------------------------------------------


def data_dir_with(tmp_path, good: Path, train) -> Path:
    """A data directory whose glue/sst2 has the good validation split of `good`, and `train(folder)` as its
    train split."""
    folder = tmp_path / "data" / "glue" / "sst2"
    folder.mkdir(parents=True)
    (folder / "validation.parquet").symlink_to(good / "glue" / "sst2" / "validation.parquet")
    train(folder)
    return tmp_path / "data"


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize(
    "train,words",
    [
        (lambda f: (f / "train.parquet").write_bytes(b""), ["empty (0 bytes)"]),
        (lambda f: (f / "train.parquet").write_bytes(b"garbage" * 100), ["cannot be read as PARQUET"]),
        (lambda f: (f / "train.parquet").mkdir(), ["is a folder"]),
        (lambda f: (f / "train.csv").write_bytes("sentence,label\n\xe9t\xe9,1\n".encode("latin-1")), ["not UTF-8"]),
    ],
    ids=["zero-bytes", "corrupt", "folder", "latin1-csv"],
)
def test_bad_file_in_the_data_directory(train, words, command, tmp_path, capsys, glue_like_data):
    bad = data_dir_with(tmp_path, glue_like_data, train)
    suite = write_case(tmp_path, f"tasks: [sst2]\n{GOOD_METHOD}", {})
    out = tmp_path / "results"
    assert main([command, str(suite), "--data-dir", str(bad)] + (["--out", str(out)] if command == "run" else [])) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "task sst2" in line and str(bad / "glue" / "sst2" / "train.") in line, line
    for word in words:
        assert word in line, line
    assert not out.exists()


def test_data_directory_that_is_a_file(tmp_path, capsys):
    suite = write_case(tmp_path, f"tasks: [sst2]\n{GOOD_METHOD}", {})
    (tmp_path / "data").write_text("not a folder")
    assert main(["validate", str(suite), "--data-dir", str(tmp_path / "data")]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "--data-dir" in line and "is a file, not a folder" in line


# ---- the suite file itself --------------------------------------------------------------------------

SUITE_TEXT = f"tasks: [sst2]\n{GOOD_METHOD}\n"


@pytest.mark.parametrize(
    "make,words",
    [
        (lambda p: p.write_bytes((SUITE_TEXT + "description: café\n").encode("latin-1")), ["not a UTF-8 text file"]),
        (lambda p: p.write_bytes(SUITE_TEXT.encode("utf-16")), ["not a UTF-8 text file"]),
        (lambda p: p.write_bytes(b""), ["empty"]),
        (lambda p: p.write_text("# nothing but a comment\n"), ["empty"]),
        (lambda p: p.mkdir(), ["is a folder"]),
        (lambda p: p.write_bytes(b"tasks: [sst2]\x00\n"), ["YAML"]),
    ],
    ids=["latin1", "utf16", "zero-bytes", "only-comments", "a-folder", "nul-byte"],
)
def test_unreadable_suite_file(make, words, tmp_path, capsys):
    suite = tmp_path / "my-suite.yaml"
    make(suite)
    assert main(["validate", str(suite)]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "my-suite.yaml" in line, line
    for word in words:
        assert word in line, line


def test_suite_file_refused_by_the_system(tmp_path, capsys, monkeypatch):
    suite = write_case(tmp_path, SUITE_TEXT, {})
    if os.geteuid() != 0:
        suite.chmod(0)
    else:  # root reads whatever the mode: make the read fail as it would for anyone else
        original = Path.read_bytes
        monkeypatch.setattr(
            Path,
            "read_bytes",
            lambda self: (
                (_ for _ in ()).throw(PermissionError(13, "Permission denied")) if self == suite else original(self)
            ),
        )
    assert main(["validate", str(suite)]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert str(suite) in line and "permission denied" in line


def test_a_suite_with_a_byte_order_mark_is_read(tmp_path, capsys):
    suite = tmp_path / "bom.yaml"
    suite.write_bytes(SUITE_TEXT.encode("utf-8-sig"))
    from harness.config import load_suite

    assert [t.name for t in load_suite(suite).tasks] == ["sst2"]


# ---- plugin files ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source,words",
    [
        (b"class Broken(:\n", ["SyntaxError"]),
        ("x = 'caf\xe9'\n".encode("latin-1"), ["SyntaxError", "utf-8"]),
        (b"raise RuntimeError('first line\\nsecond line\\nthird line')\n", ["RuntimeError", "first line second line"]),
        (b"import no_such_module_anywhere\n", ["ModuleNotFoundError", "no_such_module_anywhere"]),
    ],
    ids=["syntax-error", "not-utf8", "multi-line-error", "import-error"],
)
def test_plugin_file_that_cannot_be_imported(source, words, tmp_path, capsys):
    plugin = tmp_path / "my_plugin.py"
    plugin.write_bytes(source)
    suite = write_case(tmp_path, f"tasks: [sst2]\nmethods: [{{method: '{plugin}:Thing'}}]\n", {})
    assert main(["validate", str(suite)]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "my_plugin.py" in line and "methods[0].method" in line, line
    for word in words:
        assert word in line, line


def test_plugin_path_that_is_a_folder(tmp_path, capsys):
    (tmp_path / "my_plugin.py").mkdir()
    suite = write_case(tmp_path, f"tasks: [sst2]\nmethods: [{{method: '{tmp_path / 'my_plugin.py'}'}}]\n", {})
    assert main(["validate", str(suite)]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "my_plugin.py" in line and "is a folder" in line


# ---- where results go -----------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["a-file", "under-a-file"])
def test_results_directory_that_cannot_be_made(where, tmp_path, capsys, glue_like_data, tiny_backbone):
    blocker = tmp_path / "taken"
    blocker.write_text("someone's notes\n")
    out = blocker if where == "a-file" else blocker / "results"
    suite = write_case(tmp_path, f"backbone: {tiny_backbone}\ntasks: [sst2]\n{GOOD_METHOD}", {})
    assert main(["run", str(suite), "--out", str(out), "--data-dir", str(glue_like_data)]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert str(out) in line
    assert blocker.read_text() == "someone's notes\n"


def test_hub_that_cannot_be_reached(tmp_path, capsys, monkeypatch):
    """No data directory, so the hub; offline (or an unknown dataset) is one line that says how to go local."""
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    suite = write_case(tmp_path, f"tasks: [sst2]\n{GOOD_METHOD}", {})
    assert main(["validate", str(suite)]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "task sst2" in line and "nyu-mll/glue" in line and "HARNESS_DATA_DIR" in line, line
