"""Memory and throughput figures for one cell, each one labelled with what it is.

Exact on any device:
- activation_bytes: bytes of the tensors saved for backward by one forward
  (micro-)batch that are still held when its backward starts, counted with
  `torch.autograd.graph.saved_tensors_hooks`, storages de-duplicated and
  parameters/buffers left out; the maximum over the counted steps. (A tensor
  saved by a side computation whose graph the forward drops again is freed
  before backward and is not counted.) By default each distinct batch shape is
  counted once (`count_activations: per_shape`), which for a method whose
  saved bytes follow the shapes is the same maximum as counting every step,
  with the per-tensor Python hook off most steps of a long run. A method that
  declares `activations_depend_on_values` (its saved bytes follow the padding
  or sampled values) is counted every step, whatever the setting.
  Deterministic on CPU, so gates can rest on it.
- frozen/trainable parameter bytes (quantised frozen weights: their packed
  values and quantisation constants), buffer bytes, gradient bytes (after the
  first backward) and optimizer-state bytes (after the first optimizer step).
- modelled_peak_bytes: their sum, a model of the training peak that leaves out
  the framework's temporaries and allocator slack.
Device-reported:
- CUDA: torch.cuda.max_memory_allocated / max_memory_reserved, reset at the
  start of each phase (train and eval are separate figures).
- NVML: the process's GPU memory sampled by a background thread. Where NVML
  cannot see this process (containers, MIG) the figure is device-wide usage
  minus the usage before the phase, and `nvml_source` says so.
- Host: the worker's peak RSS (getrusage), which includes model loading.
- CUDA reserved memory after every training step (torch.cuda.memory_reserved): its
  max, mean and 99th percentile over the steps, as peft's `method_comparison`
  reports memory, so that a figure can be set beside theirs.
FLOPs: train_step_flops, the floating-point operations of the first training step (forward, backward and
optimizer step, recomputation included), as PyTorch's FlopCounterMode counts them (matrix products,
convolutions and attention; elementwise work is left out). Where every timed step has the first step's shapes,
achieved_flops_per_s = train_step_flops / the timed steps' mean time and, on a CUDA device whose peak
harness.environment knows, mfu = that over the peak at the run's precision (with gradient checkpointing the
recomputed forward counts, so it is what is elsewhere called hardware FLOPs utilisation).
Throughput: samples/s and non-padding tokens/s (for images, patches/s) over the timed steps (the first
`timing_warmup_steps` left out, CUDA synchronised around each), and step-time
median and p90; for a causal LM also target tokens/s (the tokens the loss covers).
What ran, so that figures are compared only with figures measured the same way:
- attention_implementation: the model's `config._attn_implementation` (sdpa,
  eager, or one a method registered).
- attention_backend: the attention kernel found in the first step's autograd
  graph (what saved the attention's tensors): flash, flash_cpu, efficient or
  cudnn for SDPA's fused kernels, math when SDPA fell back to its unfused path
  (on CPU: attention dropout), the name of a method's own op, or none when no
  attention is back-propagated through.
- count_activations: per_shape or every_step, as used (a method whose saved
  bytes follow the values, not only the shapes, is counted every step).
"""

import contextlib
import os
import resource
import threading
import time
import weakref

import numpy as np
import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils.flop_counter import FlopCounterMode

from harness import causal_lm, environment


def is_fake(t: torch.Tensor) -> bool:
    """A tensor of torch's FakeTensorMode (harness.plan): shape, dtype and device, no memory. Its storage has
    a size but no address, so storages are told apart by the storage object itself."""
    return isinstance(t, FakeTensor)


# The figures that follow from shapes alone, exact on any device: what a plan (harness.plan) gives, and what a
# plan and a run of the same cell must agree on to the byte.
EXACT_FIGURES = (
    "frozen_param_bytes",
    "trainable_param_bytes",
    "buffer_bytes",
    "grad_bytes",
    "optimizer_bytes",
    "activation_bytes",
    "modelled_peak_bytes",
    "train_step_flops",
    "attention_implementation",
    "attention_backend",
    "optimizer_step",
)


