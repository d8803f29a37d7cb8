"""The report of a real small run: rendered in headless Chromium, its numbers checked against the records.

tests/fixtures/report/results holds real records of tests/fixtures/report/suite.yaml
(MiniLM-L6, a few steps, two seeds; one entry diverges and one times out on purpose).
"""

import json
import math
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from harness import cli, report, results, summary
from harness.errors import UserError
from harness.formatting import markdown_cell

FIXTURE = Path(__file__).parent / "fixtures" / "report" / "results"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium not installed (Debian: apt-get install -y chromium)"
)
UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}

# Run after the page's load event: what the images and resources did, and whether clicking a header sorts.
PROBE = """<script>
window.addEventListener("load", function () {
  var out = {images: Array.prototype.map.call(document.images,
                                              function (i) { return i.complete && i.naturalWidth > 0; }),
             resources: performance.getEntriesByType("resource").map(function (e) { return e.name; })};
  var table = document.querySelector('table[data-scope="sst2"]'), th = table.querySelector("th.col-metric");
  function column() { return Array.prototype.map.call(table.tBodies[0].rows, function (r) {
    return r.querySelector("td.col-metric").getAttribute("data-v"); }); }
  th.click(); out.ascending = column(); out.aria = th.getAttribute("aria-sort");
  th.click(); out.descending = column();
  document.body.setAttribute("data-probe", JSON.stringify(out));
});
</script>"""


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """The report of the fixture, written through the CLI as a user would."""
    out = tmp_path_factory.mktemp("report")
    assert cli.main(["report", str(FIXTURE), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def frame():
    return results.load(FIXTURE, strict=True)


def run_chromium(page: Path, workdir: Path) -> tuple[str, list[str]]:
    """(DOM after load, console messages): any console message from our page is a fault."""
    proc = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={workdir / 'profile'}",
            "--enable-logging=stderr",
            "--v=0",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if re.search(r":CONSOLE[:(]", line)]
    return proc.stdout, console


class Rows(HTMLParser):
    """Rows of the report's tables: {(scope, method): {column key: shown text}}, and the probe."""

    def __init__(self):
        super().__init__()
        self.rows, self.probe, self.scripts = {}, None, 0
        self._row = self._key = None
        self._text = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "body" and "data-probe" in attrs:
            self.probe = json.loads(attrs["data-probe"])
        elif tag == "script":
            self.scripts += 1
        elif tag == "tr" and "data-scope" in attrs:
            self._row = {}
            self.rows.setdefault((attrs["data-scope"], attrs["data-method"]), []).append(self._row)
        elif tag == "td" and self._row is not None:
            self._key, self._text = attrs["class"].removeprefix("col-"), []

    def handle_data(self, data):
        if self._key:
            self._text.append(data)

    def handle_endtag(self, tag):
        if tag == "td" and self._key:
            self._row[self._key] = "".join(self._text).strip()
            self._key = None
        elif tag == "tr":
            self._row = None


def parse_page(dom: str) -> Rows:
    rows = Rows()
    rows.feed(dom)
    return rows


def shown_metric(text):
    if text == "—":
        return None, None
    mean, _, std = text.partition(" ± ")
    return float(mean), float(std) if std else None


def shown_bytes(text):
    if text == "—":
        return None, None, None
    value, _, source = text.partition(" · ")
    number, unit = value.split()
    return float(number.replace(",", "")) * UNITS[unit], UNITS[unit], source or None


def close(shown, expected, step):
    """A value printed rounded to `step` matches the record's figure."""
    if expected is None or (isinstance(expected, float) and math.isnan(expected)):
        return shown is None
    return shown is not None and abs(shown - expected) <= step / 2 + 1e-9 * abs(expected)


def test_fixture_is_a_real_run_with_every_outcome(frame):
    assert set(frame["status"]) >= {"ok", "diverged", "timeout"}
    assert len(frame) == 24 and frame["seed"].nunique() == 2
    assert (frame.loc[frame["status"] == "ok", "device"].str.startswith("cpu")).all()


@needs_chromium
def test_page_renders_without_console_errors_and_shows_the_records(written, frame, tmp_path):
    page = tmp_path / "probed.html"
    page.write_text((written / report.HTML_NAME).read_text().replace("</body>", PROBE + "</body>"))
    dom, console = run_chromium(page, tmp_path)
    assert console == [], console
    seen = parse_page(dom)

    # Self-contained: every figure drawn from embedded data, nothing fetched from anywhere.
    assert seen.probe["images"] == [True] * 4
    assert seen.probe["resources"] == []
    # Sorting: ascending then descending by the metric, cells without a value last both ways.
    numbers = lambda values: [float(v) for v in values if v != ""]
    assert numbers(seen.probe["ascending"]) == sorted(numbers(seen.probe["ascending"]))
    assert numbers(seen.probe["descending"]) == sorted(numbers(seen.probe["descending"]), reverse=True)
    for order in (seen.probe["ascending"], seen.probe["descending"]):
        assert order[len(numbers(order)) :] == [""] * (len(order) - len(numbers(order)))
    assert seen.probe["aria"] == "ascending"

    # Per task and method: every shown number against the records' own figures.
    for (task, method), group in frame.groupby(["task", "method"]):
        [row] = seen.rows[(task, method)]
        ok = group[group["status"] == "ok"]
        statuses = set(group["status"])
        assert (
            row["status"] == statuses.pop() if len(statuses) == 1 else all(f" {s}" in row["status"] for s in statuses)
        )
        # The family comes from the records' method_info, which the runner writes too, for a killed cell.
        assert set(group["family"]) == {row["family"]}
        mean, std = shown_metric(row["metric"])
        assert close(mean, ok["metric"].mean() if len(ok) else None, 1e-4), (task, method, row)
        assert close(std, ok["metric"].std(ddof=1) if len(ok) > 1 else None, 1e-4), (task, method, row)
        peak, unit, source = shown_bytes(row["peak"])
        if len(ok):
            assert source == "modelled"  # a CPU run: the modelled peak is the best figure there is
            assert close(peak, ok["modelled_peak_bytes"].mean(), 0.1 * unit)
            activations, unit, _ = shown_bytes(row["activations"])
            assert close(activations, ok["activation_bytes"].mean(), 0.1 * unit)
            count, pct = re.fullmatch(r"([\d,]+) \(([\d.e-]+)%\)", row["trainable"]).groups()
            assert int(count.replace(",", "")) == ok["trainable_params"].iloc[0]
            assert float(pct) == pytest.approx(
                100 * ok["trainable_params"].iloc[0] / ok["total_params"].iloc[0], rel=5e-3
            )
            assert close(float(row["throughput"].replace(",", "")), ok["train_samples_per_s"].mean(), 0.1)
            assert close(float(row["time"].removesuffix(" s").replace(",", "")), ok["train_seconds"].mean(), 0.1)
        else:  # nothing finished: no figures, and the status says why
            assert peak is None and row["throughput"] == "—" and row["status"] in ("diverged", "timeout")

    # Across tasks: the GLUE-style average of per-task means, deviation over per-seed averages.
    tasks = sorted(frame["task"].unique())
    for method, group in frame.groupby("method"):
        [row] = seen.rows[(summary.AVERAGE, method)]
        ok = group[group["status"] == "ok"]
        per_task = ok.groupby("task")["metric"].mean()
        complete = set(per_task.index) == set(tasks)
        per_seed = ok.pivot_table(index="seed", columns="task", values="metric").dropna().mean(axis=1)
        mean, std = shown_metric(row["metric"])
        assert close(mean, per_task.mean() if complete else None, 1e-4), (method, row)
        assert close(std, per_seed.std(ddof=1) if complete and len(per_seed) > 1 else None, 1e-4)
        for i, task in enumerate(summary.summarize(FIXTURE).header["tasks"]):
            assert close(shown_metric(row[f"task-{i}"])[0], per_task.get(task), 1e-4)
        if len(ok):
            peak, unit, _ = shown_bytes(row["peak"])
            assert close(peak, ok.groupby("task")["modelled_peak_bytes"].mean().max(), 0.1 * unit)
            total = ok.groupby("task")["train_seconds"].mean().sum()
            assert close(float(row["time"].removesuffix(" s").replace(",", "")), total, 0.1)

    # Cells that did not finish are listed one by one, with their status and message.
    failed = frame[frame["status"] != "ok"]
    listed = [r for (scope, _), rows in seen.rows.items() if scope == "failed" for r in rows]
    assert len(listed) == len(failed)
    assert sorted((r["task"], r["method"], int(r["seed"]), r["status"]) for r in listed) == sorted(
        zip(failed["task"], failed["method"], failed["seed"], failed["status"])
    )
    assert all(r["error"] not in ("", "—") for r in listed)


@needs_chromium
def test_console_detector_sees_errors(tmp_path):
    """The check above can fail: a page with a script error is caught."""
    page = tmp_path / "bad.html"
    page.write_text("<!DOCTYPE html><html><body><script>undefinedFunction();</script></body></html>")
    _, console = run_chromium(page, tmp_path)
    assert any("undefinedFunction" in line for line in console)


def test_frontier_rows_are_highlighted_in_both_formats(written):
    page = (written / report.HTML_NAME).read_text()
    found = summary.summarize(FIXTURE)
    front = found.per_task[found.per_task["pareto"]]
    assert len(front) >= 2
    for row in front.to_dict("records"):
        assert re.search(
            rf'<tr class="frontier" data-scope="{re.escape(row["task"])}" data-method="{re.escape(row["method"])}"',
            page,
        )
    markdown = (written / report.MARKDOWN_NAME).read_text()
    for name in ("pareto_memory", "metric_vs_params", "metric_vs_throughput", "memory_breakdown"):
        assert f"]({name}.png)" in markdown
        assert (written / f"{name}.png").stat().st_size > 10_000 and (written / f"{name}.svg").is_file()
    assert "**" + markdown_cell(front["method"].iloc[0]) + "**" in markdown


def test_header_says_what_was_run(written, frame):
    page = (written / report.HTML_NAME).read_text()
    record = results.read_record(next(FIXTURE.glob("*.json")))
    for text in (
        "report-fixture",
        record["env"]["device"],
        f"torch {record['env']['packages']['torch']}",
        record["cell"]["backbone_description"],
        "24 (",
        "2 seeds",
    ):
        assert report.esc(text) in page, text


def test_user_data_is_escaped(tmp_path):
    hostile = tmp_path / "results"
    hostile.mkdir()
    for i, path in enumerate(sorted(FIXTURE.glob("sst2__*seed0.json"))[:3]):
        record = json.loads(path.read_text())
        # A "$" would start matplotlib's mathtext, and "$x^$" is not valid mathtext.
        record["cell"]["label"] = "<script>alert(1)</script>" if i == 0 else f"m{i} | *x* $x^$"
        record["cell"]["task"]["name"] = "<img src=x onerror=alert(2)>"
        record["status"] = "ok" if i else "failed"
        record["error"] = None if i else {"type": "X", "message": "</td><script>alert(3)</script>"}
        (hostile / path.name).write_text(json.dumps(record))
    path = report.write_report(hostile, tmp_path / "out")
    page = path.read_text()
    assert "<script>alert" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;img src=x onerror=alert(2)&gt;" in page
    assert "&lt;/td&gt;&lt;script&gt;alert(3)&lt;/script&gt;" in page
    assert page.count("<script") == 1  # only the sorting script
    markdown = (tmp_path / "out" / report.MARKDOWN_NAME).read_text()
    assert "<script>" not in markdown and "<img" not in markdown
    assert "m1 \\| \\*x\\* $x^$" in markdown  # a pipe cannot break the table, stars cannot make italics


def test_a_run_where_nothing_finished_is_still_reported(tmp_path):
    failed = tmp_path / "results"
    failed.mkdir()
    for path in FIXTURE.glob("*time-limit*.json"):
        shutil.copy(path, failed)
    page = report.write_report(failed, tmp_path / "out").read_text()
    assert (
        page.count('<span class="status">timeout</span>') == 4 + 2 + 1
    )  # failed table (4 cells), per task (2), across tasks (1)
    assert "no finished method" in page


def test_frontier_minimises_a_lower_is_better_metric(tmp_path):
    mse = {"linear_probe": 0.5, "bitfit": 0.4, "full": 0.6}  # bitfit: better and dearer; full: worse and dearest
    for name, value in mse.items():
        record = json.loads((FIXTURE / f"stsb__{name}__seed0.json").read_text())
        record["cell"]["task"].update(metrics=["mse"], primary_metric="mse")
        record["metrics"] = {"mse": {"value": value, "higher_is_better": False}}
        (tmp_path / f"stsb__{name}__seed0.json").write_text(json.dumps(record))
    table = summary.summarize(tmp_path).per_task.set_index("method")
    assert table["pareto"].to_dict() == {"linear_probe": True, "bitfit": True, "full": False}


def test_peak_memory_prefers_device_figures():
    row = {"peak_gpu_allocated_bytes": 3.0, "nvml_peak_bytes": 2.0, "modelled_peak_bytes": 1.0}
    assert summary.peak_memory(row) == (3.0, "CUDA allocated")
    assert summary.peak_memory({**row, "peak_gpu_allocated_bytes": None}) == (2.0, "NVML")
    assert summary.peak_memory({**row, "peak_gpu_allocated_bytes": float("nan"), "nvml_peak_bytes": None}) == (
        1.0,
        "modelled",
    )
    assert summary.peak_memory({"nvml_peak_bytes": 5.0, "nvml_source": "device_minus_baseline"}) == (5.0, "NVML device")
    value, source = summary.peak_memory({})
    assert math.isnan(value) and source is None


def test_family_of_a_stack():
    info = lambda *families: {"method_info": [{"ref": f, "family": f} for f in families]}
    assert results.stack_family(info("PETL", "METL")) == "METL"
    assert results.stack_family(info("baseline", "PETL")) == "PETL"
    assert results.stack_family(info("baseline")) == "baseline"
    assert results.stack_family({}) is None


def test_report_of_nothing_is_a_user_error(tmp_path, capsys):
    with pytest.raises(UserError):
        summary.summarize(tmp_path)
    assert cli.main(["report", str(tmp_path / "missing")]) == 2
    assert cli.main(["report", str(tmp_path)]) == 2
    assert capsys.readouterr().err.count("\n") == 2  # one line each


def test_run_writes_the_report_and_a_failing_report_changes_nothing(tmp_path, monkeypatch, capsys):
    from harness import runner

    suite_file = FIXTURE.parent / "suite.yaml"
    records = [results.read_record(p) for p in sorted(FIXTURE.glob("*.json"))]
    monkeypatch.setattr(runner, "run_suite", lambda *args, **kwargs: records)  # the run itself is tested elsewhere
    monkeypatch.chdir(tmp_path)
    calls = []
    monkeypatch.setattr(report, "write_report", lambda src, out: calls.append((src, out)) or Path(out) / "report.html")
    args = ["run", str(suite_file), "--out", str(tmp_path / "res")]
    assert cli.main(args) == 1  # some cells did not finish
    assert calls == [(tmp_path / "res", Path("reports") / "report-fixture")]
    assert cli.main(args + ["--no-report"]) == 1 and len(calls) == 1

    def broken(src, out):
        raise RuntimeError("disk full")

    monkeypatch.setattr(report, "write_report", broken)
    assert cli.main(args) == 1
    assert "warning: the report failed (RuntimeError: disk full)" in capsys.readouterr().err


def test_default_out_dir_is_named_after_the_suite():
    assert report.default_out_dir(FIXTURE) == Path("reports") / "report-fixture"
