"""Suite files: read safely, validate strictly, expand into cells.

Every mistake is a UserError naming the file and key, raised before training.
A cell is one (task, method entry, seed) with every setting resolved; its
`to_dict()` is what a worker process receives and what the result records.
"""

import dataclasses
import hashlib
import importlib.util
import itertools
import json
import math
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from harness import backbone as backbones
from harness import results
from harness.errors import UserError, did_you_mean
from harness.gate import parse_settings as parse_gate
from harness.method import resolve as resolve_method
from harness.tasks import BUILTIN_TASKS, TaskSpec, check_dev
from harness.user_yaml import suite_mapping


@dataclass(frozen=True)
class TrainSettings:
    """How a cell trains and evaluates; suite-wide, each method entry may override any of it."""

    epochs: float | None = None  # passes over the (sub-sampled) train set; ignored when max_steps is set
    max_steps: int | None = None  # optimizer steps; with neither set, one epoch
    batch_size: int = 32  # examples per optimizer step
    micro_batch_size: int | None = None  # examples per forward/backward; < batch_size = gradient accumulation
    eval_batch_size: int = 64
    max_seq_length: int = 128
    # "dynamic" (longest in batch), "max_length", or "fill": every sequence max_length real tokens, the text followed
    # by random ones (random-weight backbones only: memory and speed at a fixed length)
    padding: str = "dynamic"
    # text: each batch draws examples of similar length (less padding to pay for), batches in shuffled order
    group_by_length: bool = False
    warmup_ratio: float = 0.06  # fraction of steps of linear warm-up, then linear decay to 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    precision: str = "fp32"  # "fp32", "bf16" or "fp16" autocast
    gradient_checkpointing: bool = False
    timing_warmup_steps: int = 3  # steps left out of throughput figures
    count_activations: str = "per_shape"  # "per_shape": once per distinct batch shape; "every_step"
    nvml_interval_s: float = 0.02  # NVML sampling period
    time_limit_s: float | None = None  # a cell running longer is stopped and recorded as timeout
    evaluate: bool = True  # false: a memory-and-speed-only cell (no metric), e.g. a short run at another shape
    host_memory_limit_gb: float | None = None  # cap on the worker's heap (RLIMIT_DATA); above it the cell ends as oom

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name}: must be a finite number, got {value}")
        positive = [
            "batch_size",
            "eval_batch_size",
            "max_seq_length",
            "max_steps",
            "max_train_samples",
            "max_eval_samples",
            "micro_batch_size",
            "epochs",
            "nvml_interval_s",
            "time_limit_s",
            "max_grad_norm",
            "host_memory_limit_gb",
        ]
        for key in positive:
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ValueError(f"{key}: must be positive, got {value}")
        for key in ["warmup_ratio", "weight_decay", "timing_warmup_steps"]:
            if getattr(self, key) < 0:
                raise ValueError(f"{key}: must not be negative, got {getattr(self, key)}")
        if self.warmup_ratio >= 1:
            raise ValueError(f"warmup_ratio: must be below 1, got {self.warmup_ratio}")
        if self.padding not in ("dynamic", "max_length", "fill"):
            raise ValueError(f"padding: '{self.padding}' is not one of dynamic, max_length, fill")
        if self.count_activations not in ("per_shape", "every_step"):
            raise ValueError(f"count_activations: '{self.count_activations}' is not one of per_shape, every_step")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision: '{self.precision}' is not one of fp32, bf16, fp16")
        if self.micro_batch_size and self.batch_size % self.micro_batch_size:
            raise ValueError(f"micro_batch_size: {self.micro_batch_size} does not divide batch_size {self.batch_size}")

    @classmethod
    def from_dict(cls, values: dict) -> "TrainSettings":
        return cls(**values)


@dataclass(frozen=True)
class Component:
    """One method with its hyperparameters; an entry stacks one or more."""

    ref: str  # registry name, module:Class, or file.py[:Class]
    hparams: dict = field(default_factory=dict)


@dataclass(frozen=True)
class MethodEntry:
    label: str
    components: tuple[Component, ...]
    lr: float
    train: dict = field(default_factory=dict)  # overrides of the suite's TrainSettings
    # One point of a swept entry (`sweep:`): the entry's own label, and the values this point gives its keys
    swept_from: str | None = None
    point: tuple[tuple[str, typing.Any], ...] = ()

    @property
    def group(self) -> str:
        """The method entry as the suite names it: what selection picks one point of."""
        return self.swept_from or self.label


