"""Regression gate: compare a run's result records with a baseline's, cell by cell.

Each side is a results directory (what `harness run` writes) or a baseline
file written by `export`. Cells are matched by (task, method label, seed), and
each gated figure (see harness/gate.py) is judged against its group's
tolerance: regressed, improved or unchanged. A cell that was ok and is now not
(failed, oom, diverged, ...) is a regression. A cell the current run lacks
fails the gate too, since the gate can no longer vouch for it; a cell new in
the current run is reported and passes (refresh the baseline to gate it).
"""

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from harness import gate, results
from harness.errors import UserError
from harness.formatting import format_bytes, is_missing, markdown_cell

REGRESSED, IMPROVED, UNCHANGED = "regressed", "improved", "unchanged"
STATUS_CHANGED, MISSING_IN_BASELINE, MISSING_IN_CURRENT = "status-changed", "missing-in-baseline", "missing-in-current"
OUTCOMES = (REGRESSED, STATUS_CHANGED, MISSING_IN_CURRENT, IMPROVED, MISSING_IN_BASELINE, UNCHANGED)


# ---------------------------------------------------------------- loading


def index(records: list[dict], where: str) -> dict[tuple, dict]:
    """Flat rows (results.to_row) keyed by (task, method label, seed)."""
    rows = {}
    for record in records:
        row = results.to_row(record)
        key = (row["task"], row["method"], row["seed"])
        if key in rows:
            raise UserError(
                where,
                f"two records for cell {results.cell_key(*key)}",
                "compare one suite's results directory at a time",
            )
        rows[key] = row
    return rows


def export(results_dir: str | Path, out_file: str | Path) -> int:
    """Write every record of `results_dir` into one baseline file; returns how many."""
    records = results.read_records(results_dir)
    index(records, str(results_dir))  # refuses duplicate cells, as compare would
    results.write_export(records, results_dir, Path(out_file))
    return len(records)


# ---------------------------------------------------------------- judging


@dataclass
class Finding:
    """One row of the table: a figure or a whole cell that is not unchanged."""

    cell: str
    outcome: str
    fails: bool
    figure: str = "-"
    baseline: str = "-"
    current: str = "-"
    change: str = "-"
    tolerance: str = "-"


@dataclass
class Comparison:
    baseline: str
    current: str
    settings: dict
    cells: dict[str, str] = field(default_factory=dict)  # cell name -> its outcome
    findings: list[Finding] = field(default_factory=list)
    notes: dict[str, list[str]] = field(default_factory=dict)  # note -> the cells it applies to
    figures_compared: int = 0
    version_changes: list[str] = field(default_factory=list)  # "package baseline -> current", where they differ

    @property
    def failed(self) -> bool:
        return any(f.fails for f in self.findings)

    def note(self, message: str, cell: str):
        cells = self.notes.setdefault(message, [])
        if cell not in cells:
            cells.append(cell)


def _number(value) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):  # None, or not a number
        return None
    return None if is_missing(value) else value


def _show(group: str, value: float) -> str:
    if group == "metric":
        return f"{value:.4f}"
    if group == "time":
        return f"{value:.3f} s"
    return format_bytes(value, decimals=2)


def _tolerance_text(group: str, tolerance: float) -> str:
    return f"{tolerance:g} pt" if group == "metric" else f"{tolerance:g}%"


