"""Each cell's record, also where users already read runs: MLflow or TensorBoard (`--track mlflow`,
`--track tensorboard`; the packages are the optional extra `track`).

One tracker run per cell, grouped by suite (an MLflow experiment, a TensorBoard folder): the resolved settings
as parameters, the training loss and learning rate per step, the eval and dev metrics and every numeric
figure of `measurements`. The driver logs a record once it is written, from the record alone: the tracker is
a copy of the results, and a tracker that fails cannot lose one.
"""

import importlib
import json
import os
import re
from datetime import datetime
from pathlib import Path

from harness.errors import UserError
from harness.train import linear_schedule


def flat(values: dict, prefix: str = "") -> dict:
    """Nested settings as one level of dotted keys; lists as JSON text."""
    out = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat(value, f"{name}."))
        else:
            out[name] = json.dumps(value) if isinstance(value, list) else value
    return out


def steps(record: dict) -> list[tuple[int, float, float]]:
    """(step, training loss, learning rate) per optimizer step. The rate is the entry's `lr` under the run's
    schedule (harness.train.linear_schedule); a method that gives a group another rate keeps its ratio to it."""
    losses = (record.get("train") or {}).get("losses") or []
    settings = record["cell"]["train"]
    factor = linear_schedule(len(losses), settings["warmup_ratio"])
    return [(i, loss, record["cell"]["lr"] * factor(i)) for i, loss in enumerate(losses)]


def figures(record: dict) -> dict[str, float]:
    """The run's final numbers: eval/<metric>, dev/<metric>, and each numeric measurement."""
    out = {f"eval/{k}": v["value"] for k, v in (record.get("metrics") or {}).items()}
    out |= {f"dev/{k}": v["value"] for k, v in (record.get("dev_metrics") or {}).items()}
    for key, value in (record.get("measurements") or {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"measurements/{key}"] = float(value)
    if record.get("params"):
        out |= {f"params/{k}": float(v) for k, v in record["params"].items() if isinstance(v, (int, float))}
    return out


def run_name(record: dict) -> str:
    cell = record["cell"]
    return f"{cell['task']['name']}/{cell['label']}/seed{cell['seed']}"


class MLflow:
    """An MLflow experiment named after the suite; a run per cell. Where: MLFLOW_TRACKING_URI if set, else a
    SQLite store, `mlflow.db` beside the results directory (MLflow 3 retired its plain-file store)."""

    def __init__(self, suite: str, out_dir: Path):
        mlflow = _package("mlflow", "mlflow")
        self.uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{out_dir.resolve().parent / 'mlflow.db'}"
        try:  # reach the store now, before any cell runs
            self.client = mlflow.MlflowClient(self.uri)
            found = self.client.get_experiment_by_name(suite)
            self.experiment = found.experiment_id if found else self.client.create_experiment(suite)
        except Exception as exc:
            raise UserError(
                "--track mlflow",
                f"cannot use the tracking store {self.uri}: {str(exc).strip().splitlines()[0][:200]}",
                "set MLFLOW_TRACKING_URI to a store you can reach, or unset it for the local default",
            ) from None

    def log(self, record: dict) -> None:
        from mlflow.entities import Metric, Param

        tags = {"suite": record["cell"]["suite"], "status": record["status"]}
        run_id = self.client.create_run(self.experiment, run_name=run_name(record), tags=tags).info.run_id
        at = int(1000 * time_of(record))
        params = [Param(_mlflow_key(k), str(v)[:6000]) for k, v in flat(record["cell"]).items()]
        metrics = [Metric(_mlflow_key(k), v, at, 0) for k, v in figures(record).items()]
        for step, loss, lr in steps(record):
            metrics += [Metric("train/loss", loss, at, step), Metric("train/lr", lr, at, step)]
        for i in range(0, len(params), 100):  # MLflow's limits per batch: 100 params, 1000 metrics
            self.client.log_batch(run_id, params=params[i : i + 100])
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(run_id, metrics=metrics[i : i + 1000])
        if record.get("error"):
            self.client.set_tag(run_id, "error", str(record["error"].get("message", ""))[:5000])
        self.client.set_terminated(run_id, "FINISHED" if record["status"] == "ok" else "FAILED")


def _mlflow_key(key: str) -> str:
    """MLflow's names allow letters, digits, _ - . space : and /."""
    return re.sub(r"[^\w\-. :/]", "_", key)


class TensorBoard:
    """Event files under `tensorboard/<suite>/<task>/<label>/seed<n>` beside the results directory."""

    def __init__(self, suite: str, out_dir: Path):
        SummaryWriter = _package("tensorboard", "torch.utils.tensorboard").SummaryWriter
        self.writer_class, self.root = SummaryWriter, out_dir.resolve().parent / "tensorboard" / suite

    def log(self, record: dict) -> None:
        writer = self.writer_class(str(self.root / run_name(record)))
        try:
            for step, loss, lr in steps(record):
                writer.add_scalar("train/loss", loss, step)
                writer.add_scalar("train/lr", lr, step)
            last = max(0, len(steps(record)) - 1)
            for key, value in figures(record).items():
                writer.add_scalar(key, value, last)
            settings = "\n".join(f"    {k}: {v}" for k, v in flat(record["cell"]).items())
            writer.add_text("settings", settings, 0)
            writer.add_text("status", record["status"], 0)
        finally:
            writer.close()


def _package(kind: str, module: str):
    """The tracker's module, or the one line a user needs when its package is missing."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(
            f"--track {kind}", f"the {kind} package is not installed", "pip install 'petl-harness[track]'"
        ) from None


def time_of(record: dict) -> float:
    return datetime.fromisoformat(record.get("finished_at") or record["started_at"]).timestamp()


def make(kinds: list[str], suite: str, out_dir: Path) -> list:
    return [{"mlflow": MLflow, "tensorboard": TensorBoard}[kind](suite, out_dir) for kind in kinds]