@dataclass(frozen=True)
class Cell:
    suite: str
    task: TaskSpec
    entry: MethodEntry
    seed: int
    train: TrainSettings
    backbone: backbones.Backbone

    @property
    def key(self) -> str:
        return results.cell_key(self.task.name, self.entry.label, self.seed)

    def to_dict(self) -> dict:
        return {
            "suite": self.suite,
            "task": self.task.to_dict(),
            "label": self.entry.label,
            "seed": self.seed,
            "method": [dataclasses.asdict(c) for c in self.entry.components],
            "lr": self.entry.lr,
            "train": dataclasses.asdict(self.train),
            "backbone": self.backbone.ref,
            "backbone_description": backbones.describe(self.backbone),
            "trust_remote_code": self.backbone.trust_remote_code,
            "pooling": self.backbone.pooling,
            **({"entry": self.entry.group, "point": dict(self.entry.point)} if self.entry.point else {}),
            # absent means pretrained, so records made before random weights existed keep their hash
            **({"weights": self.backbone.weights} if self.backbone.random else {}),
            **({"dtype": self.backbone.dtype} if self.backbone.dtype != "fp32" else {}),
        }

    @classmethod
    def from_dict(cls, values: dict) -> "Cell":
        """The inverse of `to_dict`, as a worker process or a reader of records needs it. The entry's
        train overrides come back already merged into `train`, which is all a cell uses of them."""
        components = tuple(Component(c["ref"], c["hparams"]) for c in values["method"])
        return cls(
            suite=values["suite"],
            task=TaskSpec.from_dict(values["task"]),
            entry=MethodEntry(
                values["label"],
                components,
                values["lr"],
                swept_from=values.get("entry"),
                point=tuple(values.get("point", {}).items()),
            ),
            seed=values["seed"],
            train=TrainSettings.from_dict(values["train"]),
            backbone=backbones.Backbone(
                values["backbone"],
                values["trust_remote_code"],
                values["pooling"],
                values.get("weights", "pretrained"),
                values.get("dtype", "fp32"),
            ),
        )

    def config_hash(self) -> str:
        """Identity of the work: a finished record with the same hash need not run again."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Suite:
    name: str
    path: Path
    tasks: tuple[TaskSpec, ...]
    methods: tuple[MethodEntry, ...]
    seeds: tuple[int, ...]
    train: TrainSettings
    backbone: backbones.Backbone = backbones.Backbone()
    description: str = ""
    gate: dict = field(default_factory=dict)  # regression-gate settings, read by `harness compare`
    task_train: dict = field(default_factory=dict)  # task name -> overrides of `train` for that task

    def cells(self, max_train_samples: int | None = None, overrides: dict | None = None) -> list[Cell]:
        """Suite settings, then the task's overrides, then the method entry's, then the CLI's cap and overrides."""
        cells = []
        for task in self.tasks:
            for entry in self.methods:
                settings = dataclasses.replace(self.train, **{**self.task_train.get(task.name, {}), **entry.train})
                if max_train_samples is not None:
                    settings = dataclasses.replace(settings, max_train_samples=max_train_samples)
                if overrides:
                    settings = dataclasses.replace(settings, **overrides)
                for seed in self.seeds:
                    cells.append(Cell(self.name, task, entry, seed, settings, self.backbone))
        return cells


SUITE_KEYS = {"name", "description", "backbone", "tasks", "methods", "seeds", "train", "gate"}
ENTRY_KEYS = {"method", "stack", "label", "lr", "hparams", "train", "sweep"}
TASK_ENTRY_KEYS = {"task", "train", "dev_size", "dev_split"}
TRAIN_FIELDS = {f.name: f for f in dataclasses.fields(TrainSettings)}


def _unknown(where: str, key, known) -> UserError:
    key = str(key)  # YAML keys may be numbers, booleans or null
    allowed = f"allowed keys: {', '.join(sorted(known))}"
    return UserError(f"{where}.{key}", "unknown key", did_you_mean(key, known, allowed))


