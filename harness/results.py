"""Result records: made by one constructor, one JSON file per cell, written atomically, read only here.

`new_record` is the only place a record's sections are spelled; the worker fills
one in, the runner writes one for outcomes a worker does not live to write. A
record is written to a temporary file in the same folder, fsync'd and then
renamed over its final name, so a reader sees the old record or the new one,
never half of one. `load` refuses nothing silently: unreadable files are
reported through `scan`, which the runner uses to rerun them. A baseline file
(`harness export`) holds many records in one file; `read_records` reads either form.
"""

import json
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from harness import selection
from harness.errors import UserError

SCHEMA_VERSION = 1
STATUSES = ("ok", "failed", "oom", "diverged", "timeout", "interrupted", "unsupported")
RECORD_GLOB = "*.json"

# Columns later work and users' scripts rely on; keep the names.
CORE_COLUMNS = [
    "suite",
    "task",
    "method",
    "seed",
    "status",
    "metric_name",
    "metric",
    "dev_metric",
    "entry",
    "selected",
    "trainable_params",
    "total_params",
    "train_seconds",
]
MEMORY_COLUMNS = [
    "peak_gpu_allocated_bytes",
    "peak_gpu_reserved_bytes",
    "reserved_max_bytes",
    "reserved_mean_bytes",
    "reserved_p99_bytes",
    "nvml_peak_bytes",
    "activation_bytes",
    "frozen_param_bytes",
    "trainable_param_bytes",
    "grad_bytes",
    "optimizer_bytes",
    "modelled_peak_bytes",
    "peak_rss_bytes",
    "train_samples_per_s",
    "train_tokens_per_s",
    "train_target_tokens_per_s",
    "step_time_median_s",
    "step_time_p90_s",
]


def cell_key(task: str, label: str, seed: int) -> str:
    """A cell's name: its record's file stem in a results directory, and what compare matches cells by."""
    return f"{task}__{label}__seed{seed}"


def new_record(cell: dict, *, config_hash: str, code: dict, method_info: list[dict], started: float) -> dict:
    """The one constructor of records: every section present, empty until the run fills it in. The worker
    starts from it; the runner too, for the outcomes a worker does not live to write (killed, timed out,
    interrupted). `code` and `method_info` say what produced the record, so readers need not import it."""
    return {
        "schema_version": SCHEMA_VERSION,
        "cell": cell,
        "config_hash": config_hash,
        "code": code,
        "method_info": method_info,
        "status": "failed",
        "error": None,
        "metrics": {},  # on the eval split: what reports show
        "dev_metrics": {},  # on the dev data: what selects among a sweep's points (harness.selection)
        "predictions": None,  # per eval example, what the metrics read (compact_outputs): for paired comparisons
        "params": {},
        "measurements": {},
        "train": {},
        "env": {},
        "plan": None,  # a plan's (harness.plan): what it planned; a run's stays None
        "started_at": _timestamp(started),
    }


def compact_outputs(outputs: dict) -> dict:
    """What each metric reads per eval example (harness.train.predict's {reads: (a, b)}) as JSON lists: class ids,
    answers and token counts as they are, real numbers to 7 significant digits (float32's precision)."""

    def plain(values):
        if values.dtype.kind == "f":
            return [float(f"{v:.7g}") for v in values.tolist()]
        return values.tolist()

    return {reads: [plain(a), plain(b)] for reads, (a, b) in outputs.items()}


def finish(record: dict, started: float) -> dict:
    record["measurements"]["total_seconds"] = time.time() - started
    record["finished_at"] = _timestamp(time.time())
    return record


def _timestamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds")


def write_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def is_record(obj) -> bool:
    """Whether a decoded JSON value is a result record of this schema."""
    return (
        isinstance(obj, dict)
        and obj.get("schema_version") == SCHEMA_VERSION
        and obj.get("status") in STATUSES
        and isinstance(obj.get("cell"), dict)
    )


def read_record(path: Path) -> dict:
    """A record, or ValueError saying why the file is not one."""
    try:
        record = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not is_record(record):
        raise ValueError(f"{path}: not a result record of schema {SCHEMA_VERSION}")
    return record


@dataclass
class Scan:
    records: list[dict]
    broken: list[tuple[Path, str]]  # (file, why it could not be read)


def scan(directory: str | Path) -> Scan:
    """Every record under `directory` (searched recursively), and every file that failed to read."""
    records, broken = [], []
    for path in sorted(Path(directory).rglob(RECORD_GLOB)):
        if path.name.startswith("."):
            continue
        try:
            records.append(read_record(path) | {"_path": str(path)})
        except ValueError as exc:
            broken.append((path, str(exc)))
    return Scan(records, broken)


