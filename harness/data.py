"""Read a task's splits, check them, tokenize them, and batch them.

Local data (a data directory or files a task names) is read with pandas; the
hub is the fallback when no data directory is set. Every problem with the data
a user pointed us at is a UserError, raised before any training.
"""

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from harness import causal_lm
from harness.errors import UserError
from harness.tasks import TaskSpec

DATA_DIR_ENV = "HARNESS_DATA_DIR"
READERS = {
    ".parquet": pd.read_parquet,
    ".csv": pd.read_csv,
    ".json": pd.read_json,
    ".jsonl": lambda p: pd.read_json(p, lines=True),
}
SUBSET_SEED = 0  # the same train subset for every method and seed, so cells compare like with like
DEV_SEED = 1  # which training examples are held out as dev data: the same for every cell of a task
DEFAULT_DEV_SIZE, DEFAULT_DEV_FRACTION = 500, 0.1  # a task that says nothing holds out min(500, a tenth)


def resolve_data_dir(flag: str | None) -> Path | None:
    """--data-dir wins over HARNESS_DATA_DIR; None means 'use the hub'.

    Called once, at start-up: a relative value is taken against the working directory the
    command was started in, and the absolute path is what the runner and workers receive."""
    source = "--data-dir" if flag else DATA_DIR_ENV
    value = flag or os.environ.get(DATA_DIR_ENV)
    if not value:
        return None
    path = Path(value).expanduser().absolute()
    if not path.exists():
        raise UserError(
            source,
            f"data directory '{value}' does not exist",
            "point it at a folder holding glue/<task>/<split>.parquet",
        )
    if not path.is_dir():
        raise UserError(
            source,
            f"data directory '{value}' is a file, not a folder",
            "point it at a folder holding glue/<task>/<split>.parquet",
        )
    return path.resolve()


def _local_file(task: TaskSpec, split: str, data_dir: Path | None) -> tuple[Path, str] | None:
    """(file, where to blame) for a split read from disk; None when it comes from the hub."""
    if split in task.data_files:
        where = f"task {task.name}.data_files.{split}"
        path = Path(task.data_files[split])
        if not path.exists():
            raise UserError(where, f"file '{path}' does not exist", "fix the path (relative to the suite file)")
        return path, where
    if task.local and data_dir is not None:
        folder = data_dir / task.local
        for ext in READERS:
            if (folder / f"{split}{ext}").exists():
                return folder / f"{split}{ext}", f"task {task.name} ({split} split)"
        raise UserError(
            f"task {task.name}",
            f"no {split} split under '{folder}'",
            f"put {split}.parquet (or .csv/.json/.jsonl) there, or unset the data directory to use the hub",
        )
    return None


FORMAT_FIXES = {
    ".parquet": "write it again with pandas' DataFrame.to_parquet (or pyarrow)",
    ".csv": "save it as comma-separated UTF-8 text with a header line of column names",
    ".json": 'write one JSON array of records, e.g. [{"text": ..., "label": 0}] (one object per line is .jsonl)',
    ".jsonl": 'write one JSON object per line, e.g. {"text": ..., "label": 0}',
}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def read_frame(path: Path, where: str) -> pd.DataFrame:
    """The one place a user's data file is read. Whatever keeps it from being read as a table
    (no such reader, a folder, no permission, not UTF-8, empty, corrupt, malformed) is a
    UserError naming the file, never a reader's traceback."""
    suffix = path.suffix.lower()
    if suffix not in READERS:
        raise UserError(
            where,
            f"'{path}' has extension '{path.suffix or '(none)'}', not a data format the harness reads",
            f"use a {', '.join(READERS)} file (the extension names the format)",
        )
    if path.is_dir():
        raise UserError(where, f"'{path}' is a folder, not a data file", "point it at a file")
    if not path.is_file():
        raise UserError(where, f"'{path}' is not a regular file", "point it at a data file")
    if not os.access(path, os.R_OK):
        raise UserError(where, f"'{path}' cannot be read: permission denied", "make it readable (e.g. chmod a+r)")
    if path.stat().st_size == 0:
        raise UserError(where, f"'{path}' is empty (0 bytes)", FORMAT_FIXES[suffix])
    try:
        frame = READERS[suffix](path)
    except MemoryError:
        raise
    except PermissionError:
        raise UserError(
            where, f"'{path}' cannot be read: permission denied", "make it readable (e.g. chmod a+r)"
        ) from None
    except UnicodeDecodeError as exc:
        raise UserError(
            where,
            f"'{path}' is not UTF-8 text (byte {exc.object[exc.start : exc.start + 1]!r} at offset {exc.start})",
            "save it as UTF-8",
        ) from None
    except pd.errors.EmptyDataError:
        raise UserError(where, f"'{path}' has no columns", FORMAT_FIXES[suffix]) from None
    except Exception as exc:  # noqa: BLE001 (each reader has its own errors; all mean 'not a readable file of this format')
        kind = suffix.lstrip(".").upper()
        raise UserError(where, f"'{path}' cannot be read as {kind}: {_first_line(exc)}", FORMAT_FIXES[suffix]) from None
    if not isinstance(frame, pd.DataFrame):  # e.g. a JSON file holding one scalar or a list of scalars
        raise UserError(where, f"'{path}' does not hold a table", FORMAT_FIXES[suffix])
    return frame