def _check_type(where: str, value, hint):
    """Accept value if it fits the type hint (ints count as floats; bools are not numbers)."""
    allowed = typing.get_args(hint) or (hint,)
    for kind in allowed:
        if kind is type(None) and value is None:
            return value
        if kind is bool and isinstance(value, bool):
            return value
        if isinstance(value, bool):
            continue
        if kind is float and isinstance(value, (int, float)):
            return float(value)
        if kind in (int, str) and isinstance(value, kind):
            return value
    names = " or ".join("null" if k is type(None) else k.__name__ for k in allowed)
    raise UserError(where, f"must be {names}, got {value!r}", f"write a {names} value")


def parse_train(raw, where: str) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(where, "must be a mapping of training settings", "e.g. train: {batch_size: 32, epochs: 1}")
    hints = typing.get_type_hints(TrainSettings)
    out = {}
    for key, value in raw.items():
        if key not in TRAIN_FIELDS:
            raise _unknown(where, key, TRAIN_FIELDS)
        out[key] = _check_type(f"{where}.{key}", value, hints[key])
    return out


def _settings(values: dict, where: str) -> TrainSettings:
    try:
        return TrainSettings(**values)
    except ValueError as exc:
        key, _, problem = str(exc).partition(": ")
        raise UserError(f"{where}.{key}", problem, "use a value in range") from None


def _parse_component(raw: dict, where: str) -> Component:
    ref = raw.get("method")
    if not isinstance(ref, str) or not ref:
        raise UserError(
            f"{where}.method",
            "missing or not a string",
            "name a method, e.g. method: full (see `harness list methods`)",
        )
    hparams = raw.get("hparams") or {}
    if not isinstance(hparams, dict):
        raise UserError(f"{where}.hparams", "must be a mapping", "e.g. hparams: {r: 8}")
    cls = resolve_method(ref, f"{where}.method")
    try:
        method = cls(**hparams)  # construct once now, so a bad hyperparameter fails before any training
    except (ValueError, TypeError) as exc:
        raise UserError(
            f"{where}.hparams", str(exc), "see the method's defaults in `harness list methods -v`"
        ) from None
    # Every hyperparameter, defaults included: the record says exactly what ran, and a
    # changed default changes the cell's hash, so a resumed suite reruns the cell.
    return Component(ref, dict(method.hparams))


def _parse_entry(raw, where: str, suite_train: dict) -> MethodEntry:
    if isinstance(raw, str):
        raw = {"method": raw}
    if not isinstance(raw, dict):
        raise UserError(where, "a method entry must be a name or a mapping", "e.g. - {method: full, lr: 5.0e-5}")
    for key in raw:
        if key not in ENTRY_KEYS:
            raise _unknown(where, key, ENTRY_KEYS)
    if ("method" in raw) == ("stack" in raw):
        raise UserError(
            where, "give exactly one of 'method' or 'stack'", "method: NAME, or stack: [{method: A}, {method: B}]"
        )
    if "stack" in raw:
        stack = raw["stack"]
        if not isinstance(stack, list) or len(stack) < 2 or not all(isinstance(s, dict) for s in stack):
            raise UserError(
                f"{where}.stack",
                "must list two or more {method, hparams} mappings",
                "e.g. stack: [{method: A}, {method: B}]",
            )
        if "hparams" in raw:
            raise UserError(
                f"{where}.hparams", "a stack sets hparams per component", "move hparams into each stack item"
            )
        for i, item in enumerate(stack):
            for key in item:
                if key not in ("method", "hparams"):
                    raise _unknown(f"{where}.stack[{i}]", key, {"method", "hparams"})
        components = tuple(_parse_component(s, f"{where}.stack[{i}]") for i, s in enumerate(stack))
    else:
        components = (_parse_component(raw, where),)
    # The default label is the methods' own names: a registered name is its reference, and a plugin's
    # class name is usable where its reference (a path, module:Class) is not.
    label = raw.get("label", "+".join(resolve_method(c.ref, where).name for c in components))
    if not isinstance(label, str) or not label or any(ch in label for ch in "/\\\0") or label.startswith("."):
        raise UserError(
            f"{where}.label", f"{label!r} is not a usable label", "use letters, digits, '-', '_', '+' or '.'"
        )
    lr = raw.get("lr", resolve_method(components[0].ref, where).default_lr)
    lr = _check_type(f"{where}.lr", lr, float)
    if not math.isfinite(lr) or lr <= 0:
        raise UserError(f"{where}.lr", f"must be a positive number, got {lr}", "e.g. lr: 5.0e-5")
    overrides = parse_train(raw.get("train"), f"{where}.train")
    _settings({**suite_train, **overrides}, f"{where}.train")
    return MethodEntry(label, components, lr, overrides)


