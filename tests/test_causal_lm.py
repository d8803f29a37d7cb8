"""Causal-LM tasks: templates to tokens, a loss on the target alone, token-weighted accumulation, greedy
generation and its metrics, and the methods that train a decoder this way, on the tiny shipped decoders."""

import numpy as np
import pandas as pd
import pytest
import torch

from harness import backbone, causal_lm, data, worker
from harness.backbone import Backbone
from harness.config import load_suite
from harness.method import registry
from harness.metrics import METRICS
from harness.tasks import BUILTIN_TASKS, TaskSpec
from harness.train import weight

LLAMA = Backbone("llama-tiny", weights="random")
SST2_LM = BUILTIN_TASKS["sst2_lm"]


def echo_task(**fields) -> TaskSpec:
    """A task whose target is the sentence itself: targets of every length."""
    values = dict(
        name="echo",
        text_columns=("sentence",),
        metrics=("exact_match", "perplexity"),
        primary_metric="exact_match",
        type="causal_lm",
        local="glue/sst2",
        prompt="Repeat: {sentence}\n",
        target=" {sentence}",
    )
    return TaskSpec(**{**values, **fields})


@pytest.fixture(scope="module")
def tokenizer():
    return backbone.load_tokenizer(LLAMA)


def test_the_builtin_tasks_render_their_templates():
    frame = pd.DataFrame({"sentence": ["a fine film", "dull"], "label": [1, 0], "idx": [0, 1]})
    prompts, targets = causal_lm.render(SST2_LM, frame)
    assert prompts == ["Review: a fine film\nSentiment:", "Review: dull\nSentiment:"]
    assert targets == [" positive", " negative"]
    rte = BUILTIN_TASKS["rte_lm"]
    assert rte.text_columns == ("sentence1", "sentence2", "label") and rte.is_causal_lm
    assert causal_lm.render(rte, pd.DataFrame({"sentence1": ["p"], "sentence2": ["h"], "label": [0]}))[1] == [" yes"]


def test_a_long_prompt_loses_its_left_end_and_the_target_is_whole(tokenizer):
    frame = pd.DataFrame({"sentence": ["one two three four five six seven eight nine ten"]})
    examples = causal_lm.Examples(echo_task(), frame, tokenizer, max_length=16)
    item = examples[0]
    target = tokenizer(" one two three four five six seven eight nine ten", add_special_tokens=False)["input_ids"]
    assert item["target"] == target + [tokenizer.sep_token_id], "the whole target, then the end token"
    full_prompt = tokenizer("Repeat: one two three four five six seven eight nine ten\n")["input_ids"]
    assert len(item["prompt"]) + len(item["target"]) == 16
    assert item["prompt"][0] == tokenizer.cls_token_id, "the leading special token stays"
    assert item["prompt"][1:] == full_prompt[len(full_prompt) - (len(item["prompt"]) - 1) :], "cut from the left"


def test_batches_label_the_target_alone_and_generation_pads_left(tokenizer):
    frame = pd.DataFrame({"sentence": ["good", "a much longer sentence here"], "label": [1, 0]})
    examples = causal_lm.Examples(SST2_LM, frame, tokenizer, max_length=64)
    batch = causal_lm.make_collate(tokenizer.pad_token_id, "dynamic", 64, evaluation=True)([examples[0], examples[1]])
    for row, item in enumerate(examples.items):
        p, t = len(item["prompt"]), len(item["target"])
        labels = batch["labels"][row].tolist()
        assert labels[:p] == [causal_lm.IGNORE] * p and labels[p : p + t] == item["target"]
        assert set(labels[p + t :]) <= {causal_lm.IGNORE}, "padding is never a target"
        assert batch["attention_mask"][row].sum() == p + t
        prompt_row = batch["prompt_ids"][row].tolist()
        assert prompt_row[len(prompt_row) - p :] == item["prompt"], "prompts are right-aligned for generation"
        assert batch["prompt_mask"][row, -p:].all() and not batch["prompt_mask"][row, :-p].any()


