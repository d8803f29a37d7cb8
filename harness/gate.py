"""What the regression gate checks, and how strictly.

Three groups of figures, each with one tolerance:
- memory (relative, percent of the baseline): the deterministic byte counts
  the meter gives on any device, plus the CUDA peak, which is compared only
  when both sides have it. Lower is better.
- metric (absolute, in points): the task's primary metric. One point is 0.01
  of the metric's value, i.e. a percentage point for accuracy, F1 or a
  correlation. Its record says whether higher is better.
- time (relative, percent of the baseline): wall-clock figures, noisy, so the
  default tolerance is loose. Lower is better.

A tolerance is a non-negative number, or "off" (YAML `false`) to leave the
group out. Memory and time accept "2%" or 2 (both two percent); the metric
tolerance is in points and takes no "%". Settings come from, in rising
precedence: DEFAULTS, a suite's `gate:` mapping, the command-line flags.
This module is shared by the suite schema (config.py) and compare.py;
`from_suite` reads a suite's gate: mapping without validating (or importing)
the rest of the suite.
"""

import math

from harness.errors import UserError

MEMORY_FIGURES = (
    "activation_bytes",
    "trainable_param_bytes",
    "grad_bytes",
    "optimizer_bytes",
    "modelled_peak_bytes",
    "peak_gpu_allocated_bytes",
)
METRIC_FIGURES = ("metric",)
TIME_FIGURES = ("train_seconds", "step_time_median_s")
GROUPS = {"memory": MEMORY_FIGURES, "metric": METRIC_FIGURES, "time": TIME_FIGURES}
FIGURES = MEMORY_FIGURES + METRIC_FIGURES + TIME_FIGURES

DEFAULTS = {"memory_tolerance": 2.0, "metric_tolerance": 1.0, "time_tolerance": 50.0}
KEYS = (*DEFAULTS, "figures")  # what a suite's gate: mapping may set


def group_of(figure: str) -> str:
    return next(group for group, figures in GROUPS.items() if figure in figures)


def parse_tolerance(value, where: str, percent: bool) -> float | None:
    """A tolerance as a float (percent or points), or None for "off"."""
    example = "e.g. 2% or off" if percent else "e.g. 1.0 (points) or off"
    if value is False or (isinstance(value, str) and value.strip().lower() == "off"):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise UserError(where, f"{value!r} is not a tolerance", example)
    text = str(value).strip()
    if text.endswith("%"):
        if not percent:
            raise UserError(where, f"'{text}': the metric tolerance is in points, not percent", example)
        text = text[:-1]
    try:
        number = float(text)
    except ValueError:
        raise UserError(where, f"'{value}' is not a tolerance", example) from None
    if not math.isfinite(number) or number < 0:
        raise UserError(where, f"must be a non-negative number, got {value!r}", example)
    return number


def parse_settings(raw, where: str) -> dict:
    """Validate a suite's `gate:` mapping; returns only the keys it sets, normalised."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(where, "must be a mapping", "e.g. gate: {memory_tolerance: 2%, time_tolerance: off}")
    out = {}
    for key, value in raw.items():
        if key not in KEYS:
            raise UserError(f"{where}.{key}", "unknown key", f"allowed keys: {', '.join(KEYS)}")
        if key == "figures":
            if not isinstance(value, list) or not value or not all(isinstance(f, str) for f in value):
                raise UserError(
                    f"{where}.figures", "must be a non-empty list of figure names", f"choose from {', '.join(FIGURES)}"
                )
            for name in value:
                if name not in FIGURES:
                    raise UserError(f"{where}.figures", f"unknown figure '{name}'", f"choose from {', '.join(FIGURES)}")
            out[key] = tuple(dict.fromkeys(value))
        else:
            out[key] = parse_tolerance(value, f"{where}.{key}", percent=key != "metric_tolerance")
    return out


def resolve(suite_gate: dict, flags: dict) -> dict:
    """Defaults, overridden by the suite's gate settings, overridden by the flags given (not None)."""
    settings = {**DEFAULTS, "figures": FIGURES, **suite_gate}
    for key, text in flags.items():
        if text is not None:
            settings[key] = parse_tolerance(text, f"--{key.replace('_', '-')}", percent=key != "metric_tolerance")
    return settings


def from_suite(path) -> dict:
    """A suite file's gate: mapping, parsed; the suite's methods, tasks and data are not looked at."""
    from pathlib import Path

    from harness.user_yaml import suite_mapping

    return parse_settings(suite_mapping(Path(path)).get("gate"), f"{path}.gate")
