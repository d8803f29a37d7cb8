"""Where cells' processes run: this machine, up to `jobs` cells at once.

The runner decides which cells run and hands them over as Jobs; an executor starts each in a fresh process
(harness.worker.run_job), calls back as each starts and ends, and records every outcome the worker does not
live to write (killed, timed out, interrupted), so every job it was given ends with a record at its path.
Cells running side by side each get their own GPU (CUDA_VISIBLE_DEVICES), never a share of one: two cells on
one GPU would each see the other's memory in their peaks. On a CPU they share the cores out evenly.
"""

import collections
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from harness import results, worker
from harness.config import Cell
from harness.errors import UserError


@dataclass(frozen=True)
class Job:
    cell: Cell
    path: Path  # where its record goes
    known: dict  # its provenance (worker.provenance), computed when the runner decided to run it

    @property
    def log_path(self) -> Path:
        """The cell's own output (warnings, tracebacks), beside its record."""
        return self.path.with_suffix(".log")


def slots(device: str, jobs: int) -> list[dict]:
    """What each of `jobs` cells running at once may use (worker.use_slot): a GPU each on CUDA, an equal share of
    the CPU cores otherwise. A single job uses the machine as the process finds it."""
    if jobs == 1:
        return [{}]
    if worker.pick_device(device).type == "cuda":
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = [d for d in visible.split(",") if d] if visible is not None else []
        ids = ids or [str(i) for i in range(torch.cuda.device_count())]
        if jobs > len(ids):
            raise UserError(
                "--jobs",
                f"{jobs} cells at once need {jobs} GPUs, one each, and this machine has {len(ids)}",
                f"use --jobs {len(ids)} or fewer",
            )
        return [{"visible_devices": ids[i]} for i in range(jobs)]
    cores = len(os.sched_getaffinity(0))
    if jobs > cores:
        raise UserError(
            "--jobs", f"{jobs} cells at once on {cores} CPU cores would leave a cell no core", f"use --jobs {cores}"
        )
    return [{"threads": cores // jobs}] * jobs


def _worker_context():
    """Fresh processes forked from a server that imported the heavy libraries once."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(worker.PRELOAD)
    return ctx


def write_outcome(job: Job, status: str, message: str, started: float) -> dict:
    record = results.new_record(job.cell.to_dict(), **job.known, started=started)
    record.update(status=status, error={"type": status, "message": message})
    results.write_atomic(job.path, results.finish(record, started))
    return record


def exit_message(exitcode: int) -> str:
    """Why a worker that wrote no record ended, in words."""
    if exitcode >= 0:
        return f"worker exited with status {exitcode}"
    killed = signal.Signals(-exitcode).name
    # SIGKILL is also how the host's OOM killer ends a process, but a user's kill -9 looks the same: the cell
    # is recorded as failed (retried on rerun) and the message says both.
    return f"worker killed by {killed}" + (
        " (the host's out-of-memory killer sends this)" if killed == "SIGKILL" else ""
    )


@dataclass
class _Running:
    job: Job
    process: multiprocessing.process.BaseProcess
    slot: int
    started: float

    def overdue(self, now: float) -> bool:
        limit = self.job.cell.train.time_limit_s
        return limit is not None and now - self.started > limit


class Local:
    """Cells in fresh processes on this machine, as many at once as there are slots."""

    def __init__(self, device: str = "auto", jobs: int = 1):
        self.device, self.slots = device, slots(device, jobs)

    @property
    def capacity(self) -> int:
        return len(self.slots)

    def run(self, jobs: list[Job], data_dir: Path | None, planning: dict | None, on_start, on_end) -> None:
        """Run (with `planning`, plan) every job; on_start(job) as its process starts, on_end(job, record) once
        its record is written."""
        pending, free, running = collections.deque(jobs), list(range(len(self.slots))), {}
        try:
            while pending or running:
                while pending and free:
                    job = pending.popleft()
                    started = self._start(job, free.pop(0), data_dir, planning)
                    running[started.process.sentinel] = started
                    on_start(job)
                ended = multiprocessing.connection.wait(list(running), timeout=self._wait(running.values()))
                now = time.time()
                for sentinel, cell in list(running.items()):
                    if sentinel in ended or cell.overdue(now):
                        del running[sentinel]
                        free.append(cell.slot)
                        on_end(cell.job, self._outcome(cell))
        except KeyboardInterrupt:
            for cell in running.values():
                _stop(cell.process)
                write_outcome(cell.job, "interrupted", "stopped by the user (Ctrl-C or SIGTERM)", cell.started)
            raise

    def _start(self, job: Job, slot: int, data_dir: Path | None, planning: dict | None) -> _Running:
        spec = {
            "cell": job.cell.to_dict(),
            "provenance": job.known,
            "planning": planning,
            "device": self.device,
            "slot": self.slots[slot],
            "log": str(job.log_path),
            # a step bar only where one cell runs at a time, on a terminal: several would overwrite each other
            "progress": len(self.slots) == 1 and sys.stderr.isatty(),
            "data_dir": str(data_dir) if data_dir else None,
        }
        process = _worker_context().Process(target=worker.run_job, args=(spec, str(job.path)), name=job.cell.key)
        process.start()
        return _Running(job, process, slot, time.time())

    @staticmethod
    def _wait(running) -> float | None:
        """Seconds until the first running cell passes its time limit (None: no limit)."""
        limits = [
            r.started + r.job.cell.train.time_limit_s - time.time() for r in running if r.job.cell.train.time_limit_s
        ]
        return max(0.0, min(limits)) if limits else None

    @staticmethod
    def _outcome(cell: _Running) -> dict:
        if cell.process.exitcode is None:  # still running: past its time limit
            cell.process.kill()
            cell.process.join()
            return write_outcome(
                cell.job, "timeout", f"exceeded time_limit_s={cell.job.cell.train.time_limit_s}", cell.started
            )
        cell.process.join()
        if cell.process.exitcode != 0:
            return write_outcome(cell.job, "failed", exit_message(cell.process.exitcode), cell.started)
        return results.read_record(cell.job.path)


def _stop(process) -> None:
    """Ask a cell's process to stop as Ctrl-C does (SIGTERM reaches the runner alone), then make it."""
    if process.exitcode is None:
        os.kill(process.pid, signal.SIGINT)
        process.join(timeout=10)
        if process.exitcode is None:
            process.kill()
            process.join()
