"""harness.anatomy: one description of a backbone, found from the model, asked by role.

Every model here is a tiny random one built from its config class (no hub, no weights).
"""

import pytest
import torch
import transformers as tf
from torch import nn
from transformers.pytorch_utils import Conv1D

from harness.anatomy import ALIASES, ROLES, alias_to_role, describe, in_out_features, norm_kind, out_axis
from harness.families import BUILDERS, FFN, HEADS, LAYERS, VOCAB, D

TEXT = dict(hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FFN, vocab_size=VOCAB)
TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
# Families anatomy.py has no word for: found by the same rules.
UNNAMED = {
    "mistral": lambda: tf.MistralForSequenceClassification(tf.MistralConfig(num_key_value_heads=2, **TEXT, **TOKENS)),
    "qwen2": lambda: tf.Qwen2ForSequenceClassification(tf.Qwen2Config(num_key_value_heads=2, **TEXT, **TOKENS)),
    "electra": lambda: tf.ElectraForSequenceClassification(tf.ElectraConfig(embedding_size=16, **TEXT)),
    "phi3": lambda: tf.Phi3ForSequenceClassification(tf.Phi3Config(num_key_value_heads=2, **TEXT, **TOKENS)),
}
# family -> (causal, norm order, norm kind, kv heads, gated FFN, head reads, head's first layer, final norm)
EXPECTED = {
    "bert": (False, "post", "layernorm", 4, False, "first", "classifier", None),
    "roberta": (False, "post", "layernorm", 4, False, "first", "classifier.dense", None),
    "deberta-v2": (False, "post", "layernorm", 4, False, "first", "classifier", None),
    "deberta-v3": (False, "post", "layernorm", 4, False, "first", "classifier", None),
    "distilbert": (False, "post", "layernorm", 4, False, "first", "pre_classifier", None),
    "gpt2": (True, "pre", "layernorm", 4, False, "last", "score", "transformer.ln_f"),
    "llama": (True, "pre", "rmsnorm", 2, True, "last", "score", "model.norm"),
    "vit": (False, "pre", "layernorm", 4, False, "first", "classifier", "vit.layernorm"),
    "mistral": (True, "pre", "rmsnorm", 2, True, "last", "score", "model.norm"),
    "qwen2": (True, "pre", "rmsnorm", 2, True, "last", "score", "model.norm"),
    "electra": (False, "post", "layernorm", 4, False, "first", "classifier.dense", None),
    "phi3": (True, "pre", "rmsnorm", 2, True, "last", "score", "model.norm"),
}
ALL = {**BUILDERS, **UNNAMED}
_cache = {}


def model(family):
    if family not in _cache:
        torch.manual_seed(0)
        _cache[family] = ALL[family]().eval()
    return _cache[family]


def declared_head_dim(config) -> int:
    """The config's head_dim where it sets one (the tiny Llama's heads are wider than D / HEADS), else D / HEADS."""
    return config.head_dim if isinstance(getattr(config, "head_dim", None), int) else D // HEADS


def expected_shapes(kv_heads, head_dim):
    return {
        "q": (D, HEADS * head_dim),
        "k": (D, kv_heads * head_dim),
        "v": (D, kv_heads * head_dim),
        "o": (HEADS * head_dim, D),
        "ffn_in": (D, FFN),
        "ffn_gate": (D, FFN),
        "ffn_out": (FFN, D),
    }


@pytest.mark.parametrize("family", list(ALL))
def test_every_role_resolves_to_a_module_of_the_config_s_shape(family):
    m = model(family)
    a = describe(m)
    causal, order, kind, kv, gated, reads, head_input, final = EXPECTED[family]
    assert len(a.blocks) == m.config.num_hidden_layers == LAYERS
    assert a.hidden_size == D
    head_dim = declared_head_dim(m.config)
    shapes = expected_shapes(kv, head_dim)
    roles = set(ROLES) - (set() if gated else {"ffn_gate"})
    assert set(a.roles()) == roles
    for role in roles:
        found = a.projections(role)
        assert len(found) == LAYERS
        for block, p in zip(a.blocks, found):
            assert p.role == role
            assert m.get_submodule(p.path) is p.module
            assert p.path.startswith(block.path + ".")
            assert (p.in_features, p.out_features) == shapes[role], (family, role, p.path)
            width = in_out_features(p.module)
            if p.fused is None:
                assert width == shapes[role]
            else:
                assert width == (D, sum(p.fused.sizes))
                assert len(p.indices) == shapes[role][1]
    for block in a.blocks:
        assert (block.num_heads, block.num_kv_heads, block.head_dim) == (HEADS, kv, head_dim)
        assert block.gated is gated
        # the attention module holds q, k and v
        for role in ("q", "k", "v"):
            assert block.projection(role).path.startswith(block.attention.path + ".")
    # two different blocks never share a projection
    assert len({id(p.module) for p in a.projections("v")}) == LAYERS


