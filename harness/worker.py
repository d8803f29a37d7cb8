"""Run one cell in this process and write its result record.

The runner starts `run_job` in a fresh process per cell, forked from a server
that has imported torch and transformers once (`PRELOAD`): memory figures start
clean, CUDA is first touched in the cell's own process, and a crash takes down
one cell, not the suite. Every outcome the process lives to see (ok, failed, oom,
diverged) is written as a record with the figures known up to then.
"""

import dataclasses
import gc
import os
import random
import resource
import signal
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch
import tqdm

from harness import backbone, code_version, data, environment, results
from harness.config import Cell
from harness.meter import Meter
from harness.method import Run, Stack, count, resolve
from harness.metrics import METRICS
from harness.train import Diverged, predict, total_steps, train


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def stack_of(cell: Cell) -> Stack:
    """The cell's method: a Stack of its entry's components, however many."""
    return Stack([resolve(c.ref, f"cell {cell.entry.label}")(**c.hparams) for c in cell.entry.components])


def unsupported(cell: Cell, anatomy) -> str | None:
    """Why the cell's methods cannot run on its backbone, from the backbone's anatomy (Method.unsupported)."""
    return stack_of(cell).unsupported(anatomy)


def build(cell: Cell, total_steps: int | None = None, device: torch.device | None = None, read_weights: bool = True):
    """Backbone with head and the entry's method applied (a Stack of its components, however many);
    (model, declared trainable count, optimizer groups, whether the saved bytes can follow the values
    and not only the shapes). `total_steps`, the run's length, is passed to the method before it applies.
    Without `read_weights` the backbone is built from its config (harness.plan builds it of fake tensors)."""
    model = backbone.load_model(cell.backbone, cell.task, read_weights)
    if cell.backbone.dtype in backbone.QUANTISED:  # before the method: it wraps the quantised layers
        backbone.quantise_blocks(model, cell.backbone.dtype, device or torch.device("cpu"))
    if cell.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    method = stack_of(cell)
    if total_steps is not None:
        method.set_run(Run(total_steps=total_steps))
    try:
        model, declared = method.attach(model, cell.task)
    except RuntimeError as exc:  # unfreezing bitsandbytes' integer weights: say what it means
        if cell.backbone.dtype in backbone.QUANTISED and "floating point dtype can require gradients" in str(exc):
            raise ValueError(backbone.trains_quantised(cell.backbone.dtype)) from exc
        raise
    backbone.store_frozen(model, cell.backbone.dtype)
    return model, declared, method.param_groups(model, cell.entry.lr), method.activations_depend_on_values


def provenance(cell: Cell) -> dict:
    """What a cell's record says produced it: its settings' hash, the source files its result depends on
    (harness.code_version), and what each method of its stack is, so that readers need not import methods."""
    classes = [resolve(c.ref, f"cell {cell.entry.label}") for c in cell.entry.components]
    return {
        "config_hash": cell.config_hash(),
        "code": code_version.cell_code(classes),
        "method_info": [
            {"ref": c.ref, "name": cls.name, "family": cls.family, "description": cls.description}
            for c, cls in zip(cell.entry.components, classes)
        ],
    }


