"""Mean pooling, which replaces the [CLS] pooler of backbones trained with it (the
default MiniLM): the head reads the mean over the real tokens, padding ignored."""

import copy

import torch

from harness.backbone import use_mean_pooling
from tests.conftest import tiny_bert, toy_batch, toy_task


def mean_pooled(task=None):
    task = task or toy_task(2)
    model = tiny_bert(task).eval()
    use_mean_pooling(model)
    return model, task


def test_pooled_features_are_the_mean_over_real_tokens():
    model, task = mean_pooled()
    batch = toy_batch(task)
    batch.pop("labels")
    hidden = model.base_model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    expected = (hidden * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(model.base_model(**batch).pooler_output, expected)


def test_padding_does_not_change_a_sentence_s_logits():
    model, task = mean_pooled()
    batch = toy_batch(task)
    alone = {k: v[:1, :9] for k, v in batch.items() if k != "labels"}  # sentence 0 has 9 real tokens
    assert batch["attention_mask"][0].sum() == 9
    padded = {k: v[:1] for k, v in batch.items() if k != "labels"}
    torch.testing.assert_close(model(**alone).logits, model(**padded).logits)


def test_a_deep_copy_pools_with_its_own_mask():
    """Hooks are shared by deep copies: the copy must still fill its own pooler's mask."""
    model, task = mean_pooled()
    batch = {k: v for k, v in toy_batch(task).items() if k != "labels"}
    other = {k: v[:2, :5] for k, v in batch.items()}
    model(**other)  # the original has seen another batch shape
    twin = copy.deepcopy(model)
    torch.testing.assert_close(twin(**batch).logits, model(**batch).logits)
    twin(**other)
    assert model.base_model.pooler.mask.shape == batch["attention_mask"].shape, "the copy wrote the original's mask"
