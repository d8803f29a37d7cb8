"""Write a suite's report from its results folder: report.html, report.md and the figures.

report.html is one self-contained page (figures embedded as PNG, CSS and a few
lines of JS inline, nothing fetched) with sortable tables and the Pareto rows
highlighted; report.md carries the same tables with links to the PNG files
beside it, for a pull-request comment. Every value that comes from the records
(labels, task names, messages) is escaped: html.escape for the page, a
Markdown escape for the comment. The numbers come from harness.summary.
"""

import base64
import html
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from harness import plots
from harness.formatting import MISSING, format_bytes, is_missing, markdown_cell
from harness.summary import AVERAGE, Summary, summarize

HTML_NAME, MARKDOWN_NAME = "report.html", "report.md"
FRONTIER_MARK = "★"


# ---------------------------------------------------------------- formatting


def fmt_metric(mean, std=float("nan")) -> str:
    if is_missing(mean):
        return MISSING
    return f"{mean:.4f}" + ("" if is_missing(std) else f" ± {std:.4f}")


def fmt_params(count, pct) -> str:
    if is_missing(count):
        return MISSING
    return f"{count:,.0f}" + ("" if is_missing(pct) else f" ({pct:.3g}%)")


def fmt_number(value, digits=1, suffix="") -> str:
    return MISSING if is_missing(value) else f"{value:,.{digits}f}{suffix}"


def fmt_peak(value, source) -> str:
    return format_bytes(value) + ("" if is_missing(value) or not source else f" · {source}")


@dataclass(frozen=True)
class Column:
    key: str  # CSS class col-<key>; what tests look for
    header: str
    text: Callable[[dict], str]  # the shown text of a row's cell
    sort: Callable[[dict], object]  # the value a click sorts by (numbers as numbers)
    title: str = ""  # tooltip: what the number is


def _status_sort(row):
    return 0 if row["status"] == "ok" else 1


def common_columns(metric_header: str, scope: str) -> list[Column]:
    across = scope == AVERAGE
    return [
        Column(
            "pareto",
            FRONTIER_MARK,
            lambda r: FRONTIER_MARK if r["pareto"] else "",
            lambda r: 0 if r["pareto"] else 1,
            "on the Pareto frontier of score vs peak memory",
        ),
        Column("method", "method", lambda r: str(r["method"]), lambda r: str(r["method"]), "label of the suite entry"),
        Column("family", "family", lambda r: str(r["family"]), lambda r: str(r["family"]), "baseline, PETL or METL"),
        Column("status", "status", lambda r: str(r["status"]), _status_sort, "ok, or how many cells ended how"),
        Column(
            "metric",
            metric_header,
            lambda r: fmt_metric(r["metric_mean"], r["metric_std"]),
            lambda r: r["metric_mean"],
            "mean ± sample std over seeds that finished",
        ),
        Column(
            "peak",
            "peak memory",
            lambda r: fmt_peak(r["peak_bytes"], r["peak_source"]),
            lambda r: r["peak_bytes"],
            ("largest over tasks; " if across else "")
            + "best figure the device gave: CUDA max allocated, else NVML peak, else modelled (CPU); "
            + "planned: a plan's modelled peak (harness plan, no training)",
        ),
        Column(
            "activations",
            "activations",
            lambda r: format_bytes(r["activation_bytes"]),
            lambda r: r["activation_bytes"],
            ("largest over tasks; " if across else "") + "bytes saved for backward per step (exact)",
        ),
        Column(
            "trainable",
            "trainable params",
            lambda r: fmt_params(r["trainable_params"], r["trainable_pct"]),
            lambda r: r["trainable_params"],
            ("largest over tasks; " if across else "") + "count (% of all parameters)",
        ),
        Column(
            "throughput",
            "train samples/s",
            lambda r: fmt_number(r["train_samples_per_s"]),
            lambda r: r["train_samples_per_s"],
            ("mean over tasks; " if across else "") + "after warm-up steps",
        ),
        Column(
            "time",
            "train time" + (" (all tasks)" if across else ""),
            lambda r: fmt_number(r["train_seconds"], 1, " s"),
            lambda r: r["train_seconds"],
            ("sum over tasks; " if across else "") + "wall time of the training phase",
        ),
    ]