def storage_key(t: torch.Tensor):
    """(device, data pointer) of a tensor's storage: tensors sharing memory share the key."""
    if is_fake(t):
        return "fake", t.untyped_storage()._cdata
    try:
        return t.device, t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without a plain storage
        return t.device, id(t)


def storage_bytes(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError):
        return t.numel() * t.element_size()


def unique_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        seen.setdefault(storage_key(t), storage_bytes(t))
    return sum(seen.values())


def quantisation_constants(parameter: torch.Tensor) -> list[torch.Tensor]:
    """The tensors a quantised weight needs besides its packed values, which are no parameters of the model:
    bitsandbytes' 4-bit quantisation state (block absmax, code, and the state that quantises the absmax in
    turn) or its 8-bit row scales (SCB). Empty for any other tensor."""
    found, state = [], getattr(parameter, "quant_state", None)
    while state is not None:
        found += [v for v in vars(state).values() if torch.is_tensor(v)]
        state = getattr(state, "state2", None)
    scales = getattr(parameter, "SCB", None)
    return found + ([scales] if torch.is_tensor(scales) else [])


def _fast_key(t: torch.Tensor):
    """storage_key without building a storage object: the hook runs for every saved tensor."""
    if is_fake(t):
        return "fake", t.untyped_storage()._cdata
    try:
        return t.is_cuda, t.data_ptr() - t.storage_offset() * t.element_size()
    except RuntimeError:  # tensor subclasses without plain data
        return t.is_cuda, id(t)


def batch_shape(batch: dict) -> tuple:
    """What decides a batch's saved bytes and FLOPs for a method whose work follows the shapes."""
    return tuple((k, tuple(v.shape)) for k, v in sorted(batch.items()))


def attention_implementation(model: torch.nn.Module) -> str | None:
    """The attention implementation the (first) transformers model inside `model` dispatches to."""
    from harness.anatomy import transformers_model

    top = transformers_model(model)
    return getattr(top.config, "_attn_implementation", None) if top is not None else None


# Backward nodes of SDPA's fused kernels -> the backend's name in records.
_FUSED_NODES = {
    "ScaledDotProductFlashAttentionForCpuBackward": "flash_cpu",
    "ScaledDotProductFlashAttentionBackward": "flash",
    "ScaledDotProductEfficientAttentionBackward": "efficient",
    "ScaledDotProductCudnnAttentionBackward": "cudnn",
}


def attention_backend(loss: torch.Tensor, implementation: str | None) -> str:
    """Which attention kernel saved tensors in the graph behind `loss` (see the module docstring)."""
    seen, stack, found, softmax = set(), [loss.grad_fn], set(), False
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        name = type(node).__name__.rstrip("0123456789").removesuffix("Backward") + "Backward"
        if name in _FUSED_NODES:
            found.add(_FUSED_NODES[name])
        elif "Attention" in name:  # a method's own autograd op
            found.add(name.removesuffix("Backward"))
        softmax = softmax or name in ("SoftmaxBackward", "SafeSoftmaxBackward")  # unfused attention's softmax
        stack.extend(next_node for next_node, _ in node.next_functions)
    if found:
        return "+".join(sorted(found))
    if not softmax or implementation is None:
        return "none"
    return "math" if implementation == "sdpa" else implementation


class TotalFlops(FlopCounterMode):
    """PyTorch's FLOP counter (its formulas per operator) without its per-module breakdown: the module tracker
    that breakdown needs hooks every module's inputs and outputs for backward, which keeps tensors alive that
    the step would free, and so would change what the saved-tensor count finds."""

    class _Everything:
        parents = ("Global",)  # the one bucket get_total_flops reads

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

    def __init__(self):
        super().__init__(display=False)
        self.mod_tracker = self._Everything()


