"""Image classification as a task kind: scikit-learn's digits offline, a task's image column as file paths or as
bytes (as `datasets` stores them), the `imagefolder` layout, the backbone's image processor, patches counted as
the meter's tokens, and a ViT built from a shipped config with random weights."""

import io

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from harness import backbone, data
from harness.backbone import Backbone
from harness.errors import UserError
from harness.meter import Meter
from harness.tasks import BUILTIN_TASKS, TaskSpec

DIGITS = BUILTIN_TASKS["digits"]
VIT = Backbone("vit-tiny", weights="random")


def image_task(**fields) -> TaskSpec:
    spec = {"image_column": "image", "num_labels": 2, "metrics": ["accuracy"], **fields}
    return TaskSpec.from_mapping("pictures", spec, "test")


def png(value: int, size: int = 6) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_digits_are_scikit_learn_s_split_80_20_stratified_and_fixed():
    train, validation = data.load_split(DIGITS, "train", None), data.load_split(DIGITS, "validation", None)
    assert (len(train), len(validation)) == (1437, 360)
    assert sorted(validation["label"].unique()) == list(range(10))
    again = data.load_split(DIGITS, "validation", None)
    assert again["image"].iloc[0]["bytes"] == validation["image"].iloc[0]["bytes"], "the same images every time"
    image = data.open_image(train["image"].iloc[0])
    assert image.size == (8, 8) and image.mode == "RGB"


def test_an_image_column_of_paths_is_read_relative_to_its_file_and_bytes_as_stored(tmp_path):
    (tmp_path / "img").mkdir()
    for i in range(2):
        (tmp_path / "img" / f"{i}.png").write_bytes(png(200 * i))
    pd.DataFrame({"image": ["img/0.png", "img/1.png"], "label": [0, 1]}).to_csv(tmp_path / "train.csv", index=False)
    stored = [{"bytes": png(0), "path": None}, {"bytes": png(200), "path": None}]
    pd.DataFrame({"image": stored, "label": [0, 1]}).to_parquet(tmp_path / "validation.parquet")
    task = image_task(data_files={"train": "train.csv", "validation": "validation.parquet"})
    task = TaskSpec.from_dict(
        {**task.to_dict(), "data_files": {k: str(tmp_path / v) for k, v in task.data_files.items()}}
    )
    by_path, by_bytes = data.load_split(task, "train", None), data.load_split(task, "validation", None)
    assert np.array_equal(
        np.asarray(data.open_image(by_path["image"][1])), np.asarray(data.open_image(by_bytes["image"][1]))
    )


def test_an_image_folder_reads_labels_from_sorted_class_folders(tmp_path):
    for split in ("train", "validation"):
        for label, name in enumerate(["cat", "dog"]):
            (tmp_path / split / name).mkdir(parents=True)
            (tmp_path / split / name / "a.png").write_bytes(png(100 * label))
    task = image_task(data_files={"train": str(tmp_path / "train"), "validation": str(tmp_path / "validation")})
    frame = data.load_split(task, "train", None)
    assert list(frame["label"]) == [0, 1] and frame["image"][1].endswith("dog/a.png")
    with pytest.raises(UserError, match="2 class folders"):
        data.load_split(image_task(num_labels=3, data_files={"train": str(tmp_path / "train")}), "train", None)


def test_a_column_that_holds_no_images_stops_before_training(tmp_path):
    pd.DataFrame({"image": ["not an image", "x"], "label": [0, 1]}).to_csv(tmp_path / "d.csv", index=False)
    with pytest.raises(UserError, match="image files do not exist"):
        data.load_split(image_task(data_files={"train": str(tmp_path / "d.csv")}), "train", None)
    pd.DataFrame({"image": [b"junk", b"junk"], "label": [0, 1]}).to_parquet(tmp_path / "d.parquet")
    with pytest.raises(UserError, match="does not hold images"):
        data.load_split(image_task(data_files={"train": str(tmp_path / "d.parquet")}), "train", None)


def test_a_task_reads_text_or_an_image_never_both():
    with pytest.raises(UserError, match="either text or an image"):
        image_task(text_columns=["caption"], local="x")
    with pytest.raises(UserError, match="either text or an image"):
        TaskSpec.from_mapping("none", {"num_labels": 2, "metrics": ["accuracy"], "local": "x"}, "test")


def test_a_random_weight_vit_from_its_shipped_config_classifies_processed_digits():
    frame = data.subset(data.load_split(DIGITS, "train", None), 8)
    processor = backbone.load_preprocessor(VIT, DIGITS)
    batch = data.make_collate(DIGITS, processor, "dynamic", 0)(list(data.examples(DIGITS, frame, processor, 0)))
    assert batch["pixel_values"].shape == (8, 3, 32, 32) and batch["labels"].tolist() == frame["label"].tolist()
    torch.manual_seed(0)
    model = backbone.load_model(VIT, DIGITS)
    torch.manual_seed(0)
    twin = backbone.load_model(VIT, DIGITS)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values())), "seeded"
    out = model(**batch)
    assert out.logits.shape == (8, 10) and torch.isfinite(out.loss)
    assert "random weights" in backbone.describe(VIT)

    meter = Meter(model, torch.device("cpu"), timing_warmup_steps=0)
    with meter.step(batch):
        pass
    assert meter.steps[0][1:] == (8, 8 * (32 // 4) ** 2, 0), "samples, patches for tokens, no target tokens"