def load_split(task: TaskSpec, split: str, data_dir: Path | None) -> pd.DataFrame:
    local = _local_file(task, split, data_dir) if not task.sklearn else None
    if task.sklearn:
        frame, source = _load_sklearn(task, split), f"scikit-learn {task.sklearn}"
    elif local is not None and local[0].is_dir() and task.image_column:
        frame, source = read_image_folder(task, *local), str(local[0])
    elif local is not None:
        frame, source = read_frame(*local), str(local[0])
        if task.image_column in frame.columns:  # paths in a data file are relative to its folder
            frame[task.image_column] = [_anchored(v, local[0].parent) for v in frame[task.image_column]]
    elif task.hub:
        frame, source = _load_hub(task, split), f"hub {'/'.join(task.hub)}"
    else:
        raise UserError(
            f"task {task.name}",
            f"no data for split '{split}'",
            f"set {DATA_DIR_ENV} or --data-dir, or give data_files.{split}",
        )
    check_split(task, split, frame, source)
    return frame


# ---------------------------------------------------------------- images


def _anchored(value, folder: Path):
    """An image file path taken against `folder` (the data file's); image bytes are left as they are."""
    if isinstance(value, str) and not Path(value).is_absolute():
        return str(folder / value)
    if isinstance(value, dict) and isinstance(value.get("path"), str) and value.get("bytes") is None:
        return {**value, "path": _anchored(value["path"], folder)}
    return value


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def read_image_folder(task: TaskSpec, folder: Path, where: str) -> pd.DataFrame:
    """The `imagefolder` layout: <split folder>/<class name>/<image file>. Labels are the class folders'
    indices in sorted order, so every split of a task must hold the same class folders."""
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if len(classes) != task.num_labels:
        raise UserError(
            where,
            f"'{folder}' holds {len(classes)} class folders ({', '.join(classes[:5])}), "
            f"not num_labels={task.num_labels}",
            "put one folder per class under the split folder, or fix num_labels",
        )
    rows = [
        {task.image_column: str(path), task.label_column: label}
        for label, name in enumerate(classes)
        for path in sorted((folder / name).iterdir())
        if path.suffix.lower() in IMAGE_SUFFIXES
    ]
    return pd.DataFrame(rows, columns=[task.image_column, task.label_column])


def open_image(value):
    """An image column's value -> an RGB PIL image: a file path, raw bytes, or `datasets`' {"bytes", "path"}."""
    import io

    from PIL import Image

    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    image = Image.open(io.BytesIO(value) if isinstance(value, (bytes, bytearray)) else value)
    return image.convert("RGB")


def _check_images(task: TaskSpec, frame: pd.DataFrame, where: str) -> None:
    """Every file an image column names exists, and the first image decodes: before any training."""
    values = frame[task.image_column]
    missing = [v for v in values if isinstance(v, str) and not Path(v).is_file()]
    if missing:
        raise UserError(where, f"{len(missing)} image files do not exist, e.g. '{missing[0]}'", "fix the paths")
    try:
        open_image(values.iloc[0])
    except Exception as exc:  # noqa: BLE001 (PIL's errors for a bad value are many)
        raise UserError(
            where,
            f"the image column '{task.image_column}' does not hold images ({type(exc).__name__}: {_first_line(exc)})",
            "give image file paths, image bytes, or {bytes, path} records as `datasets` writes them",
        ) from None


