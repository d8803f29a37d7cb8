"""Prompt methods (prompt_tuning, p_tuning, dept, prefix_tuning) and PASTA beyond BERT: what the head reads, where
PASTA's vectors go, the counts from shapes, and the refusals. Tiny random models of tests/test_anatomy.py."""

import pytest
import torch

from harness.anatomy import describe
from harness.method import count, registry
from methods.prefix_tuning import word_keys_values
from tests.conftest import toy_task
from tests.test_anatomy import ALL

PROMPTS = ("prompt_tuning", "p_tuning", "dept", "prefix_tuning")
SMALL = {"prompt_tuning": {"num_virtual_tokens": 4}, "p_tuning": {"num_virtual_tokens": 4}, "dept": {"r": 2}}
TASK = toy_task()


def tiny(family):
    torch.manual_seed(0)
    model = ALL[family]()
    model.config.pad_token_id = 0
    return model


def applied(family, name, task=TASK):
    method = registry()[name](**SMALL.get(name, {}))
    model = tiny(family)
    declared = method.expected_trainable_params(model, task)
    model = method.apply(model, task).eval()
    assert count(p for p in model.parameters() if p.requires_grad) == declared
    return model


def ids(rows, length):
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, 100, (rows, length), generator=g)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("name", PROMPTS + ("pasta",))
def test_a_decoder_reads_the_last_real_token_not_a_pad(family, name, one_thread):
    model = applied(family, name)
    tokens = ids(2, 10)
    mask = torch.ones_like(tokens)
    mask[1, 7:] = 0  # right padding; the pads keep word ids, so only the mask tells them apart
    with torch.no_grad():
        padded = model(input_ids=tokens, attention_mask=mask).logits
        alone = model(input_ids=tokens[1:, :7], attention_mask=mask[1:, :7]).logits
    assert torch.allclose(padded[1], alone[0], atol=1e-5), "the padded row must read its last real token"


@pytest.mark.parametrize("family", ["bert", "roberta", "deberta-v2", "deberta-v3", "distilbert"])
@pytest.mark.parametrize("name", ["prompt_tuning", "p_tuning", "dept"])
def test_an_encoder_s_head_reads_the_text_s_first_token(family, name, one_thread):
    model = tiny(family)
    anatomy = describe(model)
    states = {}
    # registered before the method's own hook, so it sees the block's output with the virtual positions
    anatomy.blocks[-1].module.register_forward_hook(lambda m, a, out: states.setdefault("block", out))
    pooler = anatomy.head.pooler
    reader = pooler.module if pooler is not None else anatomy.head.input.module
    reader.register_forward_pre_hook(lambda m, args: states.setdefault("read", args[0]))
    method = registry()[name](**SMALL.get(name, {}))
    model = method.apply(model, TASK).eval()
    tokens = ids(2, 8)
    with torch.no_grad():
        model(input_ids=tokens, attention_mask=torch.ones_like(tokens))
    block = states["block"] if isinstance(states["block"], torch.Tensor) else states["block"][0]
    virtual = block.shape[1] - tokens.shape[1]
    assert virtual > 0
    expected = block[:, virtual:] if pooler is not None else block[:, virtual]  # a pooler takes the sequence
    assert torch.equal(states["read"], expected)


def test_prefix_init_from_words_takes_the_keys_and_values_out_of_a_fused_projection(one_thread):
    model = tiny("gpt2").eval()
    torch.manual_seed(3)
    prefix = word_keys_values(model, 5)
    torch.manual_seed(3)
    words = torch.randint(0, model.get_input_embeddings().weight.shape[0], (1, 5))
    with torch.no_grad():
        cache = model.base_model(input_ids=words, use_cache=True).past_key_values
    flat = []
    for layer in range(model.config.n_layer):  # GPT-2 caches what c_attn writes for k and v, unrotated
        keys, values = cache.layers[layer].keys, cache.layers[layer].values  # (1, heads, words, head dim)
        flat += [keys[0].transpose(0, 1).flatten(1), values[0].transpose(0, 1).flatten(1)]
    assert torch.allclose(prefix, torch.cat(flat, dim=-1), atol=1e-6)


@pytest.mark.parametrize("projection", [False, True])
def test_grouped_query_prefixes_are_as_wide_as_the_kv_projections(projection, one_thread):
    hparams = {"projection": True, "init": "random", "projection_hidden": 8} if projection else {}
    method = registry()["prefix_tuning"](num_virtual_tokens=3, **hparams)
    model = tiny("mistral")  # k/v of 2 heads x 8 (the tiny Llama's are 2 x 16, as wide as its hidden size)
    kv_width = describe(model).blocks[0].projection("k").out_features
    assert kv_width < model.config.hidden_size
    declared = method.expected_trainable_params(model, TASK)
    model = method.apply(model, TASK)
    assert count(p for p in model.parameters() if p.requires_grad) == declared
    tokens = ids(2, 6)
    model(input_ids=tokens, attention_mask=torch.ones_like(tokens), labels=torch.tensor([0, 1])).loss.backward()


