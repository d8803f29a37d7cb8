"""Read a task's splits, check them, tokenize them, and batch them.

Local data (a data directory or files a task names) is read with pandas; the
hub is the fallback when no data directory is set. Every problem with the data
a user pointed us at is a UserError, raised before any training.
"""

import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from harness.errors import UserError
from harness.tasks import TaskSpec

DATA_DIR_ENV = "HARNESS_DATA_DIR"
READERS = {".parquet": pd.read_parquet, ".csv": pd.read_csv, ".json": pd.read_json,
           ".jsonl": lambda p: pd.read_json(p, lines=True)}
SUBSET_SEED = 0  # the same train subset for every method and seed, so cells compare like with like


def resolve_data_dir(flag: str | None) -> Path | None:
    """--data-dir wins over HARNESS_DATA_DIR; None means 'use the hub'."""
    value = flag or os.environ.get(DATA_DIR_ENV)
    if not value:
        return None
    path = Path(value).expanduser().resolve()
    if not path.is_dir():
        source = "--data-dir" if flag else DATA_DIR_ENV
        raise UserError(source, f"data directory '{value}' does not exist", "point it at a folder holding glue/<task>/<split>.parquet")
    return path


def _local_file(task: TaskSpec, split: str, data_dir: Path | None) -> Path | None:
    if split in task.data_files:
        path = Path(task.data_files[split])
        if not path.is_file():
            raise UserError(f"task {task.name}.data_files.{split}", f"file '{path}' does not exist", "fix the path (relative to the suite file)")
        return path
    if task.local and data_dir is not None:
        folder = data_dir / task.local
        for ext in READERS:
            if (folder / f"{split}{ext}").is_file():
                return folder / f"{split}{ext}"
        raise UserError(f"task {task.name}", f"no {split} split under '{folder}'",
                        f"put {split}.parquet (or .csv/.json/.jsonl) there, or unset the data directory to use the hub")
    return None


def load_split(task: TaskSpec, split: str, data_dir: Path | None) -> pd.DataFrame:
    path = _local_file(task, split, data_dir)
    if path is not None:
        frame = READERS[path.suffix](path)
    elif task.hub:
        import datasets  # imported late: slow, and only the hub path needs it
        frame = datasets.load_dataset(*task.hub, split=split).to_pandas()
    else:
        raise UserError(f"task {task.name}", f"no data for split '{split}'",
                        f"set {DATA_DIR_ENV} or --data-dir, or give data_files.{split}")
    check_split(task, split, frame)
    return frame


def check_split(task: TaskSpec, split: str, frame: pd.DataFrame) -> None:
    where = f"task {task.name} ({split} split)"
    missing = [c for c in (*task.text_columns, task.label_column) if c not in frame.columns]
    if missing:
        raise UserError(where, f"missing column(s) {missing}; it has {list(frame.columns)}", "fix text_columns / label_column")
    if len(frame) == 0:
        raise UserError(where, "is empty", "point the task at a file with rows")
    labels = frame[task.label_column]
    if labels.isna().any():
        raise UserError(where, f"{int(labels.isna().sum())} rows have no label", "drop them or fill the label column")
    if not task.is_regression:
        bad = sorted({v.item() if hasattr(v, 'item') else v for v in labels.unique()} - set(range(task.num_labels)), key=str)
        if bad:
            raise UserError(where, f"labels {bad[:5]} are outside 0..{task.num_labels - 1}",
                            "labels must be integer class ids; fix num_labels or the data")


def subset(frame: pd.DataFrame, max_samples: int | None) -> pd.DataFrame:
    if max_samples is None or max_samples >= len(frame):
        return frame
    order = np.random.default_rng(SUBSET_SEED).permutation(len(frame))[:max_samples]
    return frame.iloc[np.sort(order)].reset_index(drop=True)


class Encoded(torch.utils.data.Dataset):
    """Token ids per example, unpadded; padding happens per batch in `collate`."""

    def __init__(self, task: TaskSpec, frame: pd.DataFrame, tokenizer, max_length: int):
        texts = [frame[c].astype(str).tolist() for c in task.text_columns]
        self.encodings = tokenizer(*texts, truncation=True, max_length=max_length)
        dtype = np.float32 if task.is_regression else np.int64
        self.labels = frame[task.label_column].to_numpy().astype(dtype)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        item = {k: v[i] for k, v in self.encodings.items()}
        item["labels"] = self.labels[i]
        return item


def make_collate(tokenizer, padding: str, max_length: int):
    """padding='dynamic' pads to the longest example of the batch; 'max_length' to max_length."""
    def collate(items):
        labels = torch.tensor(np.array([it.pop("labels") for it in items]))
        batch = tokenizer.pad(items, padding="longest" if padding == "dynamic" else "max_length",
                              max_length=max_length, return_tensors="pt")
        batch = dict(batch)
        batch["labels"] = labels
        return batch
    return collate