def test_the_loss_covers_the_target_and_ignores_whatever_the_model_says_at_prompt_positions(tokenizer):
    torch.manual_seed(0)
    model = backbone.load_model(LLAMA, SST2_LM)
    frame = pd.DataFrame({"sentence": ["good", "a much longer sentence here"], "label": [1, 0]})
    examples = causal_lm.Examples(SST2_LM, frame, tokenizer, max_length=64)
    batch = causal_lm.make_collate(tokenizer.pad_token_id, "dynamic", 64)([examples[0], examples[1]])
    loss = model(**batch).loss
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    predicted, labels = logits[:, :-1], batch["labels"][:, 1:]
    keep = labels != causal_lm.IGNORE
    by_hand = torch.nn.functional.cross_entropy(predicted[keep], labels[keep])
    assert torch.allclose(loss, by_hand, atol=1e-6)

    # the prompt's positions: scrambling what the model predicts there changes nothing
    prompt_positions = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    for row, item in enumerate(examples.items):
        prompt_positions[row, : len(item["prompt"]) - 1] = True  # position i predicts token i + 1
    scrambled = model.lm_head.register_forward_hook(
        lambda module, args, out: torch.where(prompt_positions[..., None], torch.randn_like(out) * 50, out)
    )
    try:
        assert torch.equal(model(**batch).loss, loss)
    finally:
        scrambled.remove()


def test_accumulated_micro_batches_weigh_by_target_tokens(tokenizer):
    torch.manual_seed(0)
    model = backbone.load_model(LLAMA, echo_task())
    frame = pd.DataFrame({"sentence": ["a", "b c d e f g h i j k l m n o"]})
    examples = causal_lm.Examples(echo_task(), frame, tokenizer, max_length=64)
    batch = causal_lm.make_collate(tokenizer.pad_token_id, "dynamic", 64)([examples[0], examples[1]])
    whole = model(**batch).loss
    micro = [{k: v[i : i + 1] for k, v in batch.items()} for i in range(2)]
    assert weight(micro[0]) != weight(micro[1]), "targets of different lengths, or the test proves nothing"
    accumulated = sum(model(**m).loss * weight(m) / weight(batch) for m in micro)
    by_examples = sum(model(**m).loss / 2 for m in micro)
    assert torch.allclose(accumulated, whole, atol=1e-6)
    assert not torch.allclose(by_examples, whole, atol=1e-3), "weighing by examples would differ"


class Counter(torch.nn.Module):
    """A 'language model' that predicts the next token as the last one + 1, and records the positions it saw."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.positions = vocab, []

    def forward(self, input_ids, attention_mask, position_ids=None):
        self.positions.append(position_ids)
        logits = torch.nn.functional.one_hot((input_ids + 1) % self.vocab, self.vocab).float()
        return type("Out", (), {"logits": logits})()


def test_greedy_generation_stops_at_the_end_token_and_counts_real_positions():
    model = Counter(vocab=10)
    ids = torch.tensor([[0, 0, 3], [4, 5, 6]])
    mask = torch.tensor([[0, 0, 1], [1, 1, 1]])
    generated = causal_lm.greedy(model, ids, mask, max_new=5, end=9)
    assert generated.tolist() == [[4, 5, 6, 7, 8], [7, 8, 9, 9, 9]]
    assert model.positions[0].tolist() == [[0, 0, 0], [0, 1, 2]], "a left-padded row starts at position 0"
    assert causal_lm.until_end(generated, 9) == [[4, 5, 6, 7, 8], [7, 8]]
    early = Counter(vocab=10)
    causal_lm.greedy(early, torch.tensor([[7]]), torch.tensor([[1]]), max_new=5, end=9)
    assert len(early.positions) == 2, "every row ended: no more forwards"


def test_answers_are_normalised_and_patterns_take_the_last_match():
    assert causal_lm.answer("  Positive. ") == "positive"
    assert causal_lm.answer("so 3 + 4 = 7", r"-?\d+") == "7"
    assert causal_lm.answer("the answer is #### 42 ok", r"#### (\d+)") == "42"
    assert causal_lm.answer("no number", r"\d+") == ""
    em = METRICS["exact_match"]
    assert em(np.array(["yes", "no", "yes"], dtype=object), np.array(["yes", "yes", "yes"], dtype=object)) == 2 / 3
    nll, tokens = np.array([2.0, 4.0]), np.array([1, 3])
    assert METRICS["perplexity"](nll, tokens) == pytest.approx(np.exp(6.0 / 4))
    assert METRICS["perplexity"].reads == "likelihood" and not METRICS["perplexity"].higher_is_better


def test_a_shipped_config_without_a_tokenizer_reads_text_with_the_default_one():
    assert backbone.stand_in_tokenizer(Backbone("qwen2.5-0.5b", weights="random"))
    assert "tokenizer standing in" in backbone.describe(Backbone("qwen2.5-0.5b", weights="random"))
    assert not backbone.stand_in_tokenizer(Backbone(None))
    tokenizer = backbone.load_tokenizer(Backbone("qwen2.5-0.5b", weights="random"))
    assert len(tokenizer) <= 151936


def test_a_stand_in_tokenizer_must_fit_the_vocabulary(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=100, hidden_size=32, num_attention_heads=4, intermediate_size=64).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="vocabulary of 100 ids"):
        backbone.load_tokenizer(Backbone(str(tmp_path), weights="random"))


LM_METHODS = """
  - {method: full, lr: 3.0e-3}
  - {method: lora, lr: 1.0e-2}
  - {method: prompt_tuning, lr: 3.0e-2, hparams: {num_virtual_tokens: 4}}
  - {method: tokentune, lr: 3.0e-3}
  - {label: lora+mesa, stack: [{method: lora}, {method: mesa}], lr: 1.0e-2}
  - {method: lst, lr: 1.0e-2}
