"""Tasks: what data to read, which columns hold text and label, which metrics.

Every task, GLUE included, is declared in YAML (glue.yaml, images.yaml beside this file)
and parsed by `TaskSpec.from_mapping`; a suite declares new tasks the same way.
A task's metrics are names from harness/metrics.py or plugin metrics (module:function).
"""

from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from harness import metrics as metric_registry
from harness.errors import UserError

_ADDED_LATER = ("image_column", "sklearn")
TASK_KEYS = {
    "description",
    "local",
    "data_files",
    "hub",
    "text_columns",
    "image_column",
    "sklearn",
    "label_column",
    "type",
    "num_labels",
    "metrics",
    "primary_metric",
    "train_split",
    "eval_split",
}


@dataclass(frozen=True)
class TaskSpec:
    name: str
    text_columns: tuple[str, ...]
    metrics: tuple[str, ...]
    primary_metric: str
    type: str = "classification"  # or "regression"
    num_labels: int = 1
    label_column: str = "label"
    description: str = ""
    local: str | None = None  # folder under the data directory holding <split>.{parquet,csv,json,jsonl}
    data_files: dict = field(default_factory=dict)  # split -> file path, for tasks outside the data directory
    hub: tuple[str, ...] | None = None  # (dataset id[, config name])
    train_split: str = "train"
    eval_split: str = "validation"
    image_column: str | None = None  # an image task's input: file paths, or image bytes as `datasets` stores them
    sklearn: str | None = None  # a scikit-learn loader whose offline data the task reads (harness.data.SKLEARN)

    @property
    def is_regression(self) -> bool:
        return self.type == "regression"

    @property
    def modality(self) -> str:
        return "image" if self.image_column else "text"

    def to_dict(self) -> dict:
        # Fields added after records existed are left out while unset, so older cells keep their config hash.
        return {k: v for k, v in asdict(self).items() if not (k in _ADDED_LATER and v is None)}

    @classmethod
    def from_dict(cls, values: dict) -> "TaskSpec":
        """The inverse of `to_dict` (JSON turns the tuples into lists)."""
        tuples = {key: tuple(values[key]) for key in ("text_columns", "metrics", "hub") if values.get(key) is not None}
        return cls(**{**values, **tuples})

    @classmethod
    def from_mapping(cls, name: str, raw, where: str, base_dir: Path | None = None) -> "TaskSpec":
        """Validate a task declaration; every mistake is a UserError naming the key."""
        if not isinstance(raw, dict):
            raise UserError(where, f"task '{name}' must be a mapping", "see harness/tasks/glue.yaml for the form")
        unknown = set(raw) - TASK_KEYS
        if unknown:
            raise UserError(f"{where}.{sorted(unknown)[0]}", "unknown task key", f"use one of {sorted(TASK_KEYS)}")

        def need_list(key):
            value = raw.get(key)
            if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
                raise UserError(f"{where}.{key}", "must be a non-empty list of strings", f"e.g. {key}: [sentence]")
            return tuple(value)

        task_type = raw.get("type", "classification")
        if task_type not in metric_registry.TASK_TYPES:
            raise UserError(f"{where}.type", f"'{task_type}' is not a task type", "use classification or regression")
        num_labels = raw.get("num_labels", 1 if task_type == "regression" else None)
        if not isinstance(num_labels, int) or isinstance(num_labels, bool) or num_labels < 1:
            raise UserError(
                f"{where}.num_labels", "must be a positive integer", "give the number of classes, e.g. num_labels: 2"
            )
        if task_type == "classification" and num_labels < 2:
            raise UserError(
                f"{where}.num_labels",
                "a classification task needs at least 2 labels",
                "set num_labels: 2 or more, or type: regression",
            )
        if task_type == "regression" and num_labels != 1:
            raise UserError(
                f"{where}.num_labels", "a regression task predicts one value", "remove num_labels or set it to 1"
            )
        metrics = need_list("metrics")
        for m in metrics:  # a plugin metric is imported here, so a bad reference stops the suite before training
            if task_type not in metric_registry.resolve(m, f"{where}.metrics").task_types:
                raise UserError(
                    f"{where}.metrics",
                    f"metric '{m}' does not fit a {task_type} task",
                    f"use some of {metric_registry.fitting(task_type)}",
                )
        if task_type == "classification" and "f1" in metrics and num_labels != 2:
            raise UserError(
                f"{where}.metrics", "f1 is binary F1 and needs num_labels: 2", "use macro_f1 for more classes"
            )
        primary = raw.get("primary_metric", metrics[0])
        if primary not in metrics:
            raise UserError(
                f"{where}.primary_metric", f"'{primary}' is not among the task's metrics", f"use one of {list(metrics)}"
            )

        data_files = raw.get("data_files", {}) or {}
        if not isinstance(data_files, dict) or not all(isinstance(v, str) for v in data_files.values()):
            raise UserError(
                f"{where}.data_files",
                "must map split names to file paths",
                "e.g. data_files: {train: data/train.csv, validation: data/dev.csv}",
            )
        if base_dir is not None:  # paths in a suite are relative to the suite file
            data_files = {k: str((base_dir / v).resolve()) for k, v in data_files.items()}
        hub = raw.get("hub")
        if hub is not None:
            hub = [hub] if isinstance(hub, str) else hub
            if not isinstance(hub, list) or not 1 <= len(hub) <= 2 or not all(isinstance(h, str) for h in hub):
                raise UserError(
                    f"{where}.hub",
                    "must be a dataset id or [dataset id, config name]",
                    "e.g. hub: [nyu-mll/glue, sst2]",
                )
            hub = tuple(hub)
        if not (raw.get("local") or data_files or hub or raw.get("sklearn")):
            raise UserError(
                where, f"task '{name}' says nowhere to read its data", "give data_files, local, hub or sklearn"
            )
        keys = ("description", "local", "label_column", "train_split", "eval_split", "image_column", "sklearn")
        strings = {k: raw[k] for k in keys if k in raw}
        for key, value in strings.items():
            if not isinstance(value, str):
                raise UserError(f"{where}.{key}", "must be a string", f"quote the value of {key}")
        if ("text_columns" in raw) == ("image_column" in raw):
            raise UserError(
                where,
                f"task '{name}' must read either text or an image",
                "give text_columns: [...] for text, or image_column: NAME for images",
            )
        text_columns = need_list("text_columns") if "text_columns" in raw else ()
        if len(text_columns) > 2:  # a tokenizer takes a text and an optional pair; a third would be dropped
            raise UserError(
                f"{where}.text_columns",
                f"{len(text_columns)} text columns; a task reads one text or a pair",
                "give one or two columns (join the others into one in the data)",
            )
        if "image_column" in raw and task_type != "classification":
            raise UserError(f"{where}.type", "an image task is a classification", "remove type, or read text")
        return cls(
            name=name,
            text_columns=text_columns,
            metrics=metrics,
            primary_metric=primary,
            type=task_type,
            num_labels=num_labels,
            data_files=data_files,
            hub=hub,
            **strings,
        )


def _load_builtin() -> dict[str, TaskSpec]:
    tasks = {}
    for path in sorted(Path(__file__).parent.glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        tasks.update({name: TaskSpec.from_mapping(name, spec, f"{path}:{name}") for name, spec in raw.items()})
    return tasks


BUILTIN_TASKS: dict[str, TaskSpec] = _load_builtin()
