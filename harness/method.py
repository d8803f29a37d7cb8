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
  and before `apply`, how many parameters the method trains, on the model as it
  stands (in a stack: as the earlier components left it). A method that adds
  and freezes nothing declares `count_trainable(model)`: what is trainable when
  it is applied (alone, every weight; after an adapter method, that method's).
- `activations_depend_on_values` is True if two batches of the same shape can
  make the method save different bytes for backward.
- `unsupported(anatomy)` says, from the backbone's anatomy alone (harness.anatomy:
  its blocks, roles, norms, causality, head) and before any model is trained, why
  the method cannot run on that backbone, or None. What a method needs (biases to
  tune, separate q/k/v projections, a bidirectional encoder, special tokens, ...)
  it checks here, so `validate` lists every unsupported (method, backbone) pair
  and `run` records such a cell as `unsupported` without starting a worker. A
  crash inside a cell because of the architecture is a bug, never a refusal.
- `unplannable()` says why the method's figures cannot be planned on fake tensors (harness.plan), or None:
  where its code reads a value of a tensor the weights reached, or runs a kernel whose fake counterpart in
  torch saves other bytes than the real one. (Code that reads a value is also caught while planning.)
- `set_run(run)`, called by the worker before `apply`, tells the method what the
  harness knows of the run (`Run`: its number of optimizer steps). A method whose
  schedule follows the run's length reads `self.run`; it is None when the method
  is applied outside a harness run (a test, a notebook).

A suite entry with `stack:` becomes a `Stack`, itself a Method (see its docstring
for how the components' optimizer groups and declared counts combine); the worker
builds one Stack for every cell and never asks how many components it has.
"""

import copy
import importlib
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from harness.errors import UserError, did_you_mean
from harness.plugins import import_target

FAMILIES = ("baseline", "PETL", "METL")
BUILTIN_PACKAGE = "methods."  # modules whose named Method classes make up the registry
_REGISTRY: dict[str, type["Method"]] = {}  # name -> class, for the methods that ship in methods/
_RESOLVED: dict[str, type["Method"]] = {}  # reference string -> class: each reference is resolved once per process


@dataclass(frozen=True)
class Run:
    """What the harness knows, before `apply`, of the run a method is applied for."""

    total_steps: int  # optimizer steps the training loop will take (harness.train.total_steps)


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
    run: Run | None = None  # set by set_run; None outside a harness run

    def __init_subclass__(cls, **kwargs):
        """A named subclass in methods/ joins the registry; a plugin (any other module) is found by its
        reference instead, and may not take a registered name. Either way one name, one class."""
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__:  # abstract intermediate classes stay out of the registry
            return
        if cls.family not in FAMILIES:
            raise TypeError(f"{cls.__name__}.family must be one of {FAMILIES}")
        if not cls.__module__.startswith(BUILTIN_PACKAGE):
            return
        other = _REGISTRY.get(cls.name)
        if other is not None and other is not cls:
            raise TypeError(f"method name '{cls.name}' is taken by {other.__module__}.{other.__qualname__}")
        _REGISTRY[cls.name] = cls

    def __init__(self, **hparams):
        unknown = sorted(set(hparams) - set(self.defaults))
        if unknown:
            fix = did_you_mean(unknown[0], self.defaults, f"known: {sorted(self.defaults) or 'none'}")
            raise ValueError(f"unknown hyperparameter '{unknown[0]}' for method '{self.name}'; {fix}")
        for key, value in hparams.items():
            default = self.defaults[key]
            if default is not None and not _same_kind(value, default):
                raise ValueError(
                    f"hyperparameter '{key}' of '{self.name}' must be {type(default).__name__}, got {value!r}"
                )
        self.hparams = {**self.defaults, **hparams}
        self.check_hparams()

    def check_hparams(self) -> None:
        """Raise ValueError for a value out of range; called once at construction."""

    def unsupported(self, anatomy) -> str | None:
        """Why this method (with its hyperparameters) cannot run on a backbone of this `harness.anatomy.Anatomy`,
        in one line that names what is missing; None when it can. Decided from the anatomy alone, before training."""
        return None

    def unplannable(self) -> str | None:
        """Why a plan (harness.plan) cannot give this method's exact figures, in one line; None when it can."""
        return None

    def apply(self, model: torch.nn.Module, task) -> torch.nn.Module:
        raise NotImplementedError

    def expected_trainable_params(self, model: torch.nn.Module, task) -> int:
        raise NotImplementedError

    def param_groups(self, model: torch.nn.Module, lr: float) -> list[dict]:
        """Optimizer groups over the module `apply` returned; override for methods with several learning rates."""
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr}]

    def set_run(self, run: Run) -> None:
        """What the harness knows of the run, before `apply`; override only to pass it on."""
        self.run = run

    def attach(self, model: torch.nn.Module, task) -> tuple[torch.nn.Module, int]:
        """`apply`, with the trainable count declared before it: what the worker calls."""
        declared = self.expected_trainable_params(model, task)
        return self.apply(model, task), declared


