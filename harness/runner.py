"""Run a suite: check everything first, then each cell in a fresh worker process.

The runner knows cells, not methods. A cell whose record is already final with
the same resolved config is skipped; `fresh` reruns everything. Only one run at
a time may use a results directory (a lock file, kept outside it, says who holds it).
"""

import fcntl
import hashlib
import multiprocessing
import os
import signal
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from harness import anatomy, backbone, code_version, data, results, worker
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


def _worker_context():
    """Fresh processes forked from a server that imported the heavy libraries once."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(worker.PRELOAD)
    return ctx


def run_cell_process(
    cell: Cell, path: Path, data_dir: Path | None, device: str, known: dict, planning: dict | None = None
) -> dict:
    """One worker process; records the outcomes the worker cannot (killed, timed out, interrupted).
    `known` is the cell's provenance (worker.provenance), computed once, when the runner decided to run it.
    With `planning` ({"budgets": [bytes, ...]}) the process plans the cell (harness.plan) instead of running it."""
    job = {
        "cell": cell.to_dict(),
        "provenance": known,
        "planning": planning,
        "device": device,
        "progress": sys.stderr.isatty(),
        "data_dir": str(data_dir) if data_dir else None,
    }
    started = time.time()
    proc = _worker_context().Process(target=worker.run_job, args=(job, str(path)), name=f"cell {cell.key}")
    proc.start()
    status, message = None, None
    try:
        proc.join(timeout=cell.train.time_limit_s)
        if proc.exitcode is None:
            proc.kill()
            proc.join()
            status, message = "timeout", f"exceeded time_limit_s={cell.train.time_limit_s}"
    except KeyboardInterrupt:
        if proc.exitcode is None:
            os.kill(proc.pid, signal.SIGINT)
            proc.join(timeout=10)
            if proc.exitcode is None:
                proc.kill()
                proc.join()
        _write_outcome(cell, path, known, "interrupted", "stopped by the user (Ctrl-C or SIGTERM)", started)
        raise
    if status is None and proc.exitcode != 0:
        killed = signal.Signals(-proc.exitcode).name if proc.exitcode < 0 else None
        # SIGKILL is also how the host's OOM killer ends a process, but a user's kill -9 looks
        # the same: record it as failed (retried on rerun) and say both.
        status = "failed"
        message = (
            f"worker killed by {killed}"
            + (" (the host's out-of-memory killer sends this)" if killed == "SIGKILL" else "")
            if killed
            else f"worker exited with status {proc.exitcode}"
        )
    if status is not None:
        return _write_outcome(cell, path, known, status, message, started)
    return results.read_record(path)


def _write_outcome(cell: Cell, path: Path, known: dict, status: str, message: str, started: float) -> dict:
    record = results.new_record(cell.to_dict(), **known, started=started)
    record.update(status=status, error={"type": status, "message": message})
    results.write_atomic(path, results.finish(record, started))
    return record


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
) -> list[dict]:
    """Every cell of the suite, run (or, with `planning`, planned: see run_cell_process) in its own process;
    `overrides` replace train settings of every cell (a plan at a length the user gives)."""
    preflight(suite, data_dir, None if planning is not None else device)
    cells = suite.cells(max_train_samples, overrides)
    unsupported = unsupported_cells(suite, cells)
    previous = signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    records = []
    try:
        with locked(out_dir):
            for i, cell in enumerate(cells, 1):
                path = out_dir / f"{cell.key}.json"
                head = f"[{i}/{len(cells)}] {cell.task.name} / {cell.entry.label} / seed {cell.seed}"
                known = worker.provenance(cell)
                done, note = is_done(path, cell, known["code"])
                if note:
                    log(f"{head}: {note}")
                if done and not fresh:
                    record = results.read_record(path)
                    log(f"{head}: already done ({record['status']}), skipped")
                elif cell.key in unsupported:  # known before training: no worker is started
                    record = _write_outcome(cell, path, known, "unsupported", unsupported[cell.key], time.time())
                    log(f"{head}: {summarize(record)}")
                else:
                    log(f"{head} ...")
                    record = run_cell_process(cell, path, data_dir, device, known, planning)
                    log(f"{head}: {summarize(record)}")
                records.append(record)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return records
