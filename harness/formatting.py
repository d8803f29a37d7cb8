"""How a value from the records is told missing and written out: one place for the report, the gate and the figures.

- `is_missing`: None, NaN (a Python or numpy float) or pandas' NA: a figure the
  record does not have. Shown as `MISSING`, never as zero.
- `format_bytes`: bytes in the largest binary unit (KiB, MiB, GiB = 1024^n) the
  value reaches; `byte_unit` picks one unit for a figure's axis.
- `markdown_cell`: text from the records made safe in a Markdown table cell.
- `parse_bytes`: '24GiB', '80 GB', '512MiB', '1e9' -> bytes (GiB = 2^30, GB = 10^9).
"""

import math

import numpy as np
import pandas as pd

MISSING = "—"
BYTE_UNITS = (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))  # largest first


def is_missing(value) -> bool:
    return value is None or value is pd.NA or (isinstance(value, (float, np.floating)) and math.isnan(value))


def format_bytes(value, decimals: int | None = None) -> str:
    """'1.5 MiB', '2.25 GiB', '512 B'; `decimals` places in every unit above B (default: 1, and 2 in GiB)."""
    if is_missing(value):
        return MISSING
    for unit, size in BYTE_UNITS:
        if abs(value) >= size:
            places = decimals if decimals is not None else 2 if unit == "GiB" else 1
            return f"{value / size:,.{places}f} {unit}"
    return f"{value:,.0f} B"


def byte_unit(values) -> tuple[int, str]:
    """(size, name) of the unit an axis of these byte counts is drawn in: GiB from 4 GiB up, else MiB."""
    values = np.asarray(values, dtype=float)
    largest = np.nanmax(values) if len(values) and not np.all(np.isnan(values)) else 0
    return (2**30, "GiB") if largest >= 4 * 2**30 else (2**20, "MiB")


BYTE_SUFFIXES = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12} | {
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_bytes(text: str) -> int:
    """A size as users write it; ValueError naming the units it accepts."""
    cleaned = str(text).strip().lower().replace(" ", "")
    number = cleaned.rstrip("kmgtib")
    suffix = cleaned[len(number) :]
    try:
        value = float(number)
    except ValueError:
        value = None
    if value is None or suffix not in BYTE_SUFFIXES or not math.isfinite(value) or value <= 0:
        raise ValueError(f"'{text}' is not a size: write e.g. 24GiB, 80GB or 512MiB")
    return int(value * BYTE_SUFFIXES[suffix])


_MARKDOWN_SPECIAL = str.maketrans({c: "\\" + c for c in "\\`*_[]|#"} | {"<": "&lt;", ">": "&gt;", "\n": " ", "\r": " "})


def markdown_cell(value) -> str:
    """Text from the records, shown as written in a Markdown table cell (or list item): no markup, no HTML, one line."""
    return str(value).translate(_MARKDOWN_SPECIAL)