def loaders(cell: Cell, data_dir: Path | None, preprocessor):
    """(train frame, train loader, dev loader, eval loader): the cell's data as it trains on it, shuffled by its
    seed, and the held-out dev and eval data it is scored on."""
    task, settings = cell.task, cell.train
    train_frame, dev_frame = data.train_and_dev(task, data_dir)
    train_frame = data.subset(train_frame, settings.max_train_samples)
    dev_frame = data.subset(dev_frame, settings.max_eval_samples)  # the cap on each held-out set scored
    eval_frame = data.subset(data.load_split(task, task.eval_split, data_dir), settings.max_eval_samples)
    train_examples = data.examples(
        task, train_frame, preprocessor, settings.max_seq_length, data.TargetScale.of(task, train_frame)
    )
    order = torch.Generator().manual_seed(cell.seed)
    drop_last = len(train_frame) > settings.batch_size
    if settings.group_by_length:
        grouped = data.LengthGroupedBatches(train_examples.lengths(), settings.batch_size, order, drop_last)
        batching = {"batch_sampler": grouped}
    else:
        batching = {"batch_size": settings.batch_size, "shuffle": True, "generator": order, "drop_last": drop_last}
    train_loader = torch.utils.data.DataLoader(
        train_examples,
        collate_fn=data.make_collate(task, preprocessor, settings.padding, settings.max_seq_length),
        **batching,
    )
    dev_loader, eval_loader = (
        torch.utils.data.DataLoader(
            data.examples(task, frame, preprocessor, settings.max_seq_length),
            batch_size=settings.eval_batch_size,
            collate_fn=data.make_collate(
                task, preprocessor, settings.padding, settings.max_seq_length, evaluation=True
            ),
        )
        for frame in (dev_frame, eval_frame)
    )
    return train_frame, train_loader, dev_loader, eval_loader


def run_cell(
    cell: Cell, data_dir: Path | None, device_name: str = "auto", progress=True, known: dict | None = None
) -> dict:
    """Train and evaluate one cell here; its record, whatever the outcome. `known` is the cell's
    `provenance`, as the runner computed it when it decided to run the cell. `progress`: step bars on stderr
    (True), on a stream given, or none (False)."""
    started = time.time()
    device = pick_device(device_name)
    record = results.new_record(cell.to_dict(), **(known or provenance(cell)), started=started)
    record["env"] = environment.describe(device)
    task, settings = cell.task, cell.train
    meter = None
    try:
        seed_everything(cell.seed)
        preprocessor = backbone.load_preprocessor(cell.backbone, task)
        train_frame, train_loader, dev_loader, eval_loader = loaders(cell, data_dir, preprocessor)
        model, declared, groups, value_dependent = build(cell, total_steps(settings, len(train_loader)), device)
        model.to(device)
        record["params"] = {
            "trainable": count(p for p in model.parameters() if p.requires_grad),
            "total": count(model.parameters()),
            "declared_trainable": declared,
        }
        record["measurements"]["setup_seconds"] = time.time() - started

        # per_shape counting is exact only where the shapes decide what is saved
        counting = "every_step" if value_dependent else settings.count_activations
        meter = Meter(
            model,
            device,
            settings.timing_warmup_steps,
            settings.nvml_interval_s,
            count_activations=counting,
            precision=settings.precision,
        )
        with meter.phase("train"):
            losses = train(model, groups, train_loader, settings, device, meter, progress)
        record["train"] = {
            "steps": len(losses),
            "first_loss": losses[0],
            "final_loss": losses[-1],
            "losses": losses,
            "train_examples": len(train_frame),
            "dev_examples": len(dev_loader.dataset),
        }
        scale = data.TargetScale.of(task, train_frame)  # what the training targets were standardised by
        if scale is not None:
            record["train"]["target_scale"] = dataclasses.asdict(scale)
        if settings.evaluate:  # dev scores select among a sweep's points (harness.selection); eval scores report
            with meter.phase("dev"):
                outputs, _ = predict(model, dev_loader, task, device, settings.precision, progress, preprocessor, scale)
            record["dev_metrics"] = scores(task, outputs)
            with meter.phase("eval"):
                outputs, n = predict(
                    model, eval_loader, task, device, settings.precision, progress, preprocessor, scale
                )
            record["metrics"] = scores(task, outputs)
            record["predictions"] = results.compact_outputs(outputs)
        record["status"] = "ok"
    except Diverged as exc:
        record.update(status="diverged", error=error_record(exc))
    except Exception as exc:
        record.update(status="oom" if is_out_of_memory(exc) else "failed", error=error_record(exc))
    finally:
        if meter is not None:
            record["measurements"].update(meter.summary())
            if "eval_seconds" in record["measurements"] and record["status"] == "ok":
                record["measurements"]["eval_samples_per_s"] = n / record["measurements"]["eval_seconds"]
        results.finish(record, started)
    return record


