"""Plan a cell without its memory: the exact figures of its first training steps, run on fake tensors.

The backbone, the method's modules, gradients, optimizer state and every activation are built inside
torch's FakeTensorMode: each tensor has its shape, dtype and device and no memory, so an 8B model plans
on a laptop. The batches are real, from the task's data tokenised as a run tokenises it, and the step
runs outside the mode: what a method computes from the inputs alone (padding masks, real-token counts,
the tokens it selects) is computed as in a run, and only what meets a weight is fake. The step is the
run's own (harness.train.step) under the run's meter, so a plan's figures are a run's, to the byte, for
the figures that follow from shapes (harness.meter.EXACT_FIGURES; kernels as on CPU).

Which batches a plan steps through, from the batches the run would see (its seed's shuffle, its steps):
- the first: gradients, optimizer state, FLOPs and the attention kernel are recorded on it, as in a run;
- the longest (the most positions; with dynamic padding, the batch holding the longest example): a run's
  activation maximum over its batch shapes, since what a step saves grows with its shapes;
- for a method whose saved bytes follow the values (`activations_depend_on_values`), also the batch with the
  most real tokens and the one holding the longest row: what such methods keep follows one or the other
  (a sample of the real tokens follows their count; a block of selected tokens, the longest row).

With a budget, the largest micro-batch (the examples of one forward and backward) whose modelled peak fits
is searched for, at the cell's sequence length with every position a real token (the worst case).

What cannot be planned is recorded `unsupported` with the reason: quantised weights (bitsandbytes quantises
from the values, which fake tensors lack), and code that reads a value of a tensor the weights reached
(`.item()`, a shape that follows values).
"""

import contextlib
import dataclasses
import gc
import resource
import time
import traceback
import warnings
from unittest import mock

import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from harness import backbone, data, results, worker
from harness.config import Cell
from harness.meter import EXACT_FIGURES, Meter
from harness.method import count
from harness.train import accumulate, linear_schedule, make_optimizer, step, total_steps

CPU = torch.device("cpu")
PLANNED_DEVICE = "plan: fake tensors, CPU kernels"
LARGEST_SEARCHED = 4096  # the search stops here: a batch this large that still fits is reported as "at least"
LARGEST_REAL_FACTORY_BYTES = 16 * 2**20  # larger tensors made from shapes alone are fake (LargeFactoriesFake)


@contextlib.contextmanager
def fake_tensors():
    """torch's FakeTensorMode, with Module.to() working on its parameters. torch converts a fake parameter by
    swapping it with its converted copy (torch.utils.swap_tensors), which refuses a tensor the mode holds a weak
    reference to, as it holds one to every fake parameter. Where it refuses, a conversion that changes nothing
    (peft moves each adapter it adds to its base layer's device and dtype: the ones it has) is left undone, and
    any other takes the copy's data, as Module.to does for plain tensors.
    And fake weights take no values: torch's truncated-normal initialiser, which redraws the samples outside its
    bounds until none is left (a test of values), leaves them as they are, as it does meta tensors.
    And a copy of a fake tensor stays in this mode: torch's Tensor.__deepcopy__ deep-copies a subclass's __dict__,
    and a fake tensor's holds its mode, so each copy.deepcopy of a module (methods copy norms, side networks and
    heads) made a new mode by copying this one with all it refers to; freeing those copies
    crashed planning processes now and then (SIGSEGV, SIGABRT)."""
    swap = torch.utils.swap_tensors

    def swap_or_set(t1, t2):
        try:
            swap(t1, t2)
        except RuntimeError as exc:
            if "weakref" not in str(exc):
                raise
            if (t1.shape, t1.dtype, t1.device) != (t2.shape, t2.dtype, t2.device):
                t1.data = t2.data

    with (
        FakeTensorMode(allow_non_fake_inputs=True) as mode,
        mock.patch("torch.utils.swap_tensors", swap_or_set),
        mock.patch("torch.nn.init._no_grad_trunc_normal_", lambda tensor, *args, **kwargs: tensor),
        mock.patch.object(FakeTensorMode, "__deepcopy__", lambda mode, memo: mode, create=True),
    ):
        yield mode