"""


@pytest.mark.parametrize("config", ["llama-tiny", "gpt2-tiny"])
def test_sst2_lm_trains_every_generating_method_on_a_tiny_decoder(config, tmp_path, data_dir):
    suite = tmp_path / "lm.yaml"
    suite.write_text(
        f"backbone: {{config: {config}, weights: random}}\ntasks: [sst2_lm]\n"
        "train: {max_steps: 8, batch_size: 8, max_train_samples: 64, max_eval_samples: 16, max_seq_length: 48,"
        " warmup_ratio: 0.0}\n"
        f"methods:{LM_METHODS}"
    )
    for cell in load_suite(suite).cells():
        record = worker.run_cell(cell, data_dir, "cpu", progress=False)
        assert record["status"] == "ok", (cell.entry.label, record.get("error"))
        metrics = record["metrics"]
        assert metrics["exact_match"]["higher_is_better"] and not metrics["perplexity"]["higher_is_better"]
        assert 0 <= metrics["exact_match"]["value"] <= 1 and np.isfinite(metrics["perplexity"]["value"])
        losses = record["train"]["losses"]
        assert losses[-1] < losses[0], (cell.entry.label, losses)
        m = record["measurements"]
        assert 0 < m["train_target_tokens_per_s"] < m["train_tokens_per_s"]
        if cell.entry.label != "full":
            frozen = record["params"]["total"] - record["params"]["trainable"]
            assert m["frozen_param_bytes"] == 4 * frozen, "fp32 frozen weights by default"


def test_frozen_weights_in_bf16_and_trainable_ones_in_fp32(tmp_path, data_dir):
    suite = tmp_path / "bf16.yaml"
    suite.write_text(
        "backbone: {config: llama-tiny, weights: random, dtype: bf16}\ntasks: [sst2_lm]\n"
        "train: {max_steps: 2, batch_size: 4, max_train_samples: 8, evaluate: false, precision: bf16}\n"
        "methods: [{method: lora}, {method: full}]"
    )
    lora, full = load_suite(suite).cells()
    model = worker.build(lora)[0]
    dtypes = {(p.requires_grad, p.dtype) for p in model.parameters()}
    assert dtypes == {(True, torch.float32), (False, torch.bfloat16)}
    record = worker.run_cell(lora, data_dir, "cpu", progress=False)
    assert record["status"] == "ok", record.get("error")
    frozen = record["params"]["total"] - record["params"]["trainable"]
    assert record["measurements"]["frozen_param_bytes"] == 2 * frozen
    assert record["measurements"]["trainable_param_bytes"] == 4 * record["params"]["trainable"]
    assert {p.dtype for p in worker.build(full)[0].parameters()} == {torch.float32}, "all trainable: all fp32"


def test_methods_whose_output_is_a_classifier_refuse_a_language_model(glue_like_data, tmp_path):
    from harness import runner

    suite = tmp_path / "side.yaml"
    suite.write_text(
        "backbone: {config: llama-tiny, weights: random}\ntasks: [sst2_lm]\n"
        "methods: [lst, unipt, sherl, vqt, linear_probe, lora]"
    )
    loaded = load_suite(suite)
    reasons = runner.unsupported_cells(loaded, loaded.cells())
    labels = {cell.entry.label for cell in loaded.cells() if cell.key in reasons}
    assert labels == {"unipt", "sherl", "vqt", "linear_probe"}


def test_the_eval_split_is_read_in_order_for_the_references(tokenizer, data_dir):
    frame = data.load_split(SST2_LM, "validation", data_dir).head(5)
    examples = data.examples(SST2_LM, frame, tokenizer, 64)
    words = {0: "negative", 1: "positive"}
    assert examples.answers == [words[label] for label in frame["label"]]


def test_fill_makes_every_sequence_max_length_real_tokens(tokenizer):
    frame = pd.DataFrame({"sentence": ["good", "a much longer sentence here"], "label": [1, 0]})
    examples = data.examples(SST2_LM, frame, tokenizer, 32)
    padded = data.make_collate(SST2_LM, tokenizer, "max_length", 32)([examples[0], examples[1]])
    filled = data.make_collate(SST2_LM, tokenizer, "fill", 32)([examples[0], examples[1]])
    assert filled["input_ids"].shape == (2, 32) and filled["attention_mask"].all()
    real = padded["attention_mask"].bool()
    assert torch.equal(filled["input_ids"][real], padded["input_ids"][real]), "the text comes first, unchanged"
    assert (filled["input_ids"][~real] != tokenizer.pad_token_id).any(), "the rest are drawn tokens, not padding"
    assert int(filled["input_ids"].max()) < len(tokenizer)
    assert torch.equal(filled["labels"], padded["labels"]), "drawn tokens are never targets"
    again = data.make_collate(SST2_LM, tokenizer, "fill", 32)([examples[0], examples[1]])
    assert torch.equal(again["input_ids"], filled["input_ids"]), "the same tokens for every method and seed"


@pytest.fixture(scope="module")
def lm_batch(tokenizer):
    frame = pd.DataFrame(
        {"sentence": ["a fine film", "dull and long", "fun", "not good at all"], "label": [1, 0, 1, 0]}
    )
    examples = causal_lm.Examples(SST2_LM, frame, tokenizer, max_length=32)
    return causal_lm.make_collate(tokenizer.pad_token_id, "dynamic", 32, evaluation=True)(list(examples))


@pytest.mark.parametrize("config", ["llama-tiny", "gpt2-tiny"])
@pytest.mark.parametrize("name", sorted(registry()))
def test_every_method_trains_a_causal_lm_or_says_why_not(name, config, lm_batch):
    """The contract on a language model: a method refuses the task with a reason, or trains exactly what it
    declares (no task head: the LM head stays frozen), its loss falls, the frozen weights stay bit-identical,
    and the module it returns generates (logits of every position, the input's last)."""
    from harness.anatomy import describe

    spec = Backbone(config, weights="random")
    cls = registry()[name]
    if cls().unsupported(describe(backbone.skeleton(spec, SST2_LM))) is not None:
        return
    torch.manual_seed(0)
    model = backbone.load_model(spec, SST2_LM)
    method = cls()
    declared = method.expected_trainable_params(model, SST2_LM)
    head = model.get_output_embeddings().weight
    originals = [(p, p.detach().clone()) for p in model.parameters()]
    model = method.apply(model, SST2_LM)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == declared
    assert not head.requires_grad or name in ("full", "mesa", "s2a", "tokentune", "wta_crs"), "the LM head is frozen"
    train_batch = {k: lm_batch[k] for k in ("input_ids", "attention_mask", "labels")}
    model.eval()
    with torch.no_grad():
        before = model(**train_batch).loss.item()
    optimizer = torch.optim.AdamW(method.param_groups(model, cls.default_lr * 3))
    for _ in range(10):
        model.train()
        optimizer.zero_grad()
        model(**train_batch).loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        after = model(**train_batch).loss.item()
        nll, tokens = causal_lm.target_likelihood(model, **train_batch)
        generated = causal_lm.greedy(model, lm_batch["prompt_ids"], lm_batch["prompt_mask"], 2, None)
    assert after < before, f"loss fell from {before:.4f} to {after:.4f}"
    assert torch.equal(tokens, (lm_batch["labels"][:, 1:] != causal_lm.IGNORE).sum(1)) and torch.isfinite(nll).all()
    assert generated.shape == (4, 2)
    for p, copy in originals:
        if not p.requires_grad:
            assert torch.equal(p, copy), "a frozen weight changed"


@pytest.mark.parametrize("name", ["llm_memory", "llm_cpu"])
def test_the_llm_suites_pass_preflight_and_refuse_no_method(name, data_dir):
    from harness import runner
    from tests.conftest import ROOT

    loaded = load_suite(ROOT / "suites" / f"{name}.yaml")
    runner.preflight(loaded, data_dir)
    assert runner.unsupported_cells(loaded, loaded.cells()) == {}
    assert all(c.backbone.random and not c.train.evaluate for c in loaded.cells()), "memory-and-speed cells"
