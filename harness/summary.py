"""Result records -> the tables a report shows: per task, and across tasks.

Reads records only (through harness.results); knows nothing of methods or training.

Per task and method entry, over the seeds of the sweep point selected on dev data (harness.selection; an entry
not swept is its own point):
- metric: mean and sample standard deviation (ddof=1; none with one seed) of the
  primary metric over the seeds that finished ("ok");
- cost figures (peak memory, activation bytes, memory breakdown, throughput,
  training time): the mean over the same seeds;
- status: "ok" when every seed is; otherwise the count of each status, so a
  failed, out-of-memory, diverged or timed-out cell stays visible.
Across tasks, per method (only when every primary metric is higher-is-better):
- score: the GLUE-style average of the per-task primary-metric means; its
  deviation is over seeds that finished on every task (average per seed first);
- peak memory and activation bytes: the largest over tasks (the budget that runs
  them all); trainable parameters: the largest over tasks (heads differ);
  throughput: the mean over tasks; training time: the sum over tasks.
Peak memory is the best figure the device gave, in this order: CUDA
max_memory_allocated, then NVML's peak, then the modelled peak (CPU runs); a
plan's (harness.plan) is its modelled peak, labelled "planned".
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from harness import pareto, results, selection
from harness.errors import UserError
from harness.formatting import is_missing
from harness.significance import paired_comparison

# (column, label) in order of preference; the label says where a peak figure came from.
PEAK_SOURCES = [
    ("peak_gpu_allocated_bytes", "CUDA allocated"),
    ("nvml_peak_bytes", "NVML"),
    ("modelled_peak_bytes", "modelled"),
]
# Stacked memory breakdown: (label, columns summed). Buffers are frozen state, shown with frozen weights.
BREAKDOWN = [
    ("frozen weights", ("frozen_param_bytes", "buffer_bytes")),
    ("trainable weights", ("trainable_param_bytes",)),
    ("gradients", ("grad_bytes",)),
    ("optimizer state", ("optimizer_bytes",)),
    ("activations", ("activation_bytes",)),
]
COST_COLUMNS = [
    "peak_bytes",
    "activation_bytes",
    "trainable_params",
    "total_params",
    "train_samples_per_s",
    "train_seconds",
] + [label for label, _ in BREAKDOWN]
AVERAGE = "average"  # the task name under which across-task figures are plotted


@dataclass
class Summary:
    cells: pd.DataFrame  # one row per record, with family, peak_bytes and peak_source filled in
    per_task: pd.DataFrame  # one row per (task, method)
    overall: pd.DataFrame  # one row per method, across tasks; empty with a single task or no average
    average_note: str | None  # why there is no across-task average, when there is none
    sweeps: pd.DataFrame  # one row per point of each swept entry and task: its mean dev score, and if selected
    paired: pd.DataFrame  # per task and method: difference from the best, 95% paired bootstrap (significance)
    header: dict  # what was run: suite, backbone, device, versions, commit, dates
    broken: list  # (path, why) of files that are not readable records


def peak_memory(row) -> tuple[float, str | None]:
    """(bytes, source label) of the best peak-memory figure a cell has."""
    if row.get("planned") is True:
        value = row.get("modelled_peak_bytes")
        return (float("nan"), None) if is_missing(value) else (float(value), "planned")
    for column, label in PEAK_SOURCES:
        value = row.get(column)
        if not is_missing(value):
            if column == "nvml_peak_bytes" and row.get("nvml_source") == "device_minus_baseline":
                label = "NVML device"
            return float(value), label
    return float("nan"), None


def summarize(directory: str | Path) -> Summary:
    found = results.scan(directory)
    if not found.records:
        why = f"; {len(found.broken)} unreadable files, e.g. {found.broken[0][1]}" if found.broken else ""
        raise UserError(
            str(directory), f"no result records found{why}", "give the folder `harness run` wrote (results/<suite>)"
        )
    suites = sorted({r["cell"]["suite"] for r in found.records})
    if len(suites) > 1:
        raise UserError(
            str(directory),
            f"holds records of several suites ({', '.join(suites)})",
            "report one suite's folder, e.g. results/<suite>",
        )
    cells = prepare_cells(results.to_frame(found.records))
    chosen = selected_points(cells)
    per_task = aggregate_tasks(chosen)
    overall, note = aggregate_overall(per_task, chosen)
    paired = paired_comparison(chosen, {r["_path"]: r for r in found.records})
    return Summary(
        cells, per_task, overall, note, aggregate_sweeps(cells), paired, describe_run(found.records), found.broken
    )


def prepare_cells(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.copy()
    frame["family"] = frame["family"].fillna("unknown")  # records written before they carried method_info
    peaks = [peak_memory(row) for row in frame.to_dict("records")]
    frame["peak_bytes"] = [p for p, _ in peaks]
    frame["peak_source"] = [s for _, s in peaks]
    for label, columns in BREAKDOWN:
        parts = pd.DataFrame(
            {c: pd.to_numeric(frame[c], errors="coerce") if c in frame else np.nan for c in columns}, index=frame.index
        )
        frame[label] = parts.sum(axis=1, min_count=1)  # empty when the record has none of them
    numeric = ["metric", "activation_bytes", "trainable_params", "total_params", "train_samples_per_s", "train_seconds"]
    frame[numeric] = frame[numeric].apply(pd.to_numeric, errors="coerce")
    return frame


def selected_points(cells: pd.DataFrame) -> pd.DataFrame:
    """The cells of each entry's selected point (harness.selection), named by their entry: what the main tables
    show. `point_label` keeps the cell's own label (`LABEL@lr=0.001`). An entry with no point selected (no dev
    scores to select by: plans, `evaluate: false`) shows every point, under its own label."""
    selected = cells["selected"].astype(bool)
    undecided = ~selected.groupby([cells[c] for c in selection.GROUP], dropna=False).transform("any")
    shown = selected | undecided
    chosen = cells[shown].copy()
    chosen["point_label"] = chosen["method"]
    chosen["method"] = chosen["method"].where(~selected[shown], chosen["entry"])
    return chosen


def aggregate_sweeps(cells: pd.DataFrame) -> pd.DataFrame:
    """Per task, swept entry and point: the mean and std of the dev score over the seeds that finished, their
    number, the point's values and whether selection chose it."""
    rows = []
    for (task, entry), group in cells.groupby(["task", "entry"], sort=False):
        if group["method"].nunique() < 2:
            continue
        for label, point in group.groupby("method", sort=True):
            ok = point[(point["status"] == "ok")]
            rows.append(
                {
                    "task": task,
                    "entry": entry,
                    "point_label": label,
                    "point": json.loads(point["point"].iloc[0]),
                    "metric_name": point["metric_name"].iloc[0],
                    "dev_mean": pd.to_numeric(ok["dev_metric"], errors="coerce").mean() if len(ok) else np.nan,
                    "dev_std": _std(pd.to_numeric(ok["dev_metric"], errors="coerce")),
                    "seeds_ok": len(ok),
                    "selected": bool(point["selected"].any()),
                    "grid_edge": point["grid_edge"].iloc[0],
                }
            )
    return pd.DataFrame(
        rows,
        columns=[
            "task",
            "entry",
            "point_label",
            "point",
            "metric_name",
            "dev_mean",
            "dev_std",
            "seeds_ok",
            "selected",
            "grid_edge",
        ],
    )


