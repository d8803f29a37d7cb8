"""The one class a tuning method subclasses, and the registry that finds it.

A method is a subclass of `Method` with a `name`; defining it registers it.
The harness never names a particular method: suites do, and `resolve` finds
the class by registry name, by `module:Class`, or by `path/to/file.py:Class`.

The contract, checked for every registered method by tests/test_contract.py:
- `apply(model, task)` freezes, wraps or extends the model and returns a module
  whose `forward(**batch)` returns an object with `.loss` and `.logits` (the
  Hugging Face sequence-classification convention). Parameters left with
  `requires_grad=True` are what gets trained and counted.
- `expected_trainable_params(model, task)` says, from the model's shapes alone
  and before `apply`, how many parameters the method trains.
- `activations_depend_on_values` is True if two batches of the same shape can
  make the method save different bytes for backward.
"""

import difflib
import importlib
import importlib.util
import pkgutil
import sys
from pathlib import Path
from typing import Any, ClassVar

import torch

from harness.errors import UserError

FAMILIES = ("baseline", "PETL", "METL")
_REGISTRY: dict[str, type["Method"]] = {}


class Method:
    name: ClassVar[str]  # registry key used in suites
    family: ClassVar[str]  # one of FAMILIES
    description: ClassVar[str]  # one line for `harness list methods`
    paper: ClassVar[str] = ""  # citation of the paper the defaults come from
    trains: ClassVar[str] = ""  # what is trained, in words, for the README table
    defaults: ClassVar[dict[str, Any]] = {}  # every hyperparameter, with the paper's default
    default_lr: ClassVar[float] = 1e-3  # used when a suite entry gives no lr
    # True when what autograd saves can differ between two batches of one shape (it follows the
    # padding mask or sampled values): the meter then counts every step, not each shape once.
    activations_depend_on_values: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__:  # abstract intermediate classes stay out of the registry
            return
        if cls.family not in FAMILIES:
            raise TypeError(f"{cls.__name__}.family must be one of {FAMILIES}")
        other = _REGISTRY.get(cls.name)
        if other is not None and other.__qualname__ != cls.__qualname__:
            raise TypeError(f"method name '{cls.name}' is taken by {other.__module__}.{other.__qualname__}")
        _REGISTRY[cls.name] = cls

    def __init__(self, **hparams):
        unknown = sorted(set(hparams) - set(self.defaults))
        if unknown:
            close = difflib.get_close_matches(unknown[0], self.defaults, n=1)
            fix = f"did you mean '{close[0]}'?" if close else f"known: {sorted(self.defaults) or 'none'}"
            raise ValueError(f"unknown hyperparameter '{unknown[0]}' for method '{self.name}'; {fix}")
        for key, value in hparams.items():
            default = self.defaults[key]
            if default is not None and not _same_kind(value, default):
                raise ValueError(f"hyperparameter '{key}' of '{self.name}' must be {type(default).__name__}, got {value!r}")
        self.hparams = {**self.defaults, **hparams}
        self.check_hparams()

    def check_hparams(self) -> None:
        """Raise ValueError for a value out of range; called once at construction."""

    def apply(self, model: torch.nn.Module, task) -> torch.nn.Module:
        raise NotImplementedError

    def expected_trainable_params(self, model: torch.nn.Module, task) -> int:
        raise NotImplementedError

    def param_groups(self, model: torch.nn.Module, lr: float) -> list[dict]:
        """Optimizer groups; override for methods with several learning rates."""
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr}]


def _same_kind(value, default) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    return isinstance(value, type(default))


def _load_builtin_methods() -> None:
    """Import every module of the `methods` package once: defining a class registers it."""
    import methods
    for info in pkgutil.iter_modules(methods.__path__):
        importlib.import_module(f"methods.{info.name}")


def registry() -> dict[str, type[Method]]:
    """The methods that ship in `methods/`. A plugin is named by its module or file,
    so one a suite (or a test) has loaded never joins the listing or the README table."""
    _load_builtin_methods()
    return {name: cls for name, cls in sorted(_REGISTRY.items()) if cls.__module__.startswith("methods.")}


def resolve(ref: str, where: str) -> type[Method]:
    """A registry name, `module:Class`, or `path/to/file.py[:Class]` -> the Method class."""
    if ":" not in ref and not ref.endswith(".py"):
        known = registry()
        if ref in known:
            return known[ref]
        close = difflib.get_close_matches(ref, known, n=1)
        fix = f"did you mean '{close[0]}'?" if close else "see `python -m harness list methods`, or name a plugin as module:Class"
        raise UserError(where, f"unknown method '{ref}'", fix)
    target, _, class_name = ref.partition(":")
    try:
        if target.endswith(".py"):
            path = Path(target).resolve()
            if not path.is_file():
                problem = "is a folder, not a Python file" if path.is_dir() else "does not exist"
                raise UserError(where, f"plugin file '{target}' {problem}", "give a path relative to where you run the harness")
            spec = importlib.util.spec_from_file_location(f"harness_plugin_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except UserError:
        raise
    except Exception as exc:  # the plugin's own import error, shown in one line
        raise UserError(where, f"cannot import plugin '{target}': {type(exc).__name__}: {exc}", "check the module name and that it imports") from None
    if class_name:
        cls = getattr(module, class_name, None)
    else:
        found = [c for c in vars(module).values() if isinstance(c, type) and issubclass(c, Method) and "name" in c.__dict__ and c.__module__ == module.__name__]
        cls = found[0] if len(found) == 1 else None
        if cls is None:
            raise UserError(where, f"plugin '{target}' defines {len(found)} methods", "name one as path.py:ClassName")
    if not (isinstance(cls, type) and issubclass(cls, Method) and "name" in cls.__dict__):
        raise UserError(where, f"'{ref}' is not a Method subclass with a name", "subclass harness.method.Method and set name")
    return cls


def head_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The task head: every parameter outside the pretrained backbone (`base_model`)."""
    prefix = model.base_model_prefix + "."
    return {n: p for n, p in model.named_parameters() if not n.startswith(prefix)}


def freeze_all(model: torch.nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def count(params) -> int:
    return sum(p.numel() for p in params)
