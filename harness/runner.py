"""Run a suite: check everything first, then hand the cells that need running to an executor
(harness.executors), which runs each in a fresh worker process.

The runner knows cells, not methods. A cell whose record is already final with
the same resolved config is skipped; `fresh` reruns everything. Only one run at
a time may use a results directory (a lock file, kept outside it, says who holds it).
"""

import fcntl
import hashlib
import os
import signal
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from harness import anatomy, backbone, code_version, data, executors, results, worker
from harness.config import Cell, Suite
from harness.errors import UserError
from harness.formatting import format_bytes

# Outcomes of the configuration itself; others (failed, timeout, interrupted) come
# from circumstances, and a rerun tries them again. An unsupported cell is rerun when
# its code changes (is_done), since that is how a method learns a new architecture.
FINAL_STATUSES = ("ok", "oom", "diverged", "unsupported")


def preflight(suite: Suite, data_dir: Path | None, device: str | None = "auto") -> None:
    """Everything a user could have got wrong, checked before any training, for cells on `device` (None: a
    plan, which runs on no device)."""
    for task in suite.tasks:
        data.train_and_dev(task, data_dir)
        data.load_split(task, task.eval_split, data_dir)
    for task in {task.modality: task for task in suite.tasks}.values():  # the preprocessor each kind of input needs
        try:
            backbone.load_preprocessor(suite.backbone, task)
        except Exception as exc:
            what = "image processor" if task.modality == "image" else "tokenizer"
            raise UserError(
                f"{suite.path}.backbone",
                f"cannot load the {what} of '{backbone.describe(suite.backbone)}': {type(exc).__name__}: "
                f"{str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}",
                "give a local model folder, or a hub id with network access",
            ) from None
    if device is not None and suite.backbone.dtype in backbone.QUANTISED and worker.pick_device(device).type != "cuda":
        raise UserError(
            f"{suite.path}.backbone.dtype",
            f"{suite.backbone.dtype} weights run on CUDA only: bitsandbytes' CPU kernels are a reference fallback, "
            "whose speed and memory describe no setup users train with",
            "run it on a CUDA machine, or use dtype: bf16",
        )
    language_model = next((task for task in suite.tasks if task.is_causal_lm), None)
    if language_model is not None:
        problem = not_a_causal_lm(suite.backbone, language_model)
        if problem is not None:
            raise UserError(
                f"{suite.path}.tasks",
                f"task {language_model.name} is causal_lm, but {backbone.describe(suite.backbone)} {problem}",
                "use a decoder (GPT-2, Llama, Qwen, Mistral, ...) for causal_lm tasks",
            )


def not_a_causal_lm(spec, task) -> str | None:
    """Why the backbone cannot be trained as a causal language model (in words after its name), or None."""
    try:
        model = backbone.skeleton(spec, task)
    except ValueError as exc:  # transformers has no causal-LM class for this config
        return f"has no causal-LM model ({str(exc).splitlines()[0][:200]})"
    try:
        causal = anatomy.describe(model).causal
    except ValueError:
        return None  # a layout harness.anatomy cannot read: trust transformers' causal-LM class
    return None if causal else "is a bidirectional encoder, whose attention sees the target it should predict"


def unsupported_cells(suite: Suite, cells: list[Cell]) -> dict[str, str]:
    """cell key -> why its methods cannot run on the suite's backbone, decided from the backbone's anatomy
    (its config built on the meta device: no weights read) before any training. A backbone whose layout
    harness.anatomy cannot describe refuses nothing here: methods that need the layout say so in their cell."""
    anatomies, reasons = {}, {}
    for cell in cells:
        kind = (cell.task.modality, cell.task.type, cell.task.num_labels)  # what decides the head
        if kind not in anatomies:
            model = backbone.skeleton(suite.backbone, cell.task)
            try:
                anatomies[kind] = anatomy.describe(model)
            except ValueError:
                anatomies[kind] = None
        if anatomies[kind] is not None:
            reason = worker.unsupported(cell, anatomies[kind])
            if reason is not None:
                reasons[cell.key] = reason
    return reasons


