"""Tasks: what data to read, which columns hold text and label, which metrics.

Every task, GLUE included, is declared in YAML (glue.yaml, images.yaml beside this file)
and parsed by `TaskSpec.from_mapping`; a suite declares new tasks the same way.
A task's metrics are names from harness/metrics.py or plugin metrics (module:function).
"""

import re
import string
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from harness import metrics as metric_registry
from harness.errors import UserError

_ADDED_LATER = ("image_column", "sklearn", "prompt", "target", "verbalizer", "answer_pattern")
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
    "dev_split",
    "dev_size",
    "prompt",
    "target",
    "verbalizer",
    "answer_pattern",
}


@dataclass(frozen=True)
class TaskSpec:
    name: str
    text_columns: tuple[str, ...]
    metrics: tuple[str, ...]
    primary_metric: str
    type: str = "classification"  # or "regression", or "causal_lm" (generate the target from the prompt)
    num_labels: int = 1
    label_column: str = "label"
    description: str = ""
    local: str | None = None  # folder under the data directory holding <split>.{parquet,csv,json,jsonl}
    data_files: dict = field(default_factory=dict)  # split -> file path, for tasks outside the data directory
    hub: tuple[str, ...] | None = None  # (dataset id[, config name])
    train_split: str = "train"
    eval_split: str = "validation"
    # Held-out data for selecting among a sweep's points (harness.selection), never the eval split: a split the
    # task names, or dev_size examples carved from the training split (harness.data.train_and_dev; None: a default)
    dev_split: str | None = None
    dev_size: int | None = None
    image_column: str | None = None  # an image task's input: file paths, or image bytes as `datasets` stores them
    sklearn: str | None = None  # a scikit-learn loader whose offline data the task reads (harness.data.SKLEARN)
    # causal_lm tasks (harness.causal_lm): templates over the columns; the loss covers the target's tokens only
    prompt: str | None = None  # e.g. "Review: {sentence}\nSentiment:"
    target: str | None = None  # e.g. " {label}"
    verbalizer: dict | None = None  # column -> {value as a string: text}, applied before the templates
    answer_pattern: str | None = None  # regex: its last match (group 1 if any) is the answer exact_match compares

    @property
    def is_regression(self) -> bool:
        return self.type == "regression"

    @property
    def is_causal_lm(self) -> bool:
        return self.type == "causal_lm"

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
            raise UserError(
                f"{where}.type",
                f"'{task_type}' is not a task type",
                f"use one of {', '.join(metric_registry.TASK_TYPES)}",
            )
        if task_type == "causal_lm" and "num_labels" in raw:
            raise UserError(f"{where}.num_labels", "a causal_lm task generates text, it has no labels", "remove it")
        num_labels = raw.get("num_labels", 1 if task_type in ("regression", "causal_lm") else None)
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
        keys = (
            "description",
            "local",
            "label_column",
            "train_split",
            "eval_split",
            "image_column",
            "sklearn",
        )
        strings = {k: raw[k] for k in keys if k in raw}
        for key, value in strings.items():
            if not isinstance(value, str):
                raise UserError(f"{where}.{key}", "must be a string", f"quote the value of {key}")
        held_out = check_dev(raw, where, strings.get("train_split", "train"), strings.get("eval_split", "validation"))
        generation = _causal_lm_fields(raw, where) if task_type == "causal_lm" else {}
        for key in ("prompt", "target", "verbalizer", "answer_pattern"):
            if key in raw and not generation:
                raise UserError(
                    f"{where}.{key}", f"only a causal_lm task reads {key}", "set type: causal_lm, or remove it"
                )
        if generation:
            if "text_columns" in raw or "image_column" in raw:
                raise UserError(
                    where, "a causal_lm task reads the columns its templates name", "remove text_columns/image_column"
                )
            raw = {**raw, "text_columns": list(generation.pop("columns"))}
        if ("text_columns" in raw) == ("image_column" in raw):
            raise UserError(
                where,
                f"task '{name}' must read either text or an image",
                "give text_columns: [...] for text, or image_column: NAME for images",
            )
        text_columns = need_list("text_columns") if "text_columns" in raw else ()
        if len(text_columns) > 2 and not generation:  # a tokenizer takes a text and a pair; a third would be dropped
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
            **held_out,
            **generation,
        )


