"""group_by_length: training batches of similar-length examples, so dynamic padding pays for little, while every
example is still seen once per epoch in an order the seed fixes."""

import dataclasses

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from harness import backbone, data, worker
from harness.config import load_suite
from harness.errors import UserError
from harness.tasks import BUILTIN_TASKS


def batches(lengths, batch_size=16, seed=0, drop_last=False, epochs=1):
    sampler = data.LengthGroupedBatches(lengths, batch_size, torch.Generator().manual_seed(seed), drop_last)
    return [list(sampler) for _ in range(epochs)], len(sampler)


@pytest.fixture(scope="module")
def sst2_lengths(data_dir):
    task = BUILTIN_TASKS["sst2"]
    frame = data.subset(data.load_split(task, task.train_split, data_dir), 4000)
    tokenizer = AutoTokenizer.from_pretrained(backbone.resolve(backbone.Backbone()))
    return data.Encoded(task, frame, tokenizer, 128).lengths()


def padded_tokens(lengths, epoch):
    return sum(len(b) * max(lengths[i] for i in b) for b in epoch)


def test_every_example_is_drawn_once_per_epoch_and_the_seed_fixes_the_order(sst2_lengths):
    n = len(sst2_lengths) - 5  # not a multiple of the batch: one short batch
    lengths = sst2_lengths[:n]
    (first, second), count = batches(lengths, epochs=2)
    for epoch in (first, second):
        assert sorted(i for b in epoch for i in b) == list(range(n)) and len(epoch) == count == -(-n // 16)
        assert sum(len(b) < 16 for b in epoch) == 1
    assert first != second  # each epoch draws anew
    assert batches(lengths, epochs=2)[0] == [first, second] and batches(lengths, seed=1)[0][0] != first
    (dropped,), count = batches(lengths, drop_last=True)
    assert len(dropped) == count == n // 16 and all(len(b) == 16 for b in dropped)
    assert len({i for b in dropped for i in b}) == count * 16


def test_grouped_batches_pad_far_less_than_random_ones_and_keep_the_long_batches_apart(sst2_lengths):
    (grouped,), _ = batches(sst2_lengths)
    shuffled = torch.randperm(len(sst2_lengths), generator=torch.Generator().manual_seed(0)).tolist()
    random = [shuffled[i : i + 16] for i in range(0, len(shuffled), 16)]
    real = sum(sst2_lengths)
    assert padded_tokens(sst2_lengths, grouped) < 1.15 * real < padded_tokens(sst2_lengths, random) / 2
    # the order of lengths across steps is shuffled, not sorted from a span's longest to its shortest
    widths = [max(sst2_lengths[i] for i in b) for b in grouped]
    assert abs(np.corrcoef(widths[:-1], widths[1:])[0, 1]) < 0.2


def test_a_cell_reads_grouped_batches_when_its_settings_ask(tiny_suite, data_dir):
    path = tiny_suite(
        "tasks: [sst2]\nmethods: [{method: bitfit, lr: 1.0e-3}]\nseeds: [0]\n"
        "train: {epochs: 1, batch_size: 8, max_seq_length: 64, max_train_samples: 400, group_by_length: true}\n"
    )
    grouped = load_suite(path).cells()[0]
    shuffled = dataclasses.replace(grouped, train=dataclasses.replace(grouped.train, group_by_length=False))
    tokenizer = backbone.load_tokenizer(grouped.backbone)

    def real_share(cell):
        epoch = list(worker.loaders(cell, data_dir, tokenizer)[1])
        assert len(epoch) == 400 // 8 and all(len(b["labels"]) == 8 for b in epoch)
        return torch.cat([b["attention_mask"].flatten() for b in epoch]).float().mean().item()

    assert real_share(grouped) > 0.9 > 0.6 > real_share(shuffled)


def test_an_image_task_has_no_length_to_group_by(tmp_path):
    path = tmp_path / "digits.yaml"
    path.write_text(
        "name: digits\nbackbone: {config: vit-tiny, weights: random}\ntasks: [digits]\nmethods: [{method: full}]\n"
        "train: {max_steps: 1, group_by_length: true}\n"
    )
    with pytest.raises(UserError, match="digits is an image task"):
        load_suite(path)
