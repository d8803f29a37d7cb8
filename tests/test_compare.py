"""The regression gate (`harness compare`), on copies of the committed smoke baseline.

Records are real ones from results/baselines/smoke with single fields edited,
so no training runs here. Exit codes are checked through a real subprocess.
"""

import json
import shutil
import subprocess
import sys

import pytest

from harness import compare, gate
from harness.cli import main as cli_main
from harness.config import load_suite
from harness.errors import UserError
from tests.conftest import ROOT

BASELINE = ROOT / "results" / "baselines" / "smoke"
LORA, FULL = "sst2__lora__seed0", "sst2__full__seed0"


def cli(*args):
    """Run `python -m harness compare ...` as a real process; (exit status, stdout, stderr)."""
    done = subprocess.run(
        [sys.executable, "-m", "harness", "compare", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done.returncode, done.stdout, done.stderr


@pytest.fixture
def main(capsys):
    """The same command in this process (a subprocess costs a second or more of import); same result."""

    def run(*args):
        status = cli_main(["compare", *map(str, args)])
        captured = capsys.readouterr()
        return status, captured.out, captured.err

    return run


def edit(directory, cell, change):
    path = directory / f"{cell}.json"
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))


def line_of(output, *words):
    """The one table line holding every word, or None."""
    hits = [line for line in output.splitlines() if all(w in line for w in words)]
    assert len(hits) <= 1, hits
    return hits[0] if hits else None


def judge(base, cur, **flags):
    return compare.compare(base, cur, gate.resolve({}, flags))


@pytest.fixture
def sides(tmp_path):
    """(baseline, current): two identical copies of the committed baseline's records."""
    if not BASELINE.is_dir():
        pytest.skip("no committed baseline at results/baselines/smoke")
    base, cur = tmp_path / "base", tmp_path / "cur"
    for side in (base, cur):
        side.mkdir()
        for path in BASELINE.glob("*.json"):
            shutil.copy(path, side / path.name)
    return base, cur


def test_identical_results_pass(sides):
    status, out, err = cli(*sides)
    assert status == 0, out + err
    assert out.startswith("PASS") and "8 unchanged" in out


def test_package_versions_that_differ_are_named_in_one_line(sides, main):
    base, cur = sides
    _, same, _ = main(base, cur)
    assert "package versions differ" not in same
    for path in cur.glob("*.json"):
        edit(cur, path.stem, lambda r: r["env"]["packages"].update(transformers="99.0.0"))
    edit(cur, LORA, lambda r: r["env"]["packages"].update(peft="0.0.1"))
    base_version = json.loads((base / f"{LORA}.json").read_text())["env"]["packages"]["transformers"]
    status, out, _ = main(base, cur)
    assert status == 0, "versions alone are news, not a regression"
    lines = [line for line in out.splitlines() if "package versions differ" in line]
    assert len(lines) == 1
    assert f"transformers {base_version} -> 99.0.0" in lines[0]
    assert "peft" in lines[0] and "0.0.1" in lines[0] and "torch" not in lines[0]


def test_memory_is_compared_only_between_cells_of_the_same_attention_backend(sides):
    base, cur = sides
    edit(base, LORA, lambda r: r["measurements"].update(attention_backend="math"))
    edit(
        cur,
        LORA,
        lambda r: r["measurements"].update(
            attention_backend="flash_cpu", activation_bytes=r["measurements"]["activation_bytes"] // 3
        ),
    )
    result = judge(base, cur)
    assert result.cells[LORA] == "unchanged" and not result.failed
    assert any("attention backends differ (math vs flash_cpu)" in note for note in result.notes)
    edit(base, LORA, lambda r: r["measurements"].update(attention_backend="flash_cpu"))
    assert judge(base, cur).cells[LORA] == "improved", "the same backend: compared"


def test_activation_bytes_ten_percent_above_baseline_fails_naming_the_cell(sides):
    base, cur = sides
    edit(
        cur,
        LORA,
        lambda r: r["measurements"].update(activation_bytes=int(r["measurements"]["activation_bytes"] * 1.10)),
    )
    status, out, _ = cli(base, cur)
    assert status == 1
    assert out.startswith("FAIL")
    row = line_of(out, LORA, "activation_bytes")
    assert row and "regressed" in row and "+10.0%" in row
    assert sum("regressed" in line for line in out.splitlines()[3:]) == 1  # only that cell, only that figure


def test_memory_within_tolerance_passes_and_zero_tolerance_is_exact(sides):
    base, cur = sides
    edit(cur, LORA, lambda r: r["measurements"].update(activation_bytes=r["measurements"]["activation_bytes"] + 1000))
    assert not judge(base, cur).failed  # +0.0008% is inside the default 2%
    assert judge(base, cur, memory_tolerance="0").failed