def _parse_entries(raw, where: str, suite_train: dict) -> list[MethodEntry]:
    """A method entry, or one entry per point of its sweep (the product of its lists, in their order), each
    labelled `LABEL@key=value,...` and checked as if written out by hand."""
    if not isinstance(raw, dict) or "sweep" not in raw:
        return [_parse_entry(raw, where, suite_train)]
    base = _parse_entry({k: v for k, v in raw.items() if k != "sweep"}, where, suite_train)
    grid = _parse_sweep(raw, f"{where}.sweep", base)
    entries = []
    for values in itertools.product(*grid.values()):
        point = dict(zip(grid, values))
        name = point_name(point)
        try:
            entry = _parse_entry(_with_point(raw, point, base), where, suite_train)
        except UserError as exc:
            raise UserError(f"{where}.sweep", f"at {name}: {exc.problem}", exc.fix) from None
        label = f"{base.label}@{name}"
        if any(ch in label for ch in "/\\\0"):
            raise UserError(f"{where}.sweep", f"{name} cannot name a result file", "sweep values without '/'")
        entries.append(dataclasses.replace(entry, label=label, swept_from=base.label, point=tuple(point.items())))
    return entries


def point_name(point: dict) -> str:
    """`lr=0.0003,r=16`: a sweep point as its cells' labels name it."""

    def short(value):
        if isinstance(value, float):
            return f"{value:g}"
        if isinstance(value, (list, tuple)):
            return "+".join(map(str, value))
        return str(value)

    return ",".join(f"{key}={short(value)}" for key, value in point.items())


def _parse_sweep(raw: dict, where: str, base: MethodEntry) -> dict:
    """The sweep's keys and their lists of values: `lr`, a training setting, or a hyperparameter of the entry's
    method (of exactly one method of a stack)."""
    sweep = raw["sweep"]
    if not isinstance(sweep, dict) or not sweep:
        raise UserError(where, "must map keys to lists of values", "e.g. sweep: {lr: [1.0e-4, 3.0e-4, 1.0e-3]}")
    hparams = {key for c in base.components for key in c.hparams}
    known = {"lr"} | set(TRAIN_FIELDS) | hparams
    for key, values in sweep.items():
        if key not in known:
            raise _unknown(where, key, known)
        owners = [c.ref for c in base.components if key in c.hparams]
        if len(owners) > 1:
            raise UserError(
                f"{where}.{key}",
                f"is a hyperparameter of {' and '.join(owners)}: a sweep cannot say which",
                "sweep it in an entry of one method, or give the stack's methods their values by hand",
            )
        set_too = key == "lr" and "lr" in raw or key in (raw.get("train") or {})
        set_too = set_too or any(key in (item.get("hparams") or {}) for item in raw.get("stack", [raw]))
        if set_too:
            raise UserError(f"{where}.{key}", "is both set in the entry and swept", f"remove the entry's {key}")
        if not isinstance(values, list) or not values:
            raise UserError(f"{where}.{key}", "must be a non-empty list of values", f"e.g. {key}: [a, b, c]")
        if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
            raise UserError(f"{where}.{key}", "lists a value twice", "list each value once")
    return sweep


def _with_point(raw: dict, point: dict, base: MethodEntry) -> dict:
    """The entry as it would be written by hand with the point's values."""
    out = {k: v for k, v in raw.items() if k != "sweep"}
    for key, value in point.items():
        if key == "lr":
            out["lr"] = value
        elif key in TRAIN_FIELDS and not any(key in c.hparams for c in base.components):
            out["train"] = {**(out.get("train") or {}), key: value}
        elif "stack" in out:
            i = next(i for i, c in enumerate(base.components) if key in c.hparams)
            out["stack"] = [
                {**item, "hparams": {**(item.get("hparams") or {}), key: value}} if j == i else item
                for j, item in enumerate(out["stack"])
            ]
        else:
            out["hparams"] = {**(out.get("hparams") or {}), key: value}
    return out