def status_text(statuses) -> str:
    counts = pd.Series(list(statuses)).value_counts()
    if len(counts) == 1:
        return counts.index[0]
    order = list(results.STATUSES)
    return ", ".join(f"{counts[s]} {s}" for s in sorted(counts.index, key=order.index))


def _std(values) -> float:
    values = [v for v in values if not is_missing(v)]
    return float(np.std(values, ddof=1)) if len(values) >= 2 else float("nan")


def aggregate_tasks(cells: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for (task, method), group in cells.groupby(["task", "method"], sort=False):
        ok = group[group["status"] == "ok"]
        errors = group.loc[group["status"] != "ok", "error"].dropna()
        row = {
            "task": task,
            "method": method,
            "family": group["family"].iloc[0],
            "method_stack": group["method_stack"].iloc[0],
            "status": status_text(group["status"]),
            "chosen": group["point_label"].iloc[0].partition("@")[2],  # the sweep point selected on dev data
            "grid_edge": group["grid_edge"].iloc[0],
            "seeds": len(group),
            "seeds_ok": len(ok),
            "metric_name": group["metric_name"].iloc[0],
            "higher_is_better": _first(group["higher_is_better"]),
            "metric_mean": ok["metric"].mean() if len(ok) else np.nan,
            "metric_std": _std(ok["metric"]),
            "peak_source": "/".join(sorted(set(ok["peak_source"].dropna()))) or None,
            "error": errors.iloc[0] if len(errors) else None,
        }
        for column in COST_COLUMNS:
            row[column] = pd.to_numeric(ok[column], errors="coerce").mean() if len(ok) else np.nan
        rows.append(row)
    table = pd.DataFrame(rows)
    table["trainable_pct"] = 100 * table["trainable_params"] / table["total_params"]
    table["pareto"] = False
    for _, group in table.groupby("task", sort=False):
        sign = 1 if higher_is_better(group) else -1
        mask = pareto.frontier_mask(list(sign * group["metric_mean"]), list(group["peak_bytes"]))
        table.loc[group.index, "pareto"] = mask
    # Cheapest first: read down a task's rows and the frontier climbs; failed rows last.
    return table.sort_values(
        ["task", "peak_bytes", "method"], key=_task_order(table), na_position="last", ignore_index=True
    )


def _task_order(table):
    order = {t: i for i, t in enumerate(dict.fromkeys(table["task"]))}
    return lambda column: column.map(order) if column.name == "task" else column


def higher_is_better(group: pd.DataFrame) -> bool:
    """Whether a task's primary metric is maximised (unknown, as for a task with no result, counts as yes)."""
    value = _first(group["higher_is_better"])
    return value is None or bool(value)


def _first(series):
    values = series.dropna()
    return values.iloc[0] if len(values) else None


def aggregate_overall(per_task: pd.DataFrame, cells: pd.DataFrame) -> tuple[pd.DataFrame, str | None]:
    tasks = list(dict.fromkeys(per_task["task"]))
    if len(tasks) < 2:
        return pd.DataFrame(), None
    lower = [t for t, group in per_task.groupby("task", sort=False) if not higher_is_better(group)]
    if len(lower):
        return pd.DataFrame(), (
            f"no average across tasks: the primary metric of {', '.join(lower)} is lower-is-better, "
            "and an average of mixed directions means nothing"
        )
    rows = []
    for method, group in per_task.groupby("method", sort=False):
        by_task = group.set_index("task")
        complete = all(t in by_task.index and not is_missing(by_task.loc[t, "metric_mean"]) for t in tasks)
        mine = cells[(cells["method"] == method) & (cells["status"] == "ok")]
        per_seed = mine.pivot_table(index="seed", columns="task", values="metric", aggfunc="mean").reindex(
            columns=tasks
        )
        seed_averages = per_seed.dropna().mean(axis=1)
        row = {
            "method": method,
            "family": group["family"].iloc[0],
            "method_stack": group["method_stack"].iloc[0],
            "status": status_text(cells.loc[cells["method"] == method, "status"]),
            "tasks_ok": int(group["metric_mean"].notna().sum()),
            "tasks": len(tasks),
            "metric_mean": by_task["metric_mean"].reindex(tasks).mean() if complete else np.nan,
            "metric_std": _std(seed_averages) if complete else np.nan,
            "peak_bytes": group["peak_bytes"].max(),
            "activation_bytes": group["activation_bytes"].max(),
            "peak_source": "/".join(sorted({s for v in group["peak_source"].dropna() for s in v.split("/")})) or None,
            "trainable_params": group["trainable_params"].max(),
            "train_samples_per_s": group["train_samples_per_s"].mean(),
            "train_seconds": group["train_seconds"].sum(min_count=1),
        }
        largest = group["trainable_params"].idxmax() if group["trainable_params"].notna().any() else None
        row["trainable_pct"] = group.loc[largest, "trainable_pct"] if largest is not None else np.nan
        for task in tasks:
            row[f"task:{task}"] = by_task.loc[task, "metric_mean"] if task in by_task.index else np.nan
        rows.append(row)
    table = pd.DataFrame(rows)
    table["pareto"] = pareto.frontier_mask(list(table["metric_mean"]), list(table["peak_bytes"]))
    return table.sort_values(["peak_bytes", "method"], na_position="last", ignore_index=True), None


def _distinct(values) -> list[str]:
    return sorted({str(v) for v in values if not is_missing(v) and v != ""})


def describe_run(records: list[dict]) -> dict:
    """What was run, from the records themselves; several distinct values are all listed."""
    envs = [r.get("env") or {} for r in records]
    cells = [r["cell"] for r in records]
    packages: dict[str, set] = {}
    for env in envs:
        for name, version in (env.get("packages") or {}).items():
            if version:
                packages.setdefault(name, set()).add(version)
    started = _distinct(r.get("started_at") for r in records)
    finished = _distinct(r.get("finished_at") for r in records)
    statuses = pd.Series([r["status"] for r in records]).value_counts()
    return {
        "suite": cells[0]["suite"],
        "backbone": _distinct(c.get("backbone_description") or c.get("backbone") for c in cells),
        "device": _distinct(e.get("device") for e in envs),
        "git_commit": _distinct(e.get("git_commit") for e in envs),
        "python": _distinct(e.get("python") for e in envs),
        "packages": {name: sorted(v) for name, v in sorted(packages.items())},
        "run_dates": (started[0], finished[-1]) if started and finished else None,
        "tasks": list(dict.fromkeys(c["task"]["name"] for c in cells)),
        "methods": list(dict.fromkeys(c["label"] for c in cells)),
        "seeds": sorted({c["seed"] for c in cells}),
        "cells": len(records),
        "statuses": {s: int(n) for s, n in statuses.items()},
    }
