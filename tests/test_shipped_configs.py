"""The configs in harness/backbones are the models they say they are: each real model, built from its config on
the meta device (no memory, no weights), has the parameter count published for it, and every folder has its row
in harness/backbones/README.md."""

import re
import warnings

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
)

from harness.backbone import SHIPPED, shipped

# Published parameter counts, of the model class the hub repo's weights are for (a causal LM with its head; the
# base model for the encoders; ViT with its 1000-class ImageNet head).
PUBLISHED = {
    "llama-3.2-1b": (AutoModelForCausalLM, 1_235_814_400),
    "llama-3.2-3b": (AutoModelForCausalLM, 3_212_749_824),
    "llama-3.1-8b": (AutoModelForCausalLM, 8_030_261_248),
    "qwen2.5-0.5b": (AutoModelForCausalLM, 494_032_768),
    "qwen2.5-7b": (AutoModelForCausalLM, 7_615_616_512),
    "mistral-7b": (AutoModelForCausalLM, 7_241_732_096),
    "gpt2": (AutoModelForCausalLM, 124_439_808),
    "roberta-large": (AutoModel, 355_359_744),
    "vit-base-patch16-224": (AutoModelForImageClassification, 86_567_656),
}
TINY = ("vit-tiny", "llama-tiny", "gpt2-tiny")  # defined here, no published count


def build(name: str, auto, **settings):
    """The model of a shipped config, on the meta device: every module and shape, no weights."""
    config = AutoConfig.from_pretrained(SHIPPED / name, **settings)
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        return auto.from_config(config)


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # tied weights once


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_a_shipped_model_has_its_published_parameter_count(name):
    auto, published = PUBLISHED[name]
    settings = {"num_labels": 1000} if auto is AutoModelForImageClassification else {}
    assert count(build(name, auto, **settings)) == published


def test_deberta_v3_large_has_its_model_cards_304m_backbone_and_131m_embedding_parameters():
    # The card: "304M backbone parameters with a vocabulary containing 128K tokens which introduces 131M parameters
    # in the Embedding layer". DebertaV2Model measures 434,012,160: 131,176,448 in the embeddings (128,100 x 1024
    # plus their LayerNorm) and 302,835,712 after them; the card's 304M also counts the 1024 x 1024 pooler of a
    # classification head (1,049,600).
    base = build("deberta-v3-large", AutoModel)
    embeddings = count(base.embeddings)
    assert count(base) == 434_012_160
    assert round(embeddings / 1e6) == 131
    classifier = build("deberta-v3-large", AutoModelForSequenceClassification, num_labels=2)
    backbone = count(classifier.deberta) - count(classifier.deberta.embeddings) + count(classifier.pooler)
    assert round(backbone / 1e6) == 304


def test_every_shipped_config_is_counted_here_or_defined_here():
    assert set(shipped()) == set(PUBLISHED) | {"deberta-v3-large"} | set(TINY)


def test_every_shipped_config_has_a_readme_row():
    readme = (SHIPPED / "README.md").read_text()
    rows = set(re.findall(r"^\| `([^`]+)` \|", readme, re.M))
    assert set(shipped()) <= rows, f"no README row for {sorted(set(shipped()) - rows)}"
    assert rows <= set(shipped()), f"README rows without a folder: {sorted(rows - set(shipped()))}"