def _parse_task(raw, where: str, base_dir: Path, suite_train: dict) -> tuple[TaskSpec, dict]:
    """A task and its training overrides: `sst2`, `{task: sst2, train: {...}, dev_size: N}`, or a new task's
    mapping. An entry's dev_size or dev_split replaces the task's own."""
    if isinstance(raw, dict) and "task" in raw:
        for key in raw:
            if key not in TASK_ENTRY_KEYS:
                raise _unknown(where, key, TASK_ENTRY_KEYS)
        overrides = parse_train(raw.get("train"), f"{where}.train")
        _settings({**suite_train, **overrides}, f"{where}.train")
        task = _parse_task(raw["task"], where, base_dir, suite_train)[0]
        held_out = check_dev(raw, where, task.train_split, task.eval_split)
        if held_out:
            task = dataclasses.replace(task, **{"dev_split": None, "dev_size": None, **held_out})
        return task, overrides
    if isinstance(raw, dict) and "train" in raw:  # a new task declared here may carry overrides too
        raw = dict(raw)
        overrides = parse_train(raw.pop("train"), f"{where}.train")
        _settings({**suite_train, **overrides}, f"{where}.train")
        return _parse_task(raw, where, base_dir, suite_train)[0], overrides
    if isinstance(raw, str):
        if raw not in BUILTIN_TASKS:
            fix = did_you_mean(raw, BUILTIN_TASKS, "use a GLUE task (`harness list tasks`) or declare one as a mapping")
            raise UserError(where, f"unknown task '{raw}'", fix)
        return BUILTIN_TASKS[raw], {}
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
        raise UserError(
            where,
            "a task must be a name or a mapping with a name",
            "e.g. - sst2, or - {name: my_task, data_files: ...}",
        )
    raw = dict(raw)
    name = raw.pop("name")
    if not name or any(ch in name for ch in "/\\\0") or name.startswith("."):
        raise UserError(
            f"{where}.name",
            f"{name!r} is not a usable task name (it names result files)",
            "use letters, digits, '-', '_' or '.'",
        )
    return TaskSpec.from_mapping(name, raw, where, base_dir), {}


BACKBONE_KEYS = {"name", "config", "weights", "trust_remote_code", "pooling", "dtype"}


def parse_backbone(raw, where: str) -> backbones.Backbone:
    """`backbone: REF`, or a mapping: {name: REF} for pretrained weights, {config: NAME_OR_FOLDER, weights: random}
    for a model built from its config alone; either with trust_remote_code and pooling."""
    if raw is None or isinstance(raw, str):
        return backbones.Backbone(raw)
    if not isinstance(raw, dict):
        raise UserError(where, "must be a model path or hub id, or a mapping", f"e.g. backbone: {backbones.DEFAULT}")
    for key in raw:
        if key not in BACKBONE_KEYS:
            raise _unknown(where, key, BACKBONE_KEYS)
    trust = _check_type(f"{where}.trust_remote_code", raw.get("trust_remote_code", False), bool)
    pooling = raw.get("pooling", "auto")
    if pooling not in backbones.POOLINGS:
        raise UserError(
            f"{where}.pooling", f"{pooling!r} is not a pooling", f"use one of {', '.join(backbones.POOLINGS)}"
        )
    weights = raw.get("weights", "random" if "config" in raw else "pretrained")
    if weights not in backbones.WEIGHTS:
        raise UserError(f"{where}.weights", f"{weights!r} is not a kind of weights", "use pretrained or random")
    if "name" in raw and "config" in raw:
        raise UserError(where, "give name (a pretrained model) or config (its shapes alone), not both", "drop one")
    if "config" in raw and weights != "random":
        raise UserError(f"{where}.weights", "a config holds no weights", "set weights: random, or give name: instead")
    ref = raw.get("name", raw.get("config"))
    if ref is not None and not isinstance(ref, str):
        raise UserError(where, "the model must be a path, hub id or config name", f"e.g. name: {backbones.DEFAULT}")
    if weights == "random" and "config" in raw:
        folder = Path(backbones.resolve(backbones.Backbone(ref, weights="random")))
        if not (folder / "config.json").is_file():
            fix = did_you_mean(ref, backbones.shipped(), f"shipped configs: {', '.join(backbones.shipped())}")
            raise UserError(
                f"{where}.config", f"'{ref}' is neither a shipped config nor a folder with a config.json", fix
            )
    dtype = raw.get("dtype", "fp32")
    if dtype not in (*backbones.DTYPES, *backbones.QUANTISED):
        kinds = ", ".join((*backbones.DTYPES, *backbones.QUANTISED))
        raise UserError(f"{where}.dtype", f"{dtype!r} is not a weight dtype", f"use one of {kinds}")
    if dtype in backbones.QUANTISED and importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(f"{where}.dtype", f"{dtype} weights need bitsandbytes", "pip install bitsandbytes")
    if trust:
        warnings.warn(f"{where}: trust_remote_code is on: the backbone's own Python code will run", stacklevel=3)
    return backbones.Backbone(ref, trust, pooling, weights, dtype)