def overall_columns(summary: Summary) -> list[Column]:
    columns = common_columns("average score", AVERAGE)
    tasks = summary.header["tasks"]
    per_task = [
        Column(
            f"task-{i}",
            task,
            lambda r, t=task: fmt_metric(r[f"task:{t}"]),
            lambda r, t=task: r[f"task:{t}"],
            f"{task}: mean of the primary metric over seeds",
        )
        for i, task in enumerate(tasks)
    ]
    return columns[:5] + per_task + columns[5:]


def task_columns(frame: pd.DataFrame) -> list[Column]:
    metric = frame["metric_name"].dropna().iloc[0] if frame["metric_name"].notna().any() else "metric"
    columns = common_columns(metric, "task")
    columns.insert(5, Column("n", "n", lambda r: str(r["seeds_ok"]), lambda r: r["seeds_ok"], "seeds that finished"))
    if (frame["chosen"] != "").any():
        columns.insert(
            6,
            Column(
                "chosen",
                "selected point",
                lambda r: r["chosen"] + (f" (edge: {r['grid_edge']})" if r["grid_edge"] else ""),
                lambda r: r["chosen"],
                "the sweep point with the best mean dev score over seeds; edge: best at the end of its grid",
            ),
        )
    return columns


def glance(summary: Summary) -> tuple[str, list[tuple[str, str]]]:
    """(scope title, [(method, what it buys)]) of the frontier where the decision is made."""
    if len(summary.overall):
        frame, title = summary.overall, "average over tasks"
    else:
        task = summary.header["tasks"][0]
        frame, title = summary.per_task[summary.per_task["task"] == task], task
    front = frame[frame["pareto"]].sort_values("peak_bytes")
    return title, [
        (str(r["method"]), f"{fmt_metric(r['metric_mean'])} at {fmt_peak(r['peak_bytes'], r['peak_source'])}")
        for r in front.to_dict("records")
    ]


def paired_columns() -> list[Column]:
    return [
        Column("task", "task", lambda r: str(r["task"]), lambda r: str(r["task"])),
        Column("method", "method", lambda r: str(r["method"]), lambda r: str(r["method"])),
        Column("score", "score", lambda r: fmt_metric(r["score"]), lambda r: r["score"], "mean eval score over seeds"),
        Column(
            "difference",
            "minus best",
            lambda r: "best" if r["best"] else f"{r['difference']:+.4f}",
            lambda r: r["difference"],
        ),
        Column(
            "interval",
            "95% interval",
            lambda r: "" if r["best"] else f"[{r['low']:+.4f}, {r['high']:+.4f}]",
            lambda r: r["low"],
            "2.5th and 97.5th percentiles of the paired difference over resamples",
        ),
        Column(
            "distinguishable",
            "distinguishable",
            lambda r: "" if r["best"] else ("yes" if r["distinguishable"] else "no"),
            lambda r: 0 if r["distinguishable"] else 1,
            "whether the interval excludes 0",
        ),
        Column("examples", "examples", lambda r: str(r["examples"]), lambda r: r["examples"], "eval examples"),
    ]


def sweep_columns() -> list[Column]:
    return [
        Column("task", "task", lambda r: str(r["task"]), lambda r: str(r["task"])),
        Column("method", "method", lambda r: str(r["entry"]), lambda r: str(r["entry"]), "the suite's entry"),
        Column("point", "point", lambda r: r["point_label"].partition("@")[2], lambda r: r["point_label"]),
        Column(
            "dev",
            "dev score",
            lambda r: fmt_metric(r["dev_mean"], r["dev_std"]),
            lambda r: r["dev_mean"],
            "mean ± std over seeds that finished, on the dev data",
        ),
        Column("n", "n", lambda r: str(r["seeds_ok"]), lambda r: r["seeds_ok"], "seeds that finished"),
        Column(
            "selected",
            "selected",
            lambda r: ("yes" + (f" (edge: {r['grid_edge']})" if r["grid_edge"] else "")) if r["selected"] else "",
            lambda r: 0 if r["selected"] else 1,
            "the point the tables above report",
        ),
    ]


FAILED_TITLE = "Cells that did not finish (or were unsupported by the backbone)"