@pytest.mark.parametrize("family", list(ALL))
def test_causality_norms_and_where_the_head_reads(family):
    m = model(family)
    a = describe(m)
    causal, order, kind, kv, gated, reads, head_input, final = EXPECTED[family]
    assert a.family == m.config.model_type
    assert a.causal is causal
    assert a.norm_order == order and all(b.norm_order == order for b in a.blocks)
    for block in a.blocks:
        assert [n.kind for n in block.norms] == [kind, kind]
        assert all(n.path.startswith(block.path + ".") for n in block.norms)
    assert a.head.reads == reads
    assert a.head.input.path == head_input and m.get_submodule(head_input) is a.head.input.module
    assert in_out_features(a.head.input.module)[0] == D
    assert (a.final_norm and a.final_norm.path) == final
    if final:
        assert a.final_norm.kind == kind
    assert a.embeddings.input.module is m.get_input_embeddings()
    assert all(h.path in dict(m.named_children()) for h in a.head.modules)
    assert a.base.module is m.base_model


def test_what_each_named_family_is_made_of():
    """The parts a method would otherwise spell per family."""
    bert = describe(model("bert"))
    assert bert.blocks_path == "bert.encoder.layer"
    assert bert.blocks[0].attention.path == "bert.encoder.layer.0.attention.self"
    assert bert.projections("o")[1].path == "bert.encoder.layer.1.attention.output.dense"
    assert bert.embeddings.block.path == "bert.embeddings"
    assert [n.path for n in bert.embeddings.norms] == ["bert.embeddings.LayerNorm"]
    assert bert.head.pooler.path == "bert.pooler" and bert.head.pooler_in_backbone
    assert [h.path for h in bert.head.modules] == ["classifier"]

    deberta = describe(model("deberta-v2"))
    assert deberta.head.pooler.path == "pooler" and not deberta.head.pooler_in_backbone
    assert [h.path for h in deberta.head.modules] == ["pooler", "classifier"]
    assert describe(model("roberta")).head.pooler is None

    gpt2 = describe(model("gpt2"))
    assert gpt2.embeddings.block is None and gpt2.embeddings.input.path == "transformer.wte"
    (fused,) = gpt2.blocks[0].fused
    assert fused.path == "transformer.h.0.attn.c_attn" and isinstance(fused.module, Conv1D)
    assert fused.roles == ("q", "k", "v") and fused.layout == "concat"
    assert [p.part for p in gpt2.blocks[0].projections.values() if p.fused] == [
        slice(0, D),
        slice(D, 2 * D),
        slice(2 * D, 3 * D),
    ]
    assert out_axis(fused.module) == 1 and out_axis(gpt2.projections("o")[0].module) == 1

    llama = describe(model("llama"))
    block = llama.blocks[0]
    assert block.projection("ffn_gate").path == "model.layers.0.mlp.gate_proj"
    assert block.projection("ffn_in").path == "model.layers.0.mlp.up_proj"
    assert block.projection("ffn_out").path == "model.layers.0.mlp.down_proj"
    assert [n.path for n in block.norms] == [
        "model.layers.0.input_layernorm",
        "model.layers.0.post_attention_layernorm",
    ]
    assert not block.fused

    vit = describe(model("vit"))
    assert vit.embeddings.block.path == "vit.embeddings"
    assert vit.embeddings.input.path == "vit.embeddings.patch_embeddings"
    assert vit.head.pooler is None


def test_a_fused_qkv_and_gate_up_split_by_their_widths_under_gqa():
    phi3 = describe(model("phi3"))
    block = phi3.blocks[0]
    attn, mlp = block.fused
    hd = D // HEADS
    assert attn.path == "model.layers.0.self_attn.qkv_proj" and attn.sizes == (HEADS * hd, 2 * hd, 2 * hd)
    assert [block.projection(r).part for r in ("q", "k", "v")] == [slice(0, 32), slice(32, 48), slice(48, 64)]
    assert mlp.path == "model.layers.0.mlp.gate_up_proj" and mlp.roles == ("ffn_gate", "ffn_in")
    assert block.projection("ffn_gate").part == slice(0, FFN) and block.projection("ffn_in").part == slice(FFN, 2 * FFN)


def test_gpt_neox_s_query_key_value_is_split_per_head():
    config = tf.GPTNeoXConfig(**TEXT, **TOKENS)
    a = describe(tf.GPTNeoXForSequenceClassification(config))
    p = a.projections("k")[0]
    hd = D // HEADS
    assert p.fused.layout == "grouped" and p.fused.groups == HEADS
    # per head: q, k, v of head_dim each
    assert p.indices == [h * 3 * hd + hd + i for h in range(HEADS) for i in range(hd)]
    with pytest.raises(ValueError, match="use indices"):
        p.part  # noqa: B018