def test_metric_drop_beyond_tolerance_fails(sides, main):
    base, cur = sides
    edit(cur, FULL, lambda r: r["metrics"]["accuracy"].update(value=r["metrics"]["accuracy"]["value"] - 0.02))
    status, out, _ = main(base, cur)
    assert status == 1
    row = line_of(out, FULL, "accuracy")
    assert row and "regressed" in row and "-2.00 pt" in row
    # the same drop is inside a 3-point tolerance
    assert main(base, cur, "--metric-tolerance", "3")[0] == 0


def test_lower_is_better_metric_is_judged_the_other_way(sides):
    base, cur = sides
    for side, value in ((base, 0.50), (cur, 0.60)):  # e.g. an error rate going up by 10 points
        edit(side, FULL, lambda r, v=value: r["metrics"]["accuracy"].update(value=v, higher_is_better=False))
    [finding] = judge(base, cur).findings
    assert (finding.cell, finding.outcome, finding.fails) == (FULL, compare.REGRESSED, True)
    edit(cur, FULL, lambda r: r["metrics"]["accuracy"].update(value=0.40))
    [finding] = judge(base, cur).findings
    assert finding.outcome == compare.IMPROVED and not finding.fails


def test_improvement_is_reported_and_passes(sides, main):
    base, cur = sides
    edit(cur, LORA, lambda r: r["measurements"].update(activation_bytes=r["measurements"]["activation_bytes"] // 2))
    edit(cur, FULL, lambda r: r["metrics"]["accuracy"].update(value=r["metrics"]["accuracy"]["value"] + 0.05))
    status, out, _ = main(base, cur)
    assert status == 0 and out.startswith("PASS")
    assert "improved" in line_of(out, LORA, "activation_bytes")
    assert "improved" in line_of(out, FULL, "accuracy")


def test_missing_cells_are_reported(sides, main):
    base, cur = sides
    (cur / f"{LORA}.json").unlink()
    status, out, _ = main(base, cur)
    assert status == 1  # the gate can no longer vouch for a cell the run lacks
    assert "missing-in-current" in line_of(out, LORA)
    status, out, _ = main(cur, base)  # the other way round: a new cell passes, and is reported
    assert status == 0
    assert "missing-in-baseline" in line_of(out, LORA)


def test_ok_cell_now_failing_is_a_regression(sides):
    base, cur = sides
    edit(cur, LORA, lambda r: r.update(status="oom", error={"type": "oom", "message": "CUDA out of\nmemory"}))
    result = judge(base, cur)
    assert result.failed and result.cells[LORA] == compare.STATUS_CHANGED
    assert any("oom: CUDA out of memory" in note for note in result.notes)  # the error, on one line
    assert not judge(cur, base).failed  # oom -> ok is no regression


def test_gpu_figure_gated_only_when_both_sides_have_it(sides):
    base, cur = sides
    edit(cur, LORA, lambda r: r["measurements"].update(peak_gpu_allocated_bytes=10**9))
    result = judge(base, cur)
    assert not result.failed
    assert any("peak_gpu_allocated_bytes not compared" in note for note in result.notes)
    edit(base, LORA, lambda r: r["measurements"].update(peak_gpu_allocated_bytes=8 * 10**8))
    [finding] = judge(base, cur).findings
    assert (finding.cell, finding.figure, finding.outcome) == (LORA, "peak_gpu_allocated_bytes", compare.REGRESSED)


def test_time_tolerance_and_devices(sides):
    base, cur = sides
    edit(cur, LORA, lambda r: r["measurements"].update(train_seconds=r["measurements"]["train_seconds"] * 2))
    assert [f.figure for f in judge(base, cur).findings] == ["train_seconds"]
    assert not judge(base, cur, time_tolerance="off").failed
    assert not judge(base, cur, time_tolerance="150%").failed
    edit(cur, LORA, lambda r: r["env"].update(device="NVIDIA H100 80GB HBM3"))
    result = judge(base, cur)
    assert not result.failed and any(n.startswith("time not compared") for n in result.notes)


def test_markdown_table(sides):
    base, cur = sides
    edit(cur, LORA, lambda r: r["measurements"].update(grad_bytes=r["measurements"]["grad_bytes"] * 2))
    text = compare.render_markdown(judge(base, cur))
    assert text.startswith("### Regression gate: FAIL")
    assert "| gate | outcome | cell | figure | baseline | current | change | tolerance |" in text
    # Markdown specials in the records are escaped as the report escapes them: shown as written
    assert "| FAIL | regressed | sst2\\_\\_lora\\_\\_seed0 | grad\\_bytes |" in text


def test_exported_baseline_file(sides, tmp_path):
    base, cur = sides
    exported = tmp_path / "smoke-baseline.json"
    done = subprocess.run(
        [sys.executable, "-m", "harness", "export", base, exported], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert len(json.loads(exported.read_text())["records"]) == 8
    edit(cur, LORA, lambda r: r["measurements"].update(optimizer_bytes=r["measurements"]["optimizer_bytes"] * 3))
    [finding] = judge(exported, cur).findings
    assert (finding.cell, finding.figure) == (LORA, "optimizer_bytes")


@pytest.mark.parametrize(
    "problem",
    ["no such dir", "broken record", "bad tolerance", "percent metric tolerance", "not a baseline file", "empty dir"],
)
def test_bad_input_exits_2_with_one_line(sides, tmp_path, main, problem):
    base, cur = sides
    args = [base, cur]
    if problem == "no such dir":
        args = [base, tmp_path / "nowhere"]
    elif problem == "broken record":
        (cur / f"{LORA}.json").write_text("{ half a record")
    elif problem == "bad tolerance":
        args += ["--memory-tolerance", "lots"]
    elif problem == "percent metric tolerance":
        args += ["--metric-tolerance", "1%"]
    elif problem == "not a baseline file":
        (tmp_path / "other.json").write_text('{"some": "json"}')
        args = [tmp_path / "other.json", cur]
    elif problem == "empty dir":
        (tmp_path / "empty").mkdir()
        args = [base, tmp_path / "empty"]
    real_process = problem in ("no such dir", "bad tolerance")  # two through a real process, the rest in this one
    status, out, err = (cli if real_process else main)(*args)
    assert status == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err


def test_suite_gate_settings_and_precedence(tmp_path):
    suite = tmp_path / "suite.yaml"
    smoke = (ROOT / "suites" / "smoke.yaml").read_text().split("\ngate:")[0]  # whatever gate it has, ours replaces it
    suite.write_text(
        smoke + "\ngate:\n  memory_tolerance: 0%\n  time_tolerance: off\n  figures: [activation_bytes, metric]\n"
    )
    suite_gate = load_suite(suite).gate
    assert suite_gate == {"memory_tolerance": 0.0, "time_tolerance": None, "figures": ("activation_bytes", "metric")}
    settings = gate.resolve(suite_gate, {"memory_tolerance": "5%", "metric_tolerance": None, "time_tolerance": None})
    assert settings["memory_tolerance"] == 5.0  # the flag beats the suite
    assert settings["time_tolerance"] is None and settings["metric_tolerance"] == gate.DEFAULTS["metric_tolerance"]
    for bad in (
        "\ngate:\n  memory_tolerence: 2%\n",
        "\ngate:\n  metric_tolerance: 1%\n",
        "\ngate:\n  figures: [vram]\n",
        "\ngate:\n  time_tolerance: -5\n",
        "\ngate: strict\n",
    ):
        suite.write_text(smoke + bad)
        with pytest.raises(UserError, match=r"\.gate"):
            load_suite(suite)


def test_suite_gate_is_read_without_the_rest_of_the_suite(sides, tmp_path):
    """`compare --suite` needs the gate: mapping only: a plugin that cannot be imported, a task
    whose data is missing, or an unknown method elsewhere in the suite do not stop it, and
    neither torch nor the method registry is imported to read it."""
    suite = tmp_path / "suite.yaml"
    suite.write_text(
        "name: broken\ntasks: [{name: gone, data_files: {train: nowhere.csv}, text_columns: [t],"
        " num_labels: 2, metrics: [accuracy]}]\nmethods: [{method: 'no_such_package.methods:Thing'},"
        " {method: not_a_method}]\ngate:\n  memory_tolerance: 0%\n"
    )
    assert gate.from_suite(suite)["memory_tolerance"] == 0.0
    base, cur = sides
    edit(cur, LORA, lambda r: r["measurements"].update(activation_bytes=r["measurements"]["activation_bytes"] + 1))
    status, out, err = cli(base, cur, "--suite", suite)
    assert status == 1 and "activation_bytes" in out, out + err  # the suite's 0% tolerance was applied
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from harness import gate; "
            f"gate.from_suite({str(suite)!r}); print('torch' in sys.modules, 'harness.method' in sys.modules)",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert probe.stdout.split() == ["False", "False"], probe.stdout + probe.stderr


def test_markdown_shows_the_records_text_as_written(sides):
    """A label with Markdown or HTML in it (a pipe would split the table's row) is escaped, never rendered."""
    base, cur = sides
    edit(cur, LORA, lambda r: r["measurements"].update(grad_bytes=r["measurements"]["grad_bytes"] * 2))
    result = judge(base, cur)
    result.findings[0].cell = "a|b <i>*x*</i>"
    text = compare.render_markdown(result)
    assert "| FAIL | regressed | a\\|b &lt;i&gt;\\*x\\*&lt;/i&gt; |" in text


def test_bytes_are_shown_in_binary_units_with_two_decimals():
    assert compare._show("memory", 512) == "512 B"
    assert compare._show("memory", 1536) == "1.50 KiB"
    assert compare._show("memory", 3 * 2**20 + 2**18) == "3.25 MiB"
    assert compare._show("memory", 5 * 2**30) == "5.00 GiB"