def _digits(split: str) -> pd.DataFrame:
    """scikit-learn's load_digits: 1,797 8x8 grayscale images of 17 levels, as PNG bytes; a stratified
    80/20 train/validation split, fixed (seed 0), so every cell reads the same images."""
    import io

    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    train, validation = train_test_split(
        np.arange(len(digits.target)), test_size=0.2, random_state=0, stratify=digits.target
    )
    rows = []
    for i in {"train": train, "validation": validation}[split]:
        buffer = io.BytesIO()
        Image.fromarray((digits.images[i] * (255 / 16)).round().astype(np.uint8), mode="L").save(buffer, "PNG")
        rows.append({"image": {"bytes": buffer.getvalue(), "path": None}, "label": int(digits.target[i])})
    return pd.DataFrame(rows)


SKLEARN = {"load_digits": (_digits, ("train", "validation"))}


def _load_sklearn(task: TaskSpec, split: str) -> pd.DataFrame:
    if task.sklearn not in SKLEARN:
        raise UserError(f"task {task.name}.sklearn", f"unknown loader '{task.sklearn}'", f"use one of {list(SKLEARN)}")
    load, splits = SKLEARN[task.sklearn]
    if split not in splits:
        raise UserError(f"task {task.name}", f"{task.sklearn} has no split '{split}'", f"use one of {list(splits)}")
    return load(split)


