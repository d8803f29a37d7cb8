"""The architecture families every method is held to, each as a tiny model built from its config class.

These are the families the methods table's "families" column and the method x family contract test
(tests/test_families.py) range over: BERT, RoBERTa, DeBERTa-v2/v3, DistilBERT, GPT-2, Llama (grouped-query
attention, RMSNorm, rotary) and ViT. Each builder makes a random model with a task head; under
`torch.device("meta")` it costs nothing, which is how `supported` asks every method about every family without
building weights. Other members of these families (ELECTRA, Mistral, Qwen2, Phi-3, ...) need no entry:
harness.anatomy finds their layout from the model.
"""

import torch
import transformers as tf

from harness.anatomy import Anatomy, describe

TEXT_FAMILIES = ("bert", "roberta", "deberta-v2", "deberta-v3", "distilbert", "gpt2", "llama")
IMAGE_FAMILIES = ("vit",)

D, FFN, HEADS, LAYERS, VOCAB = 32, 64, 4, 2, 100
_TEXT = dict(
    hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FFN, vocab_size=VOCAB
)
_TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _deberta_v3():
    # v3's layout: relative attention with log buckets, a LayerNorm on the relative embeddings (in the encoder,
    # after the blocks, but no final norm), and (share_att_key off) two more projections beside q, k, v
    config = tf.DebertaV2Config(
        relative_attention=True,
        position_buckets=16,
        norm_rel_ebd="layer_norm",
        share_att_key=False,
        pos_att_type=["p2c", "c2p"],
        **_TEXT,
    )
    return tf.DebertaV2ForSequenceClassification(config)


BUILDERS = {
    "bert": lambda: tf.BertForSequenceClassification(tf.BertConfig(**_TEXT)),
    "roberta": lambda: tf.RobertaForSequenceClassification(tf.RobertaConfig(**_TEXT, **_TOKENS)),
    "deberta-v2": lambda: tf.DebertaV2ForSequenceClassification(tf.DebertaV2Config(**_TEXT)),
    "deberta-v3": _deberta_v3,
    "distilbert": lambda: tf.DistilBertForSequenceClassification(
        tf.DistilBertConfig(dim=D, n_layers=LAYERS, n_heads=HEADS, hidden_dim=FFN, vocab_size=VOCAB)
    ),
    "gpt2": lambda: tf.GPT2ForSequenceClassification(
        tf.GPT2Config(n_embd=D, n_layer=LAYERS, n_head=HEADS, n_inner=FFN, vocab_size=VOCAB, **_TOKENS)
    ),
    # heads of 16 dimensions, wider than hidden / heads (as Gemma's and Qwen3's are), so q and o are not square
    "llama": lambda: tf.LlamaForSequenceClassification(
        tf.LlamaConfig(num_key_value_heads=2, head_dim=16, **_TEXT, **_TOKENS)
    ),
    "vit": lambda: tf.ViTForImageClassification(
        tf.ViTConfig(
            image_size=32,
            patch_size=8,
            hidden_size=D,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            intermediate_size=FFN,
        )
    ),
}

_ANATOMIES: dict[str, Anatomy] = {}


def anatomy(family: str) -> Anatomy:
    """The family's anatomy, described once per process on a meta-device model."""
    if family not in _ANATOMIES:
        with torch.device("meta"):
            _ANATOMIES[family] = describe(BUILDERS[family]())
    return _ANATOMIES[family]


def unsupported(method) -> dict[str, str]:
    """family -> why `method` (an instance) cannot run on it, for the families it refuses."""
    reasons = {family: method.unsupported(anatomy(family)) for family in BUILDERS}
    return {family: reason for family, reason in reasons.items() if reason is not None}