def lock_path(out_dir: Path) -> Path:
    """Where the lock of a results directory lives: outside it, keyed by its absolute path, so that
    deleting or replacing the directory during a run does not let a second run in."""
    key = hashlib.sha256(str(out_dir.resolve()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"petl-harness-{os.getuid()}" / f"{key}.lock"


@contextmanager
def locked(out_dir: Path):
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(str(out_dir), "results directory is a file", "pass another --out, or move the file away")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(
            str(out_dir),
            f"cannot create the results directory: {exc.strerror or exc}",
            "pass an --out in a folder you can write",
        ) from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise UserError(str(out_dir), "results directory is not writable", "pass an --out in a folder you can write")
    path = lock_path(out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise UserError(
            str(out_dir),
            f"results directory is in use by {holder}",
            "wait for that run to finish, or pass another --out",
        ) from None
    handle.truncate(0)
    handle.write(f"pid {os.getpid()} writing {out_dir.resolve()}\n")
    handle.flush()
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def is_done(path: Path, cell: Cell, code: dict) -> tuple[bool, str | None]:
    """(skip?, note): a corrupt record, or one that other code produced, is reported and rerun."""
    if not path.exists():
        return False, None
    try:
        record = results.read_record(path)
    except ValueError as exc:
        return False, f"corrupt record, rerunning: {exc}"
    if record.get("config_hash") != cell.config_hash() or record["status"] not in FINAL_STATUSES:
        return False, None
    changed = code_version.changed_files(record.get("code"), code)
    if changed:
        shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
        why = "its record names no code" if record.get("code") is None else f"code changed since its record ({shown})"
        return False, f"{why}, rerunning"
    return True, None


def _terminate_as_interrupt(signum, frame):
    raise KeyboardInterrupt


def log_line(text: str) -> None:
    print(text, flush=True)  # progress must show up at once, also when stdout is a file


def summarize(record: dict) -> str:
    status = record["status"]
    if status != "ok":
        return f"{status}: {(record.get('error') or {}).get('message', '')}"
    m = record["measurements"]
    if record.get("plan"):
        fits = [
            f"batch <= {b['largest_batch']}{'+' if b['at_least'] else ''} in {format_bytes(b['budget_bytes'])}"
            for b in record["plan"].get("budgets") or []
        ]
        return "  ".join(
            [
                f"planned peak {format_bytes(m['modelled_peak_bytes'])}",
                f"activations {format_bytes(m['activation_bytes'])}",
            ]
            + ([f"{m['train_step_flops'] / 1e12:.3g} TFLOP/step"] if m.get("train_step_flops") else [])
            + fits
        )
    primary = record["cell"]["task"]["primary_metric"]
    score = record["metrics"].get(primary)
    act = m.get("activation_bytes")
    return (f"ok  {primary}={score['value']:.4f}" if score else "ok  (not evaluated)") + (
        f"  train {m.get('train_seconds', 0):.1f}s" + (f"  activations {format_bytes(act)}" if act is not None else "")
    )


class Progress:
    """One line per cell started or ended, the grid's state on the ending ones: cells done, running and left,
    time elapsed, and the time left estimated from the cells this run has finished so far."""

    def __init__(self, cells: list[Cell], capacity: int, log):
        self.number = {cell.key: i for i, cell in enumerate(cells, 1)}
        self.total, self.capacity, self.log = len(cells), capacity, log
        self.done, self.running, self.durations, self.began = 0, {}, [], time.time()

    def head(self, cell: Cell) -> str:
        return f"[{self.number[cell.key]}/{self.total}] {cell.task.name} / {cell.entry.label} / seed {cell.seed}"

    def settled(self, cell: Cell, text: str) -> None:
        """A cell that needs no process: already done, or refused before training."""
        self.done += 1
        self.log(f"{self.head(cell)}: {text}")

    def start(self, cell: Cell) -> None:
        self.running[cell.key] = time.time()
        self.log(f"{self.head(cell)} ...")

    def end(self, cell: Cell, record: dict) -> None:
        self.durations.append(time.time() - self.running.pop(cell.key))
        self.done += 1
        self.log(f"{self.head(cell)}: {summarize(record)}  [{self.state()}]")

    def state(self) -> str:
        left = self.total - self.done - len(self.running)
        parts = [f"{self.done}/{self.total} done", f"{len(self.running)} running", f"{left} left"]
        parts.append(f"{format_duration(time.time() - self.began)} elapsed")
        if left + len(self.running):
            mean = sum(self.durations) / len(self.durations)
            parts.append(f"~{format_duration(mean * (left + len(self.running)) / self.capacity)} to go")
        return ", ".join(parts)


def format_duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def run_suite(
    suite: Suite,
    out_dir: Path,
    data_dir: Path | None,
    device: str = "auto",
    fresh: bool = False,
    max_train_samples: int | None = None,
    log=log_line,
    planning: dict | None = None,
    overrides: dict | None = None,
    executor=None,
    trackers=(),
) -> list[dict]:
    """Every cell of the suite, each run (or, with `planning` ({"budgets": [bytes, ...]}), planned by
    harness.plan) in its own process by `executor` (default: harness.executors.Local, one at a time); `overrides`
    replace train settings of every cell (a plan at a length the user gives); each record this run writes
    goes to `trackers` too (harness.trackers). The records, in the suite's order of cells."""
    preflight(suite, data_dir, None if planning is not None else device)
    cells = suite.cells(max_train_samples, overrides)
    unsupported = unsupported_cells(suite, cells)
    executor = executor or executors.Local("cpu" if planning is not None else device)
    progress = Progress(cells, executor.capacity, log)
    previous = signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    records, jobs = {}, []
    try:
        with locked(out_dir):
            for cell in cells:
                path = out_dir / f"{cell.key}.json"
                known = worker.provenance(cell)
                done, note = is_done(path, cell, known["code"])
                if note:
                    log(f"{progress.head(cell)}: {note}")
                if done and not fresh:
                    records[cell.key] = results.read_record(path)
                    progress.settled(cell, f"already done ({records[cell.key]['status']}), skipped")
                elif cell.key in unsupported:  # known before training: no worker is started
                    job = executors.Job(cell, path, known)
                    records[cell.key] = executors.write_outcome(job, "unsupported", unsupported[cell.key], time.time())
                    progress.settled(cell, summarize(records[cell.key]))
                else:
                    jobs.append(executors.Job(cell, path, known))

            def ended(job, record):
                records[job.cell.key] = record
                progress.end(job.cell, record)
                for tracker in trackers:
                    try:
                        tracker.log(record)
                    except Exception as exc:  # the record is written; its copy in a tracker is not worth the run
                        log(f"{progress.head(job.cell)}: not sent to {type(tracker).__name__}: {exc!r:.300}")

            executor.run(jobs, data_dir, planning, lambda job: progress.start(job.cell), ended)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return [records[cell.key] for cell in cells]