def to_row(record: dict) -> dict:
    cell = record["cell"]
    primary = cell["task"]["primary_metric"]
    metrics = record.get("metrics") or {}
    dev = (record.get("dev_metrics") or {}).get(primary, {})
    params = record.get("params") or {}
    row = {
        "suite": cell["suite"],
        "task": cell["task"]["name"],
        "method": cell["label"],
        "entry": cell.get("entry", cell["label"]),  # the method entry; a sweep's points share it
        "point": json.dumps(cell.get("point", {})),  # the swept values of this point, {} when not swept
        "method_stack": "+".join(c["ref"] for c in cell["method"]),
        "seed": cell["seed"],
        "status": record["status"],
        "metric_name": primary,
        "metric": metrics.get(primary, {}).get("value"),
        "higher_is_better": metrics.get(primary, {}).get("higher_is_better", dev.get("higher_is_better")),
        "dev_metric": dev.get("value"),
        "trainable_params": params.get("trainable"),
        "total_params": params.get("total"),
        "train_seconds": record.get("measurements", {}).get("train_seconds"),
        "backbone": cell.get("backbone_description"),
        "device": record.get("env", {}).get("device"),
        "config_hash": record.get("config_hash"),
        "error": (record.get("error") or {}).get("message"),
        "path": record.get("_path"),
        "family": stack_family(record),
        "planned": bool(record.get("plan")),
    }
    for name, m in metrics.items():
        row[f"metric_{name}"] = m.get("value")
    for key, value in cell.get("point", {}).items():
        row[f"sweep_{key}"] = value if isinstance(value, (int, float, str)) else json.dumps(value)
    for key, value in (record.get("measurements") or {}).items():
        if not isinstance(value, (list, dict)):
            row.setdefault(key, value)
    return row


def stack_family(record: dict) -> str | None:
    """Family of a cell's method stack: METL if any component is, else PETL if any is, else baseline.

    Read from `method_info`, which the worker writes from the resolved classes, so a
    reader never imports methods; None for records without it (a worker that died early).
    """
    families = {info.get("family") for info in record.get("method_info") or []}
    if not families:
        return None
    return "METL" if "METL" in families else "PETL" if "PETL" in families else "baseline"


def to_frame(records: list[dict]) -> pd.DataFrame:
    """One row per record, with every core and memory column present (empty where not measured), and the points
    selection picks marked (`selected`, `grid_edge`: harness.selection)."""
    frame = pd.DataFrame([to_row(r) for r in records])
    for column in CORE_COLUMNS + MEMORY_COLUMNS:  # a figure the device did not give is empty, not absent
        if column not in frame.columns:
            frame[column] = None
    return selection.mark(frame)


def load(directory: str | Path, *, strict: bool = False) -> pd.DataFrame:
    """One row per cell under `directory`. Unreadable files raise with `strict`, else warn."""
    found = scan(directory)
    if found.broken:
        message = "; ".join(why for _, why in found.broken)
        if strict:
            raise ValueError(message)
        warnings.warn(f"skipped unreadable result files: {message}", stacklevel=2)
    return to_frame(found.records)


# ---------------------------------------------------------------- baseline files (`harness export`)

EXPORT_KIND = "harness-baseline"  # marks a baseline file written by `export`


def write_export(records: list[dict], source: str | Path, out_file: Path) -> None:
    """Many records in one file, the form a committed baseline takes. `scan` reads files in name order,
    so a refreshed baseline file diffs cleanly against the old one."""
    write_atomic(
        out_file,
        {
            "kind": EXPORT_KIND,
            "source": str(source),
            "records": [{k: v for k, v in r.items() if k != "_path"} for r in records],
        },
    )


def read_records(path: str | Path) -> list[dict]:
    """The records of a results directory or of a baseline file; any unreadable one is a UserError."""
    path = Path(path)
    if path.is_dir():
        found = scan(path)
        if found.broken:
            bad, why = found.broken[0]
            raise UserError(
                str(bad), why.removeprefix(f"{bad}: "), "rerun that cell, or move the file out of the results directory"
            )
        records = found.records
    elif path.is_file():
        records = _read_export(path)
    else:
        raise UserError(
            str(path),
            "no such results directory or baseline file",
            "give a directory written by `harness run` or a file written by `harness export`",
        )
    if not records:
        raise UserError(
            str(path), "holds no result records", "run a suite into it first: python -m harness run SUITE --out DIR"
        )
    return records


def _read_export(path: Path) -> list[dict]:
    fix = "write a baseline file with: python -m harness export RESULTS_DIR FILE"
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(str(path), f"not valid JSON ({exc})", fix) from None
    if not isinstance(data, dict) or data.get("kind") != EXPORT_KIND or not isinstance(data.get("records"), list):
        raise UserError(str(path), "not a baseline file", fix)
    for i, record in enumerate(data["records"]):
        if not is_record(record):
            raise UserError(f"{path}: records[{i}]", f"not a result record of schema {SCHEMA_VERSION}", fix)
    return data["records"]