def scores(task, outputs: dict) -> dict:
    """Each of the task's metrics on what `predict` returned."""
    return {
        name: {
            "value": METRICS[name](*outputs[METRICS[name].reads]),
            "higher_is_better": METRICS[name].higher_is_better,
        }
        for name in task.metrics
    }


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's out-of-memory error, Python's MemoryError, or a failed host allocation, which torch raises
    as a plain RuntimeError from its CPU allocator."""
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in str(exc) or "not enough memory" in str(exc))


def limit_host_memory(gigabytes: float | None) -> None:
    """Cap this process's data segment (heap and private anonymous mappings, where CPU tensors live), so
    that a cell needing more fails its allocation, and is recorded as oom, instead of drawing the host's
    out-of-memory killer onto it or onto its neighbours. Shared libraries' code is not counted."""
    if gigabytes is not None:
        _, hard = resource.getrlimit(resource.RLIMIT_DATA)
        soft = int(gigabytes * 2**30) if hard == resource.RLIM_INFINITY else min(int(gigabytes * 2**30), hard)
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


def error_record(exc: BaseException) -> dict:
    tail = traceback.format_exception(exc)[-12:]
    return {
        "type": type(exc).__name__,
        "message": str(exc).strip().splitlines()[0][:500] if str(exc).strip() else type(exc).__name__,
        "traceback_tail": "".join(tail)[-4000:],
    }


# Imported once by the fork server, so that each cell's process starts warm.
PRELOAD = [
    "harness.worker",
    "harness.plan",
    "harness.method",
    "transformers.models.auto.modeling_auto",
    "transformers.models.auto.tokenization_auto",
    "transformers.models.bert.modeling_bert",
    "peft",
]


def use_slot(slot: dict) -> None:
    """Keep this process to its share of the machine (harness.executors.slots): one GPU, seen as cuda:0 (set
    before anything touches CUDA), or a number of CPU threads."""
    if "visible_devices" in slot:
        os.environ["CUDA_VISIBLE_DEVICES"] = slot["visible_devices"]
    if "threads" in slot:
        torch.set_num_threads(slot["threads"])


def send_output_to(log_path: str, progress: bool):
    """This process's stdout and stderr, its libraries' too, go to the cell's log; the step bar, wanted only on
    a terminal, is given that terminal (returned) instead, or False."""
    terminal = os.fdopen(os.dup(2), "w", buffering=1) if progress else False
    sys.stdout.flush()
    sys.stderr.flush()
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    return terminal


def run_job(job: dict, record_path: str) -> None:
    """Entry point of a cell's process: run the cell, write its record atomically."""
    use_slot(job.get("slot") or {})
    progress = send_output_to(job["log"], job["progress"]) if job.get("log") else job["progress"]
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation chatter, not the user's concern
    # tqdm guards its bars with a multiprocessing lock, a named semaphore, by default; a cell's process
    # runs one bar at a time, and one stopped by Ctrl-C or SIGTERM could leave the semaphore behind for the
    # resource tracker to warn about.
    tqdm.tqdm.set_lock(threading.RLock())
    limit_host_memory(job["cell"]["train"].get("host_memory_limit_gb"))
    cell, data_dir = Cell.from_dict(job["cell"]), Path(job["data_dir"]) if job["data_dir"] else None
    try:
        if job.get("planning") is not None:
            from harness import plan

            # No cyclic garbage collection in a plan's process, and no interpreter teardown after its record:
            # freeing fake tensors at those points has crashed processes (SIGSEGV, SIGABRT), now and then.
            gc.disable()
            record = plan.plan_cell(cell, data_dir, job["provenance"], tuple(job["planning"]["budgets"]))
            results.write_atomic(Path(record_path), record)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        else:
            record = run_cell(cell, data_dir, job["device"], progress, job["provenance"])
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group; the runner records the cell
        # The runner forwards the interrupt too (SIGTERM reaches it alone); a second SIGINT arriving while
        # this process exits would raise inside multiprocessing's exit handlers and print their traceback.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise SystemExit(130) from None
    results.write_atomic(Path(record_path), record)