def failed_cells(summary: Summary) -> pd.DataFrame:
    cells = summary.cells[summary.cells["status"] != "ok"]
    return cells.sort_values(["task", "method", "seed"])[["task", "method", "seed", "status", "error"]]


def failed_columns() -> list[Column]:
    return [
        Column(k, k, lambda r, k=k: MISSING if is_missing(r[k]) else str(r[k]), lambda r, k=k: r[k])
        for k in ("task", "method", "seed", "status", "error")
    ]


def _count(items, noun: str) -> str:
    return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"


def header_items(summary: Summary, generated: str) -> list[tuple[str, str]]:
    h = summary.header
    statuses = ", ".join(f"{n} {s}" for s, n in h["statuses"].items())
    dates = f"{h['run_dates'][0]} → {h['run_dates'][1]}" if h["run_dates"] else "unknown"
    return [
        ("suite", h["suite"]),
        ("backbone", "; ".join(h["backbone"]) or "unknown"),
        ("device", "; ".join(h["device"]) or "unknown"),
        (
            "cells",
            f"{h['cells']} ({statuses}): {_count(h['tasks'], 'task')} × {_count(h['methods'], 'method')} × "
            f"{_count(h['seeds'], 'seed')}",
        ),
        ("git commit", "; ".join(h["git_commit"]) or "unknown (not run from a git checkout)"),
        (
            "packages",
            ", ".join(f"{name} {'/'.join(v)}" for name, v in h["packages"].items())
            + (f", python {'/'.join(h['python'])}" if h["python"] else ""),
        ),
        ("run", dates),
        ("report generated", generated),
    ]


# ---------------------------------------------------------------- HTML

CSS = """
:root { --ink:#1f2328; --muted:#59636e; --line:#d1d9e0; --front:#fff6d6; --front-line:#e3b341; }
* { box-sizing: border-box; }
body { font: 14px/1.45 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; color: var(--ink);
       margin: 0 auto; max-width: 1280px; padding: 24px 28px 48px; }
h1 { font-size: 24px; margin: 0 0 4px; } h2 { font-size: 18px; margin: 32px 0 8px; border-bottom: 1px solid var(--line);
       padding-bottom: 4px; } h3 { font-size: 15px; margin: 20px 0 6px; }
.sub { color: var(--muted); margin: 0 0 16px; }
dl.meta { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 0; font-size: 13px; }
dl.meta dt { color: var(--muted); } dl.meta dd { margin: 0; word-break: break-word; }
.glance { background: #f6f8fa; border: 1px solid var(--line); border-radius: 8px; padding: 12px 16px; margin: 16px 0; }
.glance ol { margin: 6px 0 0; padding-left: 22px; }
table { border-collapse: collapse; font-size: 13px; margin: 6px 0 10px; }
th, td { padding: 5px 10px; border-bottom: 1px solid var(--line); text-align: right; white-space: nowrap; }
th { background: #f6f8fa; position: sticky; top: 0; cursor: pointer; user-select: none; font-weight: 600; }
th:hover { background: #eaeef2; }
th[aria-sort="ascending"]::after { content: " ▲"; font-size: 10px; }
th[aria-sort="descending"]::after { content: " ▼"; font-size: 10px; }
.col-method, .col-family, .col-status, .col-error, .col-task { text-align: left; }
td.col-error { white-space: normal; max-width: 560px; color: #6e2b2b; }
td.col-pareto { color: #b08800; text-align: center; }
tr.frontier td { background: var(--front); } tr.frontier td:first-child { box-shadow: inset 3px 0 var(--front-line); }
tbody tr:hover td { background: #eef4ff; }
.status { border-radius: 10px; padding: 1px 8px; font-size: 12px; background: #fde2e1; color: #82071e; }
.status.ok { background: #dafbe1; color: #116329; }
.fam { display: inline-block; width: 9px; height: 9px; border-radius: 2px; margin-right: 6px; }
figure { margin: 10px 0 22px; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; border-radius: 6px; }
figcaption { color: var(--muted); font-size: 13px; }
.scroll { overflow-x: auto; }
.notes { color: var(--muted); font-size: 13px; } .notes li { margin: 2px 0; }
.warn { color: #82071e; }
"""