def _judge_figure(result: Comparison, name: str, figure: str, base: dict, cur: dict) -> str | None:
    """The figure's outcome (adding a Finding unless unchanged), or None when it cannot be compared."""
    group = gate.group_of(figure)
    tolerance = result.settings[f"{group}_tolerance"]
    if tolerance is None:
        return None
    b, c = _number(base.get(figure)), _number(cur.get(figure))
    if b is None or c is None:
        if (b is None) != (c is None):
            result.note(f"{figure} not compared: only the {'baseline' if c is None else 'current run'} has it", name)
        return None
    label = figure
    if group == "metric":
        if base["metric_name"] != cur["metric_name"]:
            result.note(
                f"metric not compared: the primary metric changed ({base['metric_name']} -> {cur['metric_name']})", name
            )
            return None
        label = cur["metric_name"]
        higher_is_better = cur.get("higher_is_better") is not False
        change = (c - b) * 100  # points
        change_text = f"{change:+.2f} pt"
    else:
        if group == "time" and base.get("device") != cur.get("device"):
            result.note(f"time not compared: the devices differ ({base.get('device')} vs {cur.get('device')})", name)
            return None
        backends = base.get("attention_backend"), cur.get("attention_backend")
        if group == "memory" and None not in backends and backends[0] != backends[1]:
            result.note(f"memory not compared: the attention backends differ ({backends[0]} vs {backends[1]})", name)
            return None
        higher_is_better = False
        if b:
            change = (c - b) / abs(b) * 100  # percent of the baseline
            change_text = (
                f"{change:+.1f}%" if abs(change) >= 0.05 or not change else f"{change:+.1g}%"
            )  # tiny moves stay visible
        else:
            change = 0.0 if c == b else math.copysign(math.inf, c - b)
            change_text = "from 0" if change else "+0%"
    result.figures_compared += 1
    worse_by = -change if higher_is_better else change
    outcome = REGRESSED if worse_by > tolerance else IMPROVED if -worse_by > tolerance else UNCHANGED
    if outcome != UNCHANGED:
        result.findings.append(
            Finding(
                name,
                outcome,
                outcome == REGRESSED,
                label,
                _show(group, b),
                _show(group, c),
                change_text,
                _tolerance_text(group, tolerance),
            )
        )
    return outcome


def _judge_cell(result: Comparison, name: str, base: dict | None, cur: dict | None) -> str:
    if base is None:
        result.findings.append(Finding(name, MISSING_IN_BASELINE, False, current=cur["status"]))
        return MISSING_IN_BASELINE
    if cur is None:
        result.findings.append(Finding(name, MISSING_IN_CURRENT, True, baseline=base["status"]))
        return MISSING_IN_CURRENT
    if base["status"] != "ok" or cur["status"] != "ok":
        if base["status"] == cur["status"]:
            return UNCHANGED
        result.findings.append(
            Finding(name, STATUS_CHANGED, base["status"] == "ok", "status", base["status"], cur["status"])
        )
        if cur.get("error"):
            result.note(f"{cur['status']}: {' '.join(str(cur['error']).split())[:200]}", name)  # one line
        return STATUS_CHANGED
    if base.get("config_hash") != cur.get("config_hash"):
        result.note(
            "settings differ from the baseline's (config hash); refresh the baseline if the change is intended", name
        )
    outcomes = {_judge_figure(result, name, figure, base, cur) for figure in result.settings["figures"]}
    return REGRESSED if REGRESSED in outcomes else IMPROVED if IMPROVED in outcomes else UNCHANGED


def package_versions(records: list[dict]) -> dict[str, str]:
    """Each package's version over a side's records ('a or b' where records disagree)."""
    seen: dict[str, set] = {}
    for record in records:
        for name, version in ((record.get("env") or {}).get("packages") or {}).items():
            seen.setdefault(name, set()).add(str(version))
    return {name: " or ".join(sorted(versions)) for name, versions in sorted(seen.items())}


def version_changes(base_records: list[dict], cur_records: list[dict]) -> list[str]:
    base, cur = package_versions(base_records), package_versions(cur_records)
    return [
        f"{name} {base.get(name, 'absent')} -> {cur.get(name, 'absent')}"
        for name in sorted(base.keys() | cur.keys())
        if base.get(name) != cur.get(name)
    ]