def load_suite(path: str | Path) -> Suite:
    path = Path(path)
    raw = suite_mapping(path)
    where = str(path)
    for key in raw:
        if key not in SUITE_KEYS:
            raise _unknown(where, key, SUITE_KEYS)
    for key in ("tasks", "methods"):
        if not isinstance(raw.get(key), list) or not raw[key]:
            raise UserError(f"{where}.{key}", "missing or empty", f"list at least one entry under {key}:")
    name = raw.get("name", path.stem)
    if not isinstance(name, str) or not name or "/" in name:
        raise UserError(f"{where}.name", f"{name!r} is not a usable suite name", "use a short name without '/'")
    backbone = parse_backbone(raw.get("backbone"), f"{where}.backbone")

    suite_train = parse_train(raw.get("train"), f"{where}.train")
    settings = _settings(suite_train, f"{where}.train")
    parsed = [_parse_task(t, f"{where}.tasks[{i}]", path.parent, suite_train) for i, t in enumerate(raw["tasks"])]
    tasks = tuple(task for task, _ in parsed)
    task_train = {task.name: overrides for task, overrides in parsed if overrides}
    _no_duplicates([t.name for t in tasks], f"{where}.tasks", "each task once")
    entries = tuple(
        entry for i, m in enumerate(raw["methods"]) for entry in _parse_entries(m, f"{where}.methods[{i}]", suite_train)
    )
    _no_duplicates(
        [e.label for e in entries], f"{where}.methods", "give repeated methods distinct labels, e.g. label: full-lr1e-4"
    )
    seeds = raw.get("seeds", [0])
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)
    ):
        raise UserError(f"{where}.seeds", "must be a non-empty list of non-negative integers", "e.g. seeds: [0, 1, 2]")
    _no_duplicates(seeds, f"{where}.seeds", "list each seed once")
    gate = parse_gate(raw.get("gate"), f"{where}.gate")
    description = raw.get("description", "")
    suite = Suite(name, path, tasks, entries, tuple(seeds), settings, backbone, str(description), gate, task_train)
    try:  # a task's and a method's overrides may each be fine and clash together
        cells = suite.cells()
    except ValueError as exc:
        key, _, problem = str(exc).partition(": ")
        raise UserError(
            f"{where}.train.{key}",
            f"{problem} once task and method overrides combine",
            "make the task's and method's train settings agree",
        ) from None
    filled = next((c for c in cells if c.train.padding == "fill"), None)
    if filled is not None and not backbone.random:
        raise UserError(
            f"{where}.train.padding",
            f"fill ({filled.entry.label} on {filled.task.name}) appends random tokens to the text, which would change "
            "a pretrained model's input",
            "use fill with backbone: {config: ..., weights: random}, or padding: max_length",
        )
    grouped = next((c for c in cells if c.train.group_by_length and c.task.image_column), None)
    if grouped is not None:
        raise UserError(
            f"{where}.train.group_by_length",
            f"{grouped.task.name} is an image task: its examples have no length to group by",
            "drop group_by_length for image tasks (set it per task under the task's train:)",
        )
    if backbone.dtype != "fp32":  # trainable fp32 parameters meet the frozen weights through autocast
        needed = backbones.PRECISION[backbone.dtype]
        clash = next((c for c in cells if c.train.precision != needed), None)
        if clash is not None:
            raise UserError(
                f"{where}.backbone.dtype",
                f"{backbone.dtype} frozen weights need precision: {needed} (autocast), but "
                f"{clash.entry.label} on {clash.task.name} trains in {clash.train.precision}",
                f"set train: {{precision: {needed}}}",
            )
    return suite


def _no_duplicates(items, where, fix):
    seen = set()
    for item in items:
        if item in seen:
            raise UserError(where, f"'{item}' appears twice", fix)
        seen.add(item)