class SavedTensorCounter:
    """Counts the distinct storages autograd saves for backward while active, as held when backward starts.

    Parameters and buffers of `model` are left out: they exist whether or not a
    graph is built. Use one `with counter:` per forward+backward; `.last` is the
    count of the latest, `.peak` the maximum so far. Each saved tensor is held by
    a weak reference, so counting extends no tensor's life; the first unpack (the
    start of backward) sums the storages still alive.
    """

    def __init__(self, model: torch.nn.Module):
        self.exclude = {_fast_key(t) for t in (*model.parameters(), *model.buffers())}
        self.peak = 0
        self.last = 0
        self._seen: dict = {}  # storage key -> (bytes, weak references to the tensors saved on it)
        self._at_backward = None

    def _pack(self, t):
        key = _fast_key(t)
        if key not in self.exclude:
            entry = self._seen.get(key)
            if entry is None or not any(ref() is not None for ref in entry[1]):  # new, or memory reused
                self._seen[key] = (storage_bytes(t), [weakref.ref(t)])
            else:
                entry[1].append(weakref.ref(t))
        return t

    def _unpack(self, t):
        if self._at_backward is None:
            self._at_backward = self._alive_bytes()
        return t

    def _alive_bytes(self) -> int:
        return sum(size for size, refs in self._seen.values() if any(ref() is not None for ref in refs))

    def __enter__(self):
        self._seen, self._at_backward = {}, None
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        self.last = self._at_backward if self._at_backward is not None else self._alive_bytes()
        self.peak = max(self.peak, self.last)
        self._seen, self._at_backward = {}, None


class NvmlSampler:
    """Samples this process's GPU memory in a background thread; keeps the peak."""

    def __init__(self, device: torch.device, interval_s: float):
        import pynvml

        self.nvml, self.interval_s = pynvml, interval_s
        pynvml.nvmlInit()
        self.handle = self._handle_for(device)
        self.pid = os.getpid()
        self.baseline = pynvml.nvmlDeviceGetMemoryInfo(self.handle).used
        self.source = "process" if self._process_bytes() is not None else "device_minus_baseline"
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="nvml-sampler", daemon=True)

    def _handle_for(self, device):
        # CUDA_VISIBLE_DEVICES renumbers devices; the UUID is what both sides agree on.
        uuid = str(torch.cuda.get_device_properties(device).uuid)
        for i in range(self.nvml.nvmlDeviceGetCount()):
            handle = self.nvml.nvmlDeviceGetHandleByIndex(i)
            nvml_uuid = self.nvml.nvmlDeviceGetUUID(handle)
            nvml_uuid = nvml_uuid.decode() if isinstance(nvml_uuid, bytes) else nvml_uuid
            if nvml_uuid.removeprefix("GPU-").removeprefix("MIG-") == uuid.removeprefix("GPU-").removeprefix("MIG-"):
                return handle
        return self.nvml.nvmlDeviceGetHandleByIndex(device.index or 0)

    def _process_bytes(self):
        try:
            for proc in self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle):
                if proc.pid == self.pid and proc.usedGpuMemory is not None:
                    return proc.usedGpuMemory
        except self.nvml.NVMLError:
            pass
        return None

    def sample(self) -> int:
        if self.source == "process":
            value = self._process_bytes() or 0
        else:
            value = self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used - self.baseline
        self.peak = max(self.peak, value)
        self.samples += 1
        return value

    def _loop(self):
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self):
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sample()


def optimizer_step(optimizer: torch.optim.Optimizer) -> str:
    """How the optimizer updates its tensors: one fused kernel, batched foreach kernels, or a Python loop
    (the speed differs; the state and its bytes do not)."""
    defaults = optimizer.defaults
    foreach = defaults.get("foreach")
    kind = "fused" if defaults.get("fused") else {True: "foreach", False: "for-loop", None: "torch's default"}[foreach]
    return f"{type(optimizer).__name__} ({kind})"