def compare(baseline: str | Path, current: str | Path, settings: dict) -> Comparison:
    """Judge every cell of `current` against `baseline` under resolved gate settings (gate.resolve)."""
    base_records, cur_records = results.read_records(baseline), results.read_records(current)
    base_rows = index(base_records, str(baseline))
    cur_rows = index(cur_records, str(current))
    result = Comparison(
        str(baseline), str(current), settings, version_changes=version_changes(base_records, cur_records)
    )
    for key in sorted(base_rows.keys() | cur_rows.keys(), key=lambda k: (k[0], k[1], k[2])):
        name = results.cell_key(*key)
        result.cells[name] = _judge_cell(result, name, base_rows.get(key), cur_rows.get(key))
    result.findings.sort(key=lambda f: not f.fails)  # failures first; stable, so cell and figure order stay
    return result


# ---------------------------------------------------------------- output

COLUMNS = ("gate", "outcome", "cell", "figure", "baseline", "current", "change", "tolerance")


def _headline(result: Comparison) -> tuple[str, str]:
    counts = Counter(result.cells.values())
    summary = ", ".join(f"{counts[o]} {o}" for o in OUTCOMES if counts[o])
    verdict = "FAIL" if result.failed else "PASS"
    return verdict, f"{len(result.cells)} cells: {summary}; {result.figures_compared} figures compared"


def _settings_text(settings: dict) -> str:
    parts = []
    for group, how in (("memory", "relative"), ("metric", "absolute, 1 pt = 0.01"), ("time", "relative")):
        tolerance = settings[f"{group}_tolerance"]
        parts.append(f"{group} off" if tolerance is None else f"{group} {_tolerance_text(group, tolerance)} ({how})")
    text = "tolerances: " + ", ".join(parts)
    if tuple(settings["figures"]) != gate.FIGURES:
        text += f"; figures: {', '.join(settings['figures'])}"
    return text


def _versions_text(result: Comparison) -> str:
    return "package versions differ from the baseline's: " + ", ".join(result.version_changes)


def _rows(result: Comparison) -> list[tuple[str, ...]]:
    return [
        ("FAIL" if f.fails else "ok", f.outcome, f.cell, f.figure, f.baseline, f.current, f.change, f.tolerance)
        for f in result.findings
    ]


def _note_lines(result: Comparison) -> list[str]:
    lines = []
    for message, cells in result.notes.items():
        shown = ", ".join(cells[:4]) + (f" and {len(cells) - 4} more" if len(cells) > 4 else "")
        lines.append(f"{message} [{shown}]")
    return lines


def render_text(result: Comparison) -> str:
    verdict, summary = _headline(result)
    lines = [f"{verdict}: {result.baseline} -> {result.current}", summary, _settings_text(result.settings)]
    if result.version_changes:
        lines.append(_versions_text(result))
    lines.append("")
    rows = _rows(result)
    if rows:
        widths = [max(len(r[i]) for r in [COLUMNS, *rows]) for i in range(len(COLUMNS))]
        for row in [COLUMNS, *rows]:
            lines.append("  ".join(value.ljust(w) for value, w in zip(row, widths)).rstrip())
    else:
        lines.append("no figure moved beyond its tolerance")
    notes = _note_lines(result)
    if notes:
        lines += ["", "notes:"] + [f"  - {n}" for n in notes]
    return "\n".join(lines)


def render_markdown(result: Comparison) -> str:
    verdict, summary = _headline(result)
    lines = [
        f"### Regression gate: {verdict}",
        "",
        f"`{result.baseline}` -> `{result.current}`: {summary}.",
        "",
        _settings_text(result.settings),
        "",
    ]
    if result.version_changes:
        lines += [markdown_cell(_versions_text(result)), ""]
    rows = _rows(result)
    if rows:
        lines.append("| " + " | ".join(COLUMNS) + " |")
        lines.append("|" + "---|" * len(COLUMNS))
        lines += ["| " + " | ".join(markdown_cell(v) for v in row) + " |" for row in rows]
    else:
        lines.append("No figure moved beyond its tolerance.")
    notes = _note_lines(result)
    if notes:
        lines += ["", "Notes:", ""] + [f"- {markdown_cell(n)}" for n in notes]
    return "\n".join(lines)