def _load_hub(task: TaskSpec, split: str) -> pd.DataFrame:
    import datasets  # imported late: slow, and only the hub path needs it

    try:
        return datasets.load_dataset(*task.hub, split=split).to_pandas()
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 (offline, unknown dataset or split: the hub's errors are many)
        raise UserError(
            f"task {task.name} ({split} split)",
            f"cannot load {'/'.join(task.hub)} from the hub: {type(exc).__name__}: {_first_line(exc)}",
            f"set {DATA_DIR_ENV} or --data-dir to a local copy, or check network access",
        ) from None


def check_split(task: TaskSpec, split: str, frame: pd.DataFrame, source: str | None = None) -> None:
    """The columns and labels a task needs; `source` (the file, or the hub id) is named in every error."""
    where = f"task {task.name} ({split} split{f', {source}' if source else ''})"
    inputs = (task.image_column,) if task.image_column else task.text_columns
    needed = inputs if task.is_causal_lm else (*inputs, task.label_column)  # a causal_lm task's target is text
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        fix = {"image": "fix image_column / label_column", "text": "fix text_columns / label_column"}[task.modality]
        if task.is_causal_lm:
            fix = "the prompt and target templates may name only these columns"
        raise UserError(where, f"missing column(s) {missing}; it has {list(frame.columns)}", fix)
    if len(frame) == 0:
        raise UserError(where, "is empty", "point the task at a file with rows")
    if task.is_causal_lm:
        gap = causal_lm.unverbalized(task, frame)
        if gap is not None:
            column, values = gap
            raise UserError(
                where, f"column '{column}' holds {values[:5]}, which the verbalizer gives no words", "add them"
            )
        return
    if task.image_column:
        _check_images(task, frame, where)
    labels = frame[task.label_column]
    if labels.isna().any():
        raise UserError(where, f"{int(labels.isna().sum())} rows have no label", "drop them or fill the label column")
    if task.is_regression:
        try:
            numbers = pd.to_numeric(labels, errors="coerce").to_numpy(dtype=float)
        except (TypeError, ValueError):  # e.g. JSON lists or objects as labels
            numbers = np.full(len(labels), np.nan)
        bad = ~np.isfinite(numbers)
        if bad.any():
            raise UserError(
                where,
                f"{int(bad.sum())} labels are not finite numbers, e.g. {labels[bad].tolist()[:3]}",
                "a regression label must be a number",
            )
    else:
        try:
            values = {v.item() if hasattr(v, "item") else v for v in labels.unique()}
        except TypeError:  # e.g. JSON lists or objects as labels
            raise UserError(where, "labels are not single values", "labels must be integer class ids") from None
        bad = sorted(values - set(range(task.num_labels)), key=str)
        if bad:
            raise UserError(
                where,
                f"labels {bad[:5]} are outside 0..{task.num_labels - 1}",
                "labels must be integer class ids; fix num_labels or the data",
            )


def subset(frame: pd.DataFrame, max_samples: int | None) -> pd.DataFrame:
    if max_samples is None or max_samples >= len(frame):
        return frame
    order = np.random.default_rng(SUBSET_SEED).permutation(len(frame))[:max_samples]
    return frame.iloc[np.sort(order)].reset_index(drop=True)


def train_and_dev(task: TaskSpec, data_dir: Path | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The task's training examples and its dev examples, disjoint: the split the task names as dev, or
    `dev_size` examples (by default min(500, a tenth of them)) drawn from the training split by a fixed seed and
    taken out of it. Selection among a sweep's points reads dev scores only (harness.selection)."""
    train = load_split(task, task.train_split, data_dir)
    if task.dev_split is not None:
        return train, load_split(task, task.dev_split, data_dir)
    size = task.dev_size
    if size is None:
        size = max(1, min(DEFAULT_DEV_SIZE, int(len(train) * DEFAULT_DEV_FRACTION)))
    if size >= len(train):
        raise UserError(
            f"task {task.name}.dev_size",
            f"{size} dev examples out of {len(train)} training examples would leave none to train on",
            f"use a dev_size below {len(train)}, or name a dev_split",
        )
    held = np.zeros(len(train), dtype=bool)
    held[np.random.default_rng(DEV_SEED).permutation(len(train))[:size]] = True
    return train[~held].reset_index(drop=True), train[held].reset_index(drop=True)


@dataclass(frozen=True)
class TargetScale:
    """A regression task's targets are learned standardised, by the mean and standard deviation of the cell's
    training examples, and its predictions mapped back before any metric reads them. A fresh head outputs about
    0: on STS-B's 0-5 scale (mean 2.7) it would spend its first steps moving its output to the targets' mean, and
    with a PETL method's few trainable weights at a modest learning rate that can be the whole budget (measured on
    STS-B in docs/findings.md)."""

    mean: float
    std: float

    @classmethod
    def of(cls, task: TaskSpec, train: pd.DataFrame) -> "TargetScale | None":
        if not task.is_regression:
            return None
        targets = train[task.label_column].to_numpy(dtype=np.float64)
        spread = float(targets.std())
        return cls(float(targets.mean()), spread if spread > 0 else 1.0)

    def standardise(self, targets: np.ndarray) -> np.ndarray:
        return ((targets - self.mean) / self.std).astype(targets.dtype)

    def restore(self, predictions: torch.Tensor) -> torch.Tensor:
        return predictions * self.std + self.mean


class Encoded(torch.utils.data.Dataset):
    """Token ids per example, unpadded; padding happens per batch in `collate`. Regression targets are
    standardised by `scale` when one is given (the training split's)."""

    def __init__(self, task: TaskSpec, frame: pd.DataFrame, tokenizer, max_length: int, scale=None):
        texts = [frame[c].astype(str).tolist() for c in task.text_columns]
        self.encodings = tokenizer(*texts, truncation=True, max_length=max_length)
        dtype = np.float32 if task.is_regression else np.int64
        self.labels = frame[task.label_column].to_numpy().astype(dtype)
        if scale is not None:
            self.labels = scale.standardise(self.labels)

    def __len__(self):
        return len(self.labels)

    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.encodings["input_ids"]]

    def __getitem__(self, i):
        item = {k: v[i] for k, v in self.encodings.items()}
        item["labels"] = self.labels[i]
        return item


class Images(torch.utils.data.Dataset):
    """An image task's examples, kept as stored (paths or bytes); decoded and processed per batch in collate."""

    def __init__(self, task: TaskSpec, frame: pd.DataFrame):
        self.images = frame[task.image_column].tolist()
        self.labels = frame[task.label_column].to_numpy().astype(np.int64)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"image": self.images[i], "labels": self.labels[i]}