class Meter:
    """Collects every figure of one cell; `summary()` is what the result records.

    `enabled=False` keeps the step timing but skips the saved-tensor hooks and
    NVML sampling, so the meter's own cost can be measured.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        device: torch.device,
        timing_warmup_steps: int = 3,
        nvml_interval_s: float = 0.02,
        enabled: bool = True,
        count_activations: str = "per_shape",
        precision: str = "fp32",
    ):
        self.model, self.device, self.enabled, self.precision = model, device, enabled, precision
        self.count_every_step = count_activations == "every_step"
        self.figures: dict = {
            "count_activations": count_activations,
            "attention_implementation": attention_implementation(model),
        }
        self._counted_shapes: set = set()
        self.cuda = device.type == "cuda"
        self.timing_warmup_steps = timing_warmup_steps
        self.nvml_interval_s = nvml_interval_s
        self.saved = SavedTensorCounter(model)
        self.steps: list[tuple[float, int, int, int]] = []  # (seconds, samples, non-padding tokens, target tokens)
        self.shapes: list[tuple] = []  # each step's batch shapes
        self.reserved: list[int] = []  # CUDA memory reserved after each training step
        self.notes: list[str] = []
        self._record_params()

    def _record_params(self):
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        frozen = [p for p in self.model.parameters() if not p.requires_grad]
        self.figures.update(
            trainable_param_bytes=unique_bytes(trainable),
            frozen_param_bytes=unique_bytes([*frozen, *(t for p in frozen for t in quantisation_constants(p))]),
            buffer_bytes=unique_bytes(self.model.buffers()),
        )

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def phase(self, name: str):
        """Wall time, CUDA peaks and NVML peak of a phase ('train' or 'eval')."""
        sampler = None
        if self.cuda:
            self._sync()
            torch.cuda.reset_peak_memory_stats(self.device)
            if self.enabled:
                try:
                    sampler = NvmlSampler(self.device, self.nvml_interval_s)
                except Exception as exc:  # no NVML library, no permission: say so, don't fail the cell
                    self.notes.append(f"NVML unavailable: {type(exc).__name__}: {exc}")
        start = time.perf_counter()
        with sampler if sampler else contextlib.nullcontext():
            try:
                yield
            finally:
                self._sync()
                self.figures[f"{name}_seconds"] = time.perf_counter() - start
        prefix = "" if name == "train" else f"{name}_"
        if self.cuda:
            self.figures["peak_gpu_allocated_bytes" if name == "train" else f"{name}_peak_gpu_allocated_bytes"] = (
                torch.cuda.max_memory_allocated(self.device)
            )
            self.figures[f"{prefix}peak_gpu_reserved_bytes"] = torch.cuda.max_memory_reserved(self.device)
        if sampler:
            self.figures[f"{prefix}nvml_peak_bytes"] = sampler.peak
            self.figures[f"{prefix}nvml_source"] = sampler.source
            self.figures[f"{prefix}nvml_samples"] = sampler.samples

    @contextlib.contextmanager
    def step(self, batch: dict):
        """Times one optimizer step; `batch` is the whole step's batch."""
        self._sync()
        start = time.perf_counter()
        yield
        self._sync()
        labels = batch["labels"]
        target = causal_lm.target_tokens(labels) if labels.dim() == 2 else 0
        self.steps.append((time.perf_counter() - start, len(labels), self._tokens(batch), target))
        self.shapes.append(batch_shape(batch))
        if self.cuda:
            self.reserved.append(torch.cuda.memory_reserved(self.device))

    def _tokens(self, batch: dict) -> int:
        """Non-padding tokens, or for images the patches the model cuts them into ([CLS] not counted)."""
        pixels = batch.get("pixel_values")
        if pixels is not None:
            patch = getattr(getattr(self.model, "config", None), "patch_size", None)
            if not patch:
                return len(pixels)
            high, wide = (patch, patch) if isinstance(patch, int) else patch
            return len(pixels) * (pixels.shape[-2] // high) * (pixels.shape[-1] // wide)
        mask = batch.get("attention_mask")
        return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())

    def saved_tensors(self, batch: dict):
        """Wrap one forward+backward of `batch`: its saved tensors are counted (see count_activations)."""
        if not self.enabled:
            return contextlib.nullcontext()
        shape = batch_shape(batch)
        if shape in self._counted_shapes and not self.count_every_step:
            return contextlib.nullcontext()
        self._counted_shapes.add(shape)
        return self.saved

    def count_flops(self):
        """Wrap the first training step: its FLOPs are recorded (train_step_flops); later steps run uncounted."""
        if not self.enabled or "train_step_flops" in self.figures:
            return contextlib.nullcontext()
        return self._flops()

    @contextlib.contextmanager
    def _flops(self):
        counter = TotalFlops()
        with counter:
            yield
        self.figures["train_step_flops"] = counter.get_total_flops()

    def read_graph(self, loss: torch.Tensor):
        """Call with the first step's loss, before backward: names the attention kernel that ran."""
        if "attention_backend" not in self.figures:
            self.figures["attention_backend"] = attention_backend(loss, self.figures["attention_implementation"])

    def record_states(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        """Call once after the first optimizer step, before gradients are cleared."""
        self.figures["grad_bytes"] = unique_bytes(p.grad for p in model.parameters() if p.grad is not None)
        state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        self.figures["optimizer_bytes"] = unique_bytes(state)
        self.figures["optimizer_step"] = optimizer_step(optimizer)

    def _flops_per_s(self, step_flops: int | None, step_seconds: float) -> dict:
        if not step_flops:
            return {}
        if len(set(self.shapes)) > 1:  # the FLOPs of the first step say nothing exact about steps of other shapes
            self.notes.append(
                "achieved FLOP/s left empty: the steps' shapes differ, and FLOPs are counted on the first"
            )
            return {}
        achieved = step_flops / step_seconds
        peak = environment.peak_flops(self.device, self.precision)
        return {"achieved_flops_per_s": achieved} | ({"mfu": achieved / peak} if peak else {})

    def summary(self) -> dict:
        f = dict(self.figures)
        if self.enabled:
            f["activation_bytes"] = self.saved.peak
            f["modelled_peak_bytes"] = (
                f["frozen_param_bytes"]
                + f["trainable_param_bytes"]
                + f["buffer_bytes"]
                + f.get("grad_bytes", 0)
                + f.get("optimizer_bytes", 0)
                + self.saved.peak
            )
        f["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
        timed = self.steps[self.timing_warmup_steps :] or self.steps  # too few steps: time them all, and say so
        if self.steps and not self.steps[self.timing_warmup_steps :]:
            self.notes.append(f"only {len(self.steps)} steps: throughput includes warm-up steps")
        if timed:
            seconds = np.array([s for s, *_ in timed])
            f.update(
                timed_steps=len(timed),
                train_samples_per_s=sum(n for _, n, _, _ in timed) / seconds.sum(),
                train_tokens_per_s=sum(t for _, _, t, _ in timed) / seconds.sum(),
                step_time_median_s=float(np.median(seconds)),
                step_time_p90_s=float(np.percentile(seconds, 90)),
            )
            if any(target for *_, target in timed):
                f["train_target_tokens_per_s"] = sum(target for *_, target in timed) / seconds.sum()
            f.update(self._flops_per_s(f.get("train_step_flops"), seconds.mean()))
        if self.reserved:  # as peft's method_comparison reports memory: over every training step, warm-up included
            reserved = np.array(self.reserved)
            f.update(
                reserved_max_bytes=int(reserved.max()),
                reserved_mean_bytes=float(reserved.mean()),
                reserved_p99_bytes=float(np.percentile(reserved, 99)),
            )
        if self.notes:
            f["meter_notes"] = list(dict.fromkeys(self.notes))
        return f