class Stack(Method):
    """Methods applied one after another, as one Method (not registered: a suite writes `stack:`).

    - apply: each component's `apply` in order, on what the previous one returned.
    - Declared count: each component's `expected_trainable_params` on the model as the previous
      components left it; the stack declares what its last component declares. So a component that
      adds and freezes nothing (activation compression, say) declares what the earlier ones made trainable.
    - Optimizer groups: each trainable parameter belongs to the last component that made it trainable:
      the first component owns whatever is trainable after it; a later one, the parameters it created
      trainable or unfroze. Each component's `param_groups` is asked about the module its own `apply`
      returned, and keeps, of each group, the parameters it owns; so a method with two learning rates
      keeps both when stacked with one that adds nothing (which owns nothing). A component that keeps
      trainable a parameter that was trainable before it does not take it over. A trainable parameter no
      owner's group lists trains at the cell's lr, in a group of its own.
    - activations_depend_on_values: any component's.
    A one-component stack is that component: same count, same groups.
    """

    family = "baseline"  # unused: a record's family comes from its components (results.stack_family)
    description = "a stack of methods"

    def __init__(self, components: list[Method]):
        if not components:
            raise ValueError("a stack needs at least one method")
        self.components = list(components)
        self.hparams = {}
        self.activations_depend_on_values = any(c.activations_depend_on_values for c in self.components)
        self._applied: list[tuple[Method, torch.nn.Module, set[int]]] | None = None

    def unsupported(self, anatomy) -> str | None:
        """The first component's reason (in a stack of several, prefixed with its name): a stack runs only where
        all its methods do."""
        for component in self.components:
            reason = component.unsupported(anatomy)
            if reason is not None:
                return f"{component.name}: {reason}" if len(self.components) > 1 else reason
        return None

    def unplannable(self) -> str | None:
        reasons = [(c.name, c.unplannable()) for c in self.components]
        return next((f"{name}: {why}" if len(self.components) > 1 else why for name, why in reasons if why), None)

    def set_run(self, run: Run) -> None:
        super().set_run(run)
        for component in self.components:
            component.set_run(run)

    def attach(self, model, task):
        applied, trainable_before, declared = [], None, None
        for component in self.components:
            declared = component.expected_trainable_params(model, task)
            model = component.apply(model, task)
            trainable = {id(p) for p in model.parameters() if p.requires_grad}
            applied.append((component, model, trainable if trainable_before is None else trainable - trainable_before))
            trainable_before = trainable
        self._applied = applied
        return model, declared

    def apply(self, model, task):
        return self.attach(model, task)[0]

    def expected_trainable_params(self, model, task):
        """Before apply, on copies (the worker calls `attach` instead, which declares as it applies)."""
        return Stack([copy.deepcopy(c) for c in self.components]).attach(copy.deepcopy(model), task)[1]

    def param_groups(self, model, lr):
        if self._applied is None:
            raise RuntimeError("a stack's optimizer groups are known once it is applied")
        owner = {}
        for i, (_, _, owned) in enumerate(self._applied):
            owner.update(dict.fromkeys(owned, i))  # a later component's claim wins
        groups, placed = [], set()
        for i, (component, output, _) in enumerate(self._applied):
            for group in component.param_groups(output, lr):
                params = [
                    p for p in group["params"] if p.requires_grad and owner.get(id(p)) == i and id(p) not in placed
                ]
                placed.update(id(p) for p in params)
                if params:
                    groups.append({**group, "params": params})
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in placed]
        if rest:
            groups.append({"params": rest, "lr": lr})
        return groups


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
    return dict(sorted(_REGISTRY.items()))


def resolve(ref: str, where: str) -> type[Method]:
    """A registry name, `module:Class`, or `path/to/file.py[:Class]` -> the Method class.
    Each reference is resolved once per process, and a plugin's file or module executed once."""
    target, colon, class_name = ref.partition(":")
    key = f"{Path(target).resolve()}{colon}{class_name}" if target.endswith(".py") else ref  # a file, wherever run from
    if key not in _RESOLVED:
        _RESOLVED[key] = _resolve(ref, where)
    return _RESOLVED[key]


def _resolve(ref: str, where: str) -> type[Method]:
    if ":" not in ref and not ref.endswith(".py"):
        known = registry()
        if ref in known:
            return known[ref]
        fix = did_you_mean(ref, known, "see `python -m harness list methods`, or name a plugin as module:Class")
        raise UserError(where, f"unknown method '{ref}'", fix)
    target, _, class_name = ref.partition(":")
    module = import_target(target, where)
    if class_name:
        cls = getattr(module, class_name, None)
    else:
        found = [
            c
            for c in vars(module).values()
            if isinstance(c, type)
            and issubclass(c, Method)
            and "name" in c.__dict__
            and c.__module__ == module.__name__
        ]
        cls = found[0] if len(found) == 1 else None
        if cls is None:
            raise UserError(where, f"plugin '{target}' defines {len(found)} methods", "name one as path.py:ClassName")
    if not (isinstance(cls, type) and issubclass(cls, Method) and "name" in cls.__dict__):
        raise UserError(
            where, f"'{ref}' is not a Method subclass with a name", "subclass harness.method.Method and set name"
        )
    builtin = registry().get(cls.name)
    if builtin is not None and builtin is not cls:
        raise UserError(
            where,
            f"plugin method name '{cls.name}' is taken by {builtin.__module__}.{builtin.__qualname__}",
            "give the plugin class another name",
        )
    return cls


def head_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The task head: every parameter outside the pretrained backbone (`base_model`). A language model's head
    (its output embeddings, for a causal_lm task) is pretrained, not a task head: none, unless a method
    trains it of its own accord."""
    prefix = model.base_model_prefix + "."
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    pretrained = {id(p) for p in output.parameters()} if output is not None else set()
    return {n: p for n, p in model.named_parameters() if not n.startswith(prefix) and id(p) not in pretrained}


def freeze_all(model: torch.nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def count(params) -> int:
    return sum(p.numel() for p in params)


def count_trainable(model: torch.nn.Module) -> int:
    """What a method that adds and freezes nothing declares: the parameters trainable when it is applied."""
    return count(p for p in model.parameters() if p.requires_grad)