def check_dev(raw: dict, where: str, train_split: str, eval_split: str) -> dict:
    """A task's dev data as declared (`dev_split: NAME` or `dev_size: N`, at most one), checked: {} when neither is
    given. Whether the data holds the split, or enough training examples, is checked once it is read
    (harness.data.train_and_dev, before any training)."""
    if "dev_split" in raw and "dev_size" in raw:
        raise UserError(
            where, "give dev_split or dev_size, not both", "a named split, or N examples of the training data"
        )
    if "dev_split" in raw:
        split = raw["dev_split"]
        if not isinstance(split, str) or not split:
            raise UserError(f"{where}.dev_split", "must be a split name", "e.g. dev_split: validation")
        if split in (train_split, eval_split):
            role = "training" if split == train_split else "eval"
            raise UserError(
                f"{where}.dev_split",
                f"'{split}' is the task's {role} split; dev data must be held out from both",
                "name another split, or use dev_size: N to carve it from the training data",
            )
        return {"dev_split": split}
    if "dev_size" in raw:
        size = raw["dev_size"]
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise UserError(f"{where}.dev_size", f"must be a positive integer, got {size!r}", "e.g. dev_size: 500")
        return {"dev_size": size}
    return {}


def template_fields(template: str, where: str) -> tuple[str, ...]:
    """The column names a `str.format` template reads, in order; a UserError for a malformed one."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise UserError(
            where, f"{template!r} is not a template: {exc}", "write {column} for a column, {{ for a brace"
        ) from None
    for field_name in fields:
        if not field_name or any(ch in field_name for ch in ".["):  # positional, attribute or index fields
            raise UserError(where, f"{{{field_name}}} is not a column name", "write {column}, e.g. {sentence}")
    return tuple(dict.fromkeys(fields))


def _causal_lm_fields(raw: dict, where: str) -> dict:
    """A causal_lm task's prompt and target templates, verbalizer and answer pattern, checked; `columns` are the
    ones the templates read."""
    columns = ()
    for key in ("prompt", "target"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise UserError(
                f"{where}.{key}",
                f"a causal_lm task needs a {key} template",
                'e.g. prompt: "Review: {sentence}\\nSentiment:", target: " {label}"',
            )
        columns += template_fields(raw[key], f"{where}.{key}")
    if not template_fields(raw["target"], f"{where}.target"):
        raise UserError(f"{where}.target", "the target names no column", 'e.g. target: " {label}"')
    verbalizer = raw.get("verbalizer")
    if verbalizer is not None:
        if not isinstance(verbalizer, dict) or not all(
            isinstance(words, dict) and words and all(isinstance(w, str) for w in words.values())
            for words in verbalizer.values()
        ):
            raise UserError(
                f"{where}.verbalizer", "must map a column to {value: text}", "e.g. verbalizer: {label: {0: negative}}"
            )
        unknown = [c for c in verbalizer if c not in columns]
        if unknown:
            raise UserError(f"{where}.verbalizer", f"no template reads column '{unknown[0]}'", "name a column of them")
        # JSON keys are strings: a record's task must read back as the suite wrote it
        verbalizer = {c: {str(k): v for k, v in words.items()} for c, words in verbalizer.items()}
    pattern = raw.get("answer_pattern")
    if pattern is not None:
        try:
            groups = re.compile(pattern).groups if isinstance(pattern, str) else -1
        except re.error as exc:
            raise UserError(f"{where}.answer_pattern", f"not a regular expression: {exc}", "fix the pattern") from None
        if groups not in (0, 1):
            raise UserError(
                f"{where}.answer_pattern", "must be a regex string with at most one group", r"e.g. '(-?\\d+)'"
            )
    return {
        "prompt": raw["prompt"],
        "target": raw["target"],
        "verbalizer": verbalizer,
        "answer_pattern": pattern,
        "columns": tuple(dict.fromkeys(columns)),
    }


def _load_builtin() -> dict[str, TaskSpec]:
    tasks = {}
    for path in sorted(Path(__file__).parent.glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        tasks.update({name: TaskSpec.from_mapping(name, spec, f"{path}:{name}") for name, spec in raw.items()})
    return tasks


BUILTIN_TASKS: dict[str, TaskSpec] = _load_builtin()