class LargeFactoriesFake(TorchDispatchMode):
    """During a plan's step, a tensor made from no tensor (torch.eye, zeros, full, arange...) above
    LARGEST_REAL_FACTORY_BYTES is made fake. The step runs outside the fake mode so that what a method computes
    from its inputs is real, which also makes such tensors real: a method may build its low-rank update by passing
    an identity of each layer's input width through the adapter, and at Llama-3.1-8B shape the 14,336-wide
    identity (822 MB, and its bf16 copy under autocast) took most of a minute per step to fill and cast, only to
    meet fake weights. Its shape, dtype and device are unchanged, so is every figure; a tensor that large made from
    shapes is a workspace for weights, not a value methods read, and code that did read one would stop the plan
    with CannotPlan, never give a wrong figure."""

    def __init__(self, mode: FakeTensorMode):
        super().__init__()
        self.mode = mode

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(isinstance(a, torch.Tensor) for a in tree_leaves((args, kwargs))):
            return func(*args, **kwargs)
        with self.mode:
            fake = func(*args, **kwargs)
        made = [t for t in tree_leaves(fake) if isinstance(t, torch.Tensor)]
        if sum(t.numel() * t.element_size() for t in made) > LARGEST_REAL_FACTORY_BYTES:
            return fake
        return func(*args, **kwargs)


class CannotPlan(Exception):
    """The cell's code needs values that fake tensors do not hold."""


@contextlib.contextmanager
def reading_no_values(doing: str):
    """Turns torch's refusal to read a fake tensor's value (`.item()`, a shape that follows values) into
    CannotPlan, naming the line that asked."""
    try:
        yield
    except (DataDependentOutputException, DynamicOutputShapeException) as exc:
        raise CannotPlan(f"{doing} reads a value a plan does not have, at {_reader(exc)}") from exc


class Planner:
    """One cell's fake model, optimizer and meter; `figures(batches)` steps through batches and reads the meter."""

    def __init__(self, cell: Cell, steps: int):
        if cell.backbone.dtype in backbone.QUANTISED:
            raise CannotPlan(
                f"{cell.backbone.dtype} weights cannot be planned: bitsandbytes quantises a weight from its values, "
                "which a plan's fake tensors do not hold"
            )
        reason = worker.stack_of(cell).unplannable()
        if reason is not None:
            raise CannotPlan(reason)
        self.cell, self.steps = cell, steps
        with reading_no_values("applying it"), fake_tensors() as self.mode:
            self.model, self.declared, self.groups, self.value_dependent = worker.build(
                cell, steps, CPU, read_weights=False
            )

    def figures(self, batches: list[dict]) -> dict:
        """Exact figures of a fresh run's first steps over `batches` (harness.meter.EXACT_FIGURES)."""
        settings = self.cell.train
        optimizer = make_optimizer(self.groups, settings.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(self.steps, settings.warmup_ratio))
        # fp16's loss scaling reads whether the gradients are finite, a value; it keeps two scalars only
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        meter = Meter(self.model, CPU, count_activations="every_step", precision=settings.precision)
        self.model.train()
        with reading_no_values("its code"), LargeFactoriesFake(self.mode):
            step(self.model, optimizer, scheduler, scaler, batches[0], settings, CPU, meter, first=True)
            for batch in batches[1:]:  # only their saved tensors are read: no update (none changes a shape)
                accumulate(self.model, scaler, batch, settings, CPU, meter)
                optimizer.zero_grad(set_to_none=True)
        summary = meter.summary()
        return {k: summary[k] for k in EXACT_FIGURES if k in summary}

    def activations(self, batch: dict) -> int:
        """Saved-activation bytes of one forward and backward of `batch` as one micro-batch (what the budget
        search varies: weights, gradients and optimizer state do not follow the batch)."""
        one_pass = dataclasses.replace(self.cell.train, micro_batch_size=None)
        meter = Meter(self.model, CPU, count_activations="every_step", precision=one_pass.precision)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        with reading_no_values("its code"), LargeFactoriesFake(self.mode):
            accumulate(self.model, scaler, batch, one_pass, CPU, meter)
        self.model.zero_grad(set_to_none=True)
        return meter.summary()["activation_bytes"]