def test_names_are_only_hints_the_layout_is_found_from_types_and_shapes():
    """A Llama whose every projection is renamed still resolves: widths and order, not names, decide."""
    m = tf.LlamaForSequenceClassification(tf.LlamaConfig(num_key_value_heads=2, **TEXT, **TOKENS))
    before = describe(m)
    renames = {"q_proj": "a", "k_proj": "b", "v_proj": "c", "o_proj": "d", "gate_proj": "e", "up_proj": "f"}
    for layer in m.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            parent._modules = {renames.get(k, k): v for k, v in parent._modules.items()}
    after = describe(m)
    for role in before.roles():
        assert [p.module for p in after.projections(role)] == [p.module for p in before.projections(role)], role
    assert after.projections("k")[0].path == "model.layers.0.self_attn.b"


def test_aliases_keep_today_s_bert_names_meaning_on_every_family():
    assert {alias: alias_to_role(alias) for alias in ("query", "key", "value")} == {
        "query": "q",
        "key": "k",
        "value": "v",
    }
    assert alias_to_role("attention.output.dense") == "o"
    assert alias_to_role("intermediate.dense") == "ffn_in" and alias_to_role("intermediate") == "ffn_in"
    assert alias_to_role("output.dense") == "ffn_out" and alias_to_role("output") == "ffn_out"
    assert alias_to_role("attention_output") == "o"
    assert all(alias_to_role(r) == r for r in ROLES)
    assert set(ALIASES.values()) <= set(ROLES)
    with pytest.raises(ValueError, match="unknown role or alias 'queries'"):
        alias_to_role("queries")
    # on BERT an alias names the module it always named; on Llama the same role
    bert = describe(model("bert"))
    assert [p.path for p in bert.projections("value")] == [
        f"bert.encoder.layer.{i}.attention.self.value" for i in (0, 1)
    ]
    assert [p.path for p in bert.projections("output.dense")] == [
        f"bert.encoder.layer.{i}.output.dense" for i in (0, 1)
    ]
    llama = describe(model("llama"))
    assert [p.path for p in llama.projections("query")] == [f"model.layers.{i}.self_attn.q_proj" for i in (0, 1)]
    # a projection iterates as (path, module)
    path, module = llama.projections("v")[0]
    assert path == "model.layers.0.self_attn.v_proj" and module is llama.blocks[0].module.self_attn.v_proj


def test_linear_like_layers_and_norms():
    assert in_out_features(nn.Linear(3, 5)) == (3, 5)
    assert in_out_features(Conv1D(5, 3)) == (3, 5)  # Conv1D(nf=out, nx=in), weight (in, out)

    class Wrapped(nn.Module):  # what peft's layers look like: the original kept as base_layer
        def __init__(self):
            super().__init__()
            self.base_layer = Conv1D(7, 2)

    assert in_out_features(Wrapped()) == (2, 7) and out_axis(Wrapped()) == 1
    with pytest.raises(ValueError, match="not a linear-like layer"):
        in_out_features(nn.Conv2d(3, 3, 1))

    class ScaleOnly(nn.Module):  # an RMSNorm by its parts, whatever its name
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(4))
            self.variance_epsilon = 1e-6

    assert norm_kind(ScaleOnly()) == "rmsnorm"
    assert norm_kind(nn.RMSNorm(4)) == "rmsnorm"
    assert norm_kind(nn.LayerNorm(4)) == "layernorm" and norm_kind(nn.LayerNorm(4, bias=False)) == "layernorm"
    assert norm_kind(nn.Linear(4, 4)) is None


def test_a_model_on_the_meta_device_is_described_without_running_it():
    with torch.device("meta"):
        m = tf.LlamaForSequenceClassification(tf.LlamaConfig(num_key_value_heads=2, **TEXT, **TOKENS))
    a = describe(m)
    assert a.projections("k")[0].out_features == 16 and a.final_norm.kind == "rmsnorm"


def test_unknown_layouts_say_what_was_not_found():
    class NoBlocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 4))

    with pytest.raises(ValueError, match="no transformer blocks found"):
        describe(NoBlocks())

    m = tf.LlamaForSequenceClassification(tf.LlamaConfig(num_key_value_heads=2, **TEXT, **TOKENS))
    with pytest.raises(ValueError, match="no task head found"):
        describe(m.model)

    for layer in m.model.layers:
        layer.self_attn.o_proj = nn.Identity()
    with pytest.raises(ValueError, match=r"block 0 .*no attention output projection found \(32 -> 32"):
        describe(m)

    m = tf.BertForSequenceClassification(tf.BertConfig(**TEXT))
    for layer in m.bert.encoder.layer:
        layer.attention.self.key = nn.Identity()
    with pytest.raises(ValueError, match="no attention projections found"):
        describe(m)

    m = tf.GPT2ForSequenceClassification(
        tf.GPT2Config(n_embd=D, n_layer=LAYERS, n_head=HEADS, vocab_size=VOCAB, **TOKENS)
    )
    for block in m.transformer.h:
        block.mlp.c_fc = nn.Identity()
    with pytest.raises(ValueError, match="no FFN up projection found"):
        describe(m)