def test_virtual_tokens_are_as_wide_as_the_token_embeddings(one_thread):
    model = applied("electra", "prompt_tuning")  # ELECTRA's embeddings (16) are narrower than its blocks (32)
    tokens = ids(2, 6)
    assert model(input_ids=tokens, attention_mask=torch.ones_like(tokens)).logits.shape == (2, 2)


@pytest.mark.parametrize(
    "family,name,reason",
    [
        ("vit", "prompt_tuning", "not a token embedding"),
        ("vit", "p_tuning", "not a token embedding"),
        ("vit", "dept", "not a token embedding"),
        ("deberta-v2", "prefix_tuning", "neither past_key_values nor cache"),
        ("distilbert", "prefix_tuning", "neither past_key_values nor cache"),
        ("vit", "prefix_tuning", "neither past_key_values nor cache"),
    ],
)
def test_refusals_name_what_is_missing(family, name, reason):
    assert reason in registry()[name]().unsupported(describe(tiny(family)))


REFUSED = {("prefix_tuning", "deberta-v2"), ("prefix_tuning", "deberta-v3"), ("prefix_tuning", "distilbert")}


@pytest.mark.parametrize("family", ["bert", "roberta", "deberta-v2", "deberta-v3", "distilbert", "gpt2", "llama"])
@pytest.mark.parametrize("name", PROMPTS + ("pasta",))
def test_only_the_named_text_pairs_are_refused(family, name):
    reason = registry()[name]().unsupported(describe(tiny(family)))
    assert (reason is not None) == ((name, family) in REFUSED), reason


def pasta_deltas(family, task, batch):
    """Per layer, what PASTA added to the layer's input, and the vectors."""
    model = tiny(family)
    blocks = [b.module for b in describe(model).blocks]
    seen = {i: [] for i in range(len(blocks))}

    def record(i):
        return lambda m, args, kwargs: seen[i].append((args[0] if args else kwargs["hidden_states"]).clone())

    for i, block in enumerate(blocks):
        block.register_forward_pre_hook(record(i), with_kwargs=True)
    method = registry()["pasta"]()
    declared = method.expected_trainable_params(model, task)
    model = method.apply(model, task).eval()
    assert count(p for p in model.parameters() if p.requires_grad) == declared
    for i, block in enumerate(blocks):
        block.register_forward_pre_hook(record(i), with_kwargs=True)
    with torch.no_grad():
        model(**batch)
    return [after - before for before, after in seen.values()], describe(model).base.module.pasta.vectors


def touched(delta):
    return delta.abs().sum(-1) > 0


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_pasta_on_a_decoder_tunes_the_first_and_last_real_tokens(family, one_thread):
    tokens = ids(3, 8)
    mask = torch.ones_like(tokens)
    mask[1, 5:] = 0  # right padding
    mask[2, :3] = 0  # left padding
    deltas, vectors = pasta_deltas(family, TASK, {"input_ids": tokens, "attention_mask": mask})
    assert vectors.shape[1] == 2
    expected = torch.zeros_like(mask, dtype=torch.bool)
    first, last = [0, 0, 3], [7, 4, 7]
    expected[[0, 1, 2], first] = expected[[0, 1, 2], last] = True
    for i, delta in enumerate(deltas):
        assert torch.equal(touched(delta), expected)
        assert torch.allclose(delta[[0, 1, 2], first], vectors[i, 0].expand(3, -1), atol=1e-6)
        assert torch.allclose(delta[[0, 1, 2], last], vectors[i, 1].expand(3, -1), atol=1e-6)


def test_pasta_on_vit_tunes_the_cls_token(one_thread):
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    deltas, vectors = pasta_deltas("vit", TASK, {"pixel_values": pixels})
    assert vectors.shape[1] == 1
    for i, delta in enumerate(deltas):
        assert touched(delta)[:, 0].all() and not touched(delta)[:, 1:].any()
        assert torch.allclose(delta[:, 0], vectors[i, 0].expand(2, -1), atol=1e-6)


def test_pasta_finds_a_pair_s_middle_separator_without_token_type_ids(one_thread):
    from dataclasses import replace

    pair = replace(TASK, text_columns=("a", "b"))
    bos, eos = 1, 2  # RoBERTa's <s> A </s></s> B </s>: the middle slot is the second </s>
    tokens = torch.tensor([[bos, 5, 6, 7, eos, eos, 8, 9, eos, 4], [bos, 5, eos, eos, 8, 9, 10, 11, 12, eos]])
    mask = torch.ones_like(tokens)
    mask[0, -1] = 0
    deltas, vectors = pasta_deltas("roberta", pair, {"input_ids": tokens, "attention_mask": mask})
    slots = {0: (0, 5, 8), 1: (0, 3, 9)}  # row -> positions of slots 0, 1, 2
    for i, delta in enumerate(deltas):
        for row, positions in slots.items():
            assert torch.nonzero(touched(delta[row])).flatten().tolist() == list(positions)
            assert torch.allclose(delta[row, list(positions)], vectors[i], atol=1e-6)