def _reader(exc: BaseException) -> str:
    """Where the code that asked for a value is: the innermost frame outside torch and this module (whose
    dispatch mode sees every op), as `file:line (code)`."""
    frames = [
        f for f in traceback.extract_tb(exc.__traceback__) if "/torch/" not in f.filename and f.filename != __file__
    ]
    if not frames:
        return str(exc)
    frame = frames[-1]
    where = frame.filename.split("site-packages/")[-1]
    return f"{where}:{frame.lineno} ({(frame.line or '').strip()[:120]})"


def positions(batch: dict) -> int:
    """How large a batch's work is: the elements of its model inputs (token ids, or pixels)."""
    return sum(v.numel() for k, v in batch.items() if k != "labels")


def real_tokens(batch: dict) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else positions(batch)


def run_batches(loader, steps: int):
    """The batches a run of `steps` steps draws from `loader`, in its order (a fresh pass per epoch)."""
    drawn = 0
    while drawn < steps:
        for batch in loader:
            yield batch
            drawn += 1
            if drawn >= steps:
                return


def longest_row(batch: dict) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum(-1).max()) if mask is not None else positions(batch)


# What a batch is chosen for (harness.plan's docstring): the largest by each of these, in this order.
BY_SHAPE = (("longest", positions),)
BY_VALUES = (("most real tokens", real_tokens), ("longest row", longest_row))


def chosen_batches(loader, steps: int, value_dependent: bool) -> list[tuple[str, dict]]:
    """(why, batch): the run's first batch, its longest and, for a method whose saved bytes follow the values,
    the one with the most real tokens and the one holding the longest row; each batch once."""
    measures = BY_SHAPE + (BY_VALUES if value_dependent else ())
    first, best = None, {}
    for batch in run_batches(loader, steps):
        first = batch if first is None else first
        for why, size in measures:
            if why not in best or size(batch) > size(best[why]):
                best[why] = batch
    unique: list[tuple[str, dict]] = [("first", first)]
    for why, _ in measures:
        same = next((i for i, (_, b) in enumerate(unique) if b is best[why]), None)
        if same is None:
            unique.append((why, best[why]))
        else:
            unique[same] = (f"{unique[same][0]}, {why}", best[why])
    return unique


def lengths_source(cell: Cell) -> str:
    padding = cell.train.padding
    if cell.task.modality == "image":
        return "the image processor's fixed size"
    if padding == "dynamic":
        return f"the task's real token lengths (dynamic padding, at most {cell.train.max_seq_length})"
    if padding == "fill":
        return f"{cell.train.max_seq_length} real tokens per sequence (padding: fill)"
    return f"{cell.train.max_seq_length} positions per sequence (padding: max_length)"