SORT_JS = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  var heads = table.tHead.rows[0].cells;
  Array.prototype.forEach.call(heads, function (th, col) {
    th.tabIndex = 0;
    function sort() {
      var ascending = th.getAttribute("aria-sort") !== "ascending";
      Array.prototype.forEach.call(heads, function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = a.cells[col].getAttribute("data-v"), y = b.cells[col].getAttribute("data-v");
        if (x === "" || y === "") { return (x === "") - (y === ""); }  /* no value: last either way */
        var nx = Number(x), ny = Number(y);
        var order = isNaN(nx) || isNaN(ny) ? x.localeCompare(y) : nx - ny;
        return ascending ? order : -order;
      });
      rows.forEach(function (row) { body.appendChild(row); });
    }
    th.addEventListener("click", sort);
    th.addEventListener("keydown", function (e) {
      if (e.key === "Enter" || e.key === " ") { e.preventDefault(); sort(); }
    });
  });
});
"""


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def _sort_value(value) -> str:
    if is_missing(value):
        return ""
    if isinstance(value, bool):
        return str(int(value))
    return repr(float(value)) if isinstance(value, (int, float)) else str(value)


def html_cell(column: Column, row: dict) -> str:
    text = column.text(row)
    if column.key == "status":
        text_html = f'<span class="status{" ok" if text == "ok" else ""}">{esc(text)}</span>'
    elif column.key == "family":
        colour = plots.FAMILY_STYLE.get(text, plots.FAMILY_STYLE["unknown"])[0]
        text_html = f'<span class="fam" style="background:{colour}"></span>{esc(text)}'
    else:
        text_html = esc(text)
    return f'<td class="col-{column.key}" data-v="{esc(_sort_value(column.sort(row)))}">{text_html}</td>'


def html_table(frame: pd.DataFrame, columns: list[Column], scope: str) -> str:
    head = "".join(f'<th class="col-{c.key}" title="{esc(c.title)}" scope="col">{esc(c.header)}</th>' for c in columns)
    rows = []
    for row in frame.to_dict("records"):
        cls = ' class="frontier"' if row.get("pareto") else ""
        cells = "".join(html_cell(c, row) for c in columns)
        rows.append(f'<tr{cls} data-scope="{esc(scope)}" data-method="{esc(row["method"])}">{cells}</tr>')
    return (
        f'<div class="scroll"><table class="sortable" data-scope="{esc(scope)}"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )


def failed_html(frame: pd.DataFrame) -> str:
    if not len(frame):
        return "<p>Every cell finished.</p>"
    columns = failed_columns()
    head = "".join(f'<th class="col-{c.key}" scope="col">{esc(c.header)}</th>' for c in columns)
    body = "".join(
        f'<tr data-scope="failed" data-method="{esc(r["method"])}">'
        + "".join(html_cell(c, r) for c in columns)
        + "</tr>"
        for r in frame.to_dict("records")
    )
    table = f'<table class="sortable" id="failed"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
    return f'<div class="scroll">{table}</div>'


def figure_html(out_dir: Path, name: str, title: str, caption: str) -> str:
    data = base64.b64encode((out_dir / f"{name}.png").read_bytes()).decode("ascii")
    return (
        f'<figure id="fig-{esc(name)}"><img alt="{esc(title)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{esc(caption)}</figcaption></figure>"
    )


CAPTIONS = {
    "pareto_memory": "Each point is a method (mean over seeds; bars: ± std). Ringed points and the dashed "
    "staircase are the Pareto frontier: no other method scores at least as well for less memory.",
    "metric_vs_params": "Score against the number of trained parameters (log scale); frontier as above, for this cost.",
    "metric_vs_throughput": "Score against training samples per second (higher is better); frontier as above.",
    "memory_breakdown": "What each method's modelled training memory is made of, per task (mean over seeds). "
    "Black diamonds: device-measured peak, where the device gave one.",
    "sweeps": "Each swept method's dev score (mean over seeds; bars: ± std) against each swept value, per task; "
    "the ringed point is the one selected, and its eval score is the one the tables show. A selected point at "
    "the end of its grid suggests the best lies beyond it.",
}
SWEEP_TITLE = "Sweeps: selection on dev data"
PAIRED_TITLE = "Paired comparison with the best (95% paired bootstrap over eval examples)"
PAIRED_NOTE = (
    "Per task, each method's eval score (mean over seeds) minus the best's, and the 95% interval of that difference "
    "over bootstrap resamples of the eval examples, the same resamples for every method. 'no' under "
    "distinguishable: the interval holds 0, so this method and the best cannot be told apart at this level."
)

NOTES = [
    "Score: the task's primary metric on the evaluation split, mean ± sample standard deviation over the seeds that "
    "finished (n); the across-task score is the GLUE-style average of the per-task means. For a swept method, the "
    "tables show the point with the best mean score on dev data held out from the training data (never the "
    "evaluation split), per task; its values are the selected point.",
    "Peak memory: CUDA max_memory_allocated over training when run on a GPU, else the NVML peak, else the modelled "
    "peak (weights + buffers + gradients + optimizer state + saved activations), which leaves out framework "
    "temporaries; the label beside each figure says which. `planned` marks a plan's figure (python -m harness "
    "plan): the same modelled peak, from the first training steps run on fake tensors, nothing trained.",
    "Activations: bytes of distinct tensors saved for backward in one step, parameters excluded (exact on any device).",
    "Throughput and time: samples per second over the timed steps (warm-up left out) and wall time of the "
    "training phase.",
    "Cost figures are means over the seeds that finished; a method that failed on every seed has none, and its "
    "status says why.",
]


def render_html(summary: Summary, figures: dict, out_dir: Path, generated: str) -> str:
    h = summary.header
    meta = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in header_items(summary, generated))
    scope_title, front = glance(summary)
    glance_items = (
        "".join(f"<li><b>{esc(m)}</b>: {esc(what)}</li>" for m, what in front) or "<li>no finished method</li>"
    )
    parts = [
        f"<h1>{esc(h['suite'])}: which method, at what cost</h1>",
        f'<p class="sub">PETL/METL benchmark report — {esc(", ".join(h["tasks"]))}</p>',
        f'<dl class="meta">{meta}</dl>',
        f'<div class="glance"><b>Pareto frontier, score vs peak memory ({esc(scope_title)})</b>, cheapest first: '
        f"every other method scores less for as much memory or more.<ol>{glance_items}</ol></div>",
    ]
    if summary.broken:
        parts.append(
            f'<p class="warn">{len(summary.broken)} files under the results folder are not readable records '
            f"and are left out: {esc('; '.join(why for _, why in summary.broken))}</p>"
        )
    parts.append(figure_html(out_dir, "pareto_memory", figures["pareto_memory"], CAPTIONS["pareto_memory"]))
    if len(summary.overall):
        parts += ["<h2>Across tasks</h2>", html_table(summary.overall, overall_columns(summary), AVERAGE)]
    elif summary.average_note:
        parts.append(f"<p>{esc(summary.average_note)}</p>")
    parts.append("<h2>Per task</h2>")
    for task, frame in summary.per_task.groupby("task", sort=False):
        parts += [f"<h3>{esc(task)}</h3>", html_table(frame, task_columns(frame), task)]
    if len(summary.paired):
        parts += [
            f"<h2>{PAIRED_TITLE}</h2>",
            f"<p>{esc(PAIRED_NOTE)}</p>",
            html_table(summary.paired.assign(pareto=False), paired_columns(), "paired"),
        ]
    parts.append("<h2>Costs</h2>")
    for name in ("metric_vs_params", "metric_vs_throughput", "memory_breakdown"):
        parts.append(figure_html(out_dir, name, figures[name], CAPTIONS[name]))
    if "sweeps" in figures:
        parts += [
            f"<h2>{SWEEP_TITLE}</h2>",
            figure_html(out_dir, "sweeps", figures["sweeps"], CAPTIONS["sweeps"]),
            html_table(summary.sweeps.assign(pareto=False, method=summary.sweeps["entry"]), sweep_columns(), "sweep"),
        ]
    parts += [f"<h2>{FAILED_TITLE}</h2>", failed_html(failed_cells(summary))]
    parts.append(
        '<h2>How to read the numbers</h2><ul class="notes">' + "".join(f"<li>{esc(n)}</li>" for n in NOTES) + "</ul>"
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(h['suite'])} report</title><style>{CSS}</style></head>\n<body>\n"
        + "\n".join(parts)
        + f"\n<script>{SORT_JS}</script>\n</body></html>\n"
    )


# ---------------------------------------------------------------- Markdown


def md_table(frame: pd.DataFrame, columns: list[Column]) -> str:
    lines = [
        "| " + " | ".join(markdown_cell(c.header) for c in columns) + " |",
        "|"
        + "|".join(":--" if c.key in ("method", "family", "status", "task", "error") else "--:" for c in columns)
        + "|",
    ]
    for row in frame.to_dict("records"):
        cells = [markdown_cell(c.text(row)) for c in columns]
        if row.get("pareto"):  # bold the frontier's method, as the page highlights its row
            cells[1] = f"**{cells[1]}**"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_markdown(summary: Summary, figures: dict, generated: str) -> str:
    h = summary.header
    out = [f"## {markdown_cell(h['suite'])}: which method, at what cost", ""]
    out += [f"- **{markdown_cell(k)}**: {markdown_cell(v)}" for k, v in header_items(summary, generated)]
    scope_title, front = glance(summary)
    out += [
        "",
        f"**Pareto frontier, score vs peak memory ({markdown_cell(scope_title)})**, cheapest first "
        f"({FRONTIER_MARK} in the tables):",
        "",
    ]
    out += [f"{i}. **{markdown_cell(m)}**: {markdown_cell(what)}" for i, (m, what) in enumerate(front, 1)] or [
        "no finished method"
    ]
    out += ["", f"![{figures['pareto_memory']}](pareto_memory.png)", ""]
    if len(summary.overall):
        out += ["### Across tasks", "", md_table(summary.overall, overall_columns(summary)), ""]
    elif summary.average_note:
        out += [markdown_cell(summary.average_note), ""]
    for task, frame in summary.per_task.groupby("task", sort=False):
        out += [f"### {markdown_cell(task)}", "", md_table(frame, task_columns(frame)), ""]
    if len(summary.paired):
        paired = md_table(summary.paired.assign(pareto=False), paired_columns())
        out += [f"### {PAIRED_TITLE}", "", PAIRED_NOTE, "", paired, ""]
    out += ["### Costs", ""] + [
        f"![{figures[n]}]({n}.png)" for n in ("metric_vs_params", "metric_vs_throughput", "memory_breakdown")
    ]
    if "sweeps" in figures:
        out += ["", f"### {SWEEP_TITLE}", "", f"![{figures['sweeps']}](sweeps.png)", ""]
        out += [md_table(summary.sweeps.assign(pareto=False), sweep_columns())]
    failed = failed_cells(summary)
    if len(failed):
        out += ["", f"### {FAILED_TITLE}", "", md_table(failed.assign(pareto=False), failed_columns())]
    if summary.broken:
        out += [
            "",
            f"{len(summary.broken)} unreadable files left out: "
            + markdown_cell("; ".join(w for _, w in summary.broken)),
        ]
    out += (
        ["", "<details><summary>How to read the numbers</summary>", ""]
        + [f"- {markdown_cell(n)}" for n in NOTES]
        + ["", "</details>", ""]
    )
    return "\n".join(out)


# ---------------------------------------------------------------- entry point


def default_out_dir(results_dir: str | Path) -> Path:
    """reports/<suite name>, the suite named by the records (the folder's name if they name none); for plans,
    reports/<suite name>-plan, beside the report of the suite's run."""
    from harness import results

    records = results.scan(results_dir).records
    suites = {r["cell"]["suite"] for r in records}
    if len(suites) != 1:
        return Path("reports") / Path(results_dir).name
    return Path("reports") / (suites.pop() + ("-plan" if all(r.get("plan") for r in records) else ""))


def write_report(results_dir: str | Path, out_dir: str | Path) -> Path:
    """Summarize, draw and write everything into out_dir; returns the HTML file's path."""
    out_dir = Path(out_dir)
    summary = summarize(results_dir)
    figures = plots.draw(summary, out_dir)
    generated = datetime.now(timezone.utc).isoformat(timespec="seconds")
    (out_dir / HTML_NAME).write_text(render_html(summary, figures, out_dir, generated), encoding="utf-8")
    (out_dir / MARKDOWN_NAME).write_text(render_markdown(summary, figures, generated), encoding="utf-8")
    return out_dir / HTML_NAME