def examples(
    task: TaskSpec, frame: pd.DataFrame, preprocessor, max_length: int, scale: TargetScale | None = None
) -> torch.utils.data.Dataset:
    """A split as the loader reads it: token ids for text (a causal_lm task's prompts and targets), stored
    images for an image task; regression targets standardised by `scale` (the training split's, given for it)."""
    if task.image_column:
        return Images(task, frame)
    if task.is_causal_lm:
        return causal_lm.Examples(task, frame, preprocessor, max_length)
    return Encoded(task, frame, preprocessor, max_length, scale)


GROUP_SPAN = 50  # batches' worth of examples sorted by length together: HF Trainer's group_by_length uses 50 too


class LengthGroupedBatches(torch.utils.data.Sampler):
    """Training batches of examples of similar length, so that dynamic padding adds little (on GLUE's short
    sentences a random batch of 16 is padded to 1.4-2.6 times its examples' mean length; docs/findings.md).
    Each epoch shuffles the examples, sorts each run of GROUP_SPAN batches' worth by length, cuts the runs into
    batches and shuffles the batches' order: which examples meet in a batch is random within a run, and the
    order of lengths across steps is random. With drop_last the one short batch is left out, as a shuffling
    DataLoader leaves out its last."""

    def __init__(self, lengths: list[int], batch_size: int, generator: torch.Generator, drop_last: bool):
        self.lengths, self.batch_size, self.generator, self.drop_last = lengths, batch_size, generator, drop_last

    def __len__(self):
        whole, rest = divmod(len(self.lengths), self.batch_size)
        return whole + (rest > 0 and not self.drop_last)

    def __iter__(self):
        order = torch.randperm(len(self.lengths), generator=self.generator).tolist()
        span = self.batch_size * GROUP_SPAN
        batches = []
        for start in range(0, len(order), span):
            run = sorted(order[start : start + span], key=self.lengths.__getitem__, reverse=True)
            batches += [run[i : i + self.batch_size] for i in range(0, len(run), self.batch_size)]
        if self.drop_last and len(batches[-1]) < self.batch_size:
            batches.pop()
        for i in torch.randperm(len(batches), generator=self.generator).tolist():
            yield batches[i]


def make_collate(task: TaskSpec, preprocessor, padding: str, max_length: int, evaluation: bool = False):
    """Text: padding='dynamic' pads to the longest example of the batch; 'max_length' to max_length.
    Images: the backbone's image processor (resize, rescale, normalise) makes `pixel_values`.
    A causal_lm task's evaluation batches also hold the prompts alone, for generation (harness.causal_lm)."""
    if task.image_column:
        return _image_collate(preprocessor)
    shape = "max_length" if padding == "fill" else padding
    if task.is_causal_lm:
        collate = causal_lm.make_collate(preprocessor.pad_token_id, shape, max_length, evaluation)
    else:
        collate = _text_collate(preprocessor, shape, max_length)
    return _filled(collate, len(preprocessor)) if padding == "fill" else collate


FILL_SEED = 0  # the same random tokens for every method and seed, so filled cells compare like with like


def _filled(padded, vocabulary: int):
    """padding='fill': each padding position of the model's input becomes a real token, drawn at random from the
    tokenizer's ids (inside the model's vocabulary); labels there stay ignored, and a generation prompt stays as
    it is. So every sequence is max_length real tokens: the fixed length a random-weight cell measures."""
    generator = torch.Generator().manual_seed(FILL_SEED)

    def collate(items):
        batch = padded(items)
        padding = batch["attention_mask"] == 0
        drawn = torch.randint(0, vocabulary, batch["input_ids"].shape, generator=generator)
        batch["input_ids"] = torch.where(padding, drawn, batch["input_ids"])
        batch["attention_mask"] = torch.ones_like(batch["attention_mask"])
        return batch

    return collate


def _image_collate(processor):
    def collate(items):
        pixels = processor(images=[open_image(it["image"]) for it in items], return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixels, "labels": torch.tensor(np.array([it["labels"] for it in items]))}

    return collate


def _text_collate(tokenizer, padding: str, max_length: int):

    def collate(items):
        labels = torch.tensor(np.array([it.pop("labels") for it in items]))
        batch = tokenizer.pad(
            items,
            padding="longest" if padding == "dynamic" else "max_length",
            max_length=max_length,
            return_tensors="pt",
        )
        batch = dict(batch)
        batch["labels"] = labels
        return batch

    return collate