def full_length_batch(cell: Cell, dataset, preprocessor, size: int, mode: FakeTensorMode) -> dict:
    """`size` examples with every position up to the sequence length a real token: a few of the training set's,
    repeated. Floating-point inputs (pixels, regression targets) are made fake: no code reads their values, and
    at a large batch they would take real memory; token ids and masks stay real, as methods read them."""
    few = [dict(dataset[i % len(dataset)]) for i in range(min(size, 8))]
    collate = data.make_collate(
        cell.task, preprocessor, "dynamic" if cell.task.modality == "image" else "fill", cell.train.max_seq_length
    )
    batch = {}
    for key, value in collate(few).items():
        if value.is_floating_point():
            with mode:
                batch[key] = torch.empty((size, *value.shape[1:]), dtype=value.dtype)
        else:
            repeats = -(-size // len(value))
            batch[key] = value.repeat(repeats, *([1] * (value.dim() - 1)))[:size].clone()
    return batch


def largest_batch(peak_at, budget: int) -> tuple[int, dict[int, int]]:
    """The largest batch size b with peak_at(b) <= budget (0 if none), and every peak probed. The peak grows
    with b, linearly in what a step saves: the line through b = 1 and 2 predicts the answer, which is then
    checked at it and one above, and bisected where the prediction misses."""
    probed: dict[int, int] = {}

    def fits(b: int) -> bool:
        if b not in probed:
            probed[b] = peak_at(b)
        return probed[b] <= budget

    if not fits(1):
        return 0, probed
    slope = max(1, probed.setdefault(2, peak_at(2)) - probed[1])
    guess = min(LARGEST_SEARCHED, max(1, 1 + (budget - probed[1]) // slope))
    low, high = 1, None  # low fits; high, once known, does not
    if fits(guess):
        low = guess
        high = guess + 1 if not fits(guess + 1) else None
        while high is None:  # the prediction fell short: gallop up
            if low >= LARGEST_SEARCHED:
                return LARGEST_SEARCHED, probed
            nxt = min(LARGEST_SEARCHED, low * 2)
            low, high = (nxt, None) if fits(nxt) else (low, nxt)
    else:
        high = guess
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low, probed


def plan_cell(cell: Cell, data_dir, known: dict, budgets: tuple[int, ...] = ()) -> dict:
    """A cell's plan: a record like a run's, its measurements the exact figures, `plan` saying what was planned."""
    started = time.time()
    record = results.new_record(cell.to_dict(), **known, started=started)
    record["env"] = {"device": PLANNED_DEVICE, "device_type": "plan"}
    record["plan"] = {"lengths": lengths_source(cell)}
    try:
        with warnings.catch_warnings():
            # copy.deepcopy of a fake tensor asks for its address, which torch warns is none; the copy is right
            warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
            _plan_into(record, cell, data_dir, budgets)
        record["status"] = "ok"
    except CannotPlan as exc:
        record.update(status="unsupported", error={"type": "CannotPlan", "message": str(exc)})
    except Exception as exc:  # a fault in one cell's plan is its record's, and the suite goes on
        record.update(status="failed", error=worker.error_record(exc))
    finally:
        # The plan's fake tensors are freed here: left to a later garbage collection inside other code, freeing
        # them has crashed the process (tests that plan and then run in one process). A plan's own process
        # (harness.runner, harness.worker) collects nothing and exits without teardown instead.
        if gc.isenabled():
            gc.collect()
    # what planning cost this process (the plan's own figure, not the cell's: a plan allocates no cell's memory)
    record["plan"]["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return results.finish(record, started)


def _plan_into(record: dict, cell: Cell, data_dir, budgets) -> None:
    worker.seed_everything(cell.seed)
    preprocessor = backbone.load_preprocessor(cell.backbone, cell.task)
    _, train_loader, _, _ = worker.loaders(cell, data_dir, preprocessor)
    steps = total_steps(cell.train, len(train_loader))
    planner = Planner(cell, steps)
    model = planner.model
    record["params"] = {
        "trainable": count(p for p in model.parameters() if p.requires_grad),
        "total": count(model.parameters()),
        "declared_trainable": planner.declared,
    }
    chosen = chosen_batches(train_loader, steps, planner.value_dependent)
    record["measurements"] = planner.figures([batch for _, batch in chosen])
    record["plan"]["batches"] = [
        {"why": why, "shape": list(batch["labels"].shape[:1]) + _length(batch), "real_tokens": real_tokens(batch)}
        for why, batch in chosen
    ]
    if budgets:
        record["plan"]["budgets"] = _search(
            planner, cell, train_loader.dataset, preprocessor, budgets, record["measurements"]
        )


def _length(batch: dict) -> list[int]:
    ids = batch.get("input_ids")
    return [ids.shape[1]] if ids is not None else []


def _search(planner: Planner, cell: Cell, dataset, preprocessor, budgets, planned: dict) -> list[dict]:
    """Per budget: whether the cell as planned fits, and the largest micro-batch that would."""
    held = planned["modelled_peak_bytes"] - planned["activation_bytes"]  # weights, gradients, optimizer state
    peaks: dict[int, int] = {}

    def peak_at(size: int) -> int:
        if size not in peaks:
            batch = full_length_batch(cell, dataset, preprocessor, size, planner.mode)
            peaks[size] = held + planner.activations(batch)
        return peaks[size]

    found = []
    for budget in budgets:
        largest, _ = largest_batch(peak_at, budget)
        found.append(
            {
                "budget_bytes": budget,
                "largest_batch": largest,
                "at_least": largest >= LARGEST_SEARCHED,
                "fits": planned["modelled_peak_bytes"] <= budget,
                "peak_at_largest": peaks.get(largest),
                "peak_above_largest": peaks.get(largest + 1),
            }
        )
    return found
