"""Methods that adapt chosen projections (LoRA, DoRA, VeRA, AdaLoRA, (IA)^3) find them by role on any backbone
harness.anatomy describes: their default targets (`query`, `value`, ... stand for q, v, ...) land on the same
roles of a RoBERTa, a DeBERTa, a DistilBERT or a Llama with grouped-query attention, each declares the count it
trains, and a step trains. A role inside a fused projection (GPT-2's c_attn, Phi-3's qkv_proj) adapts that layer once,
whole, for every role it computes."""

import pytest
import torch

from harness.anatomy import describe
from harness.method import count, registry
from methods._targets import linear_names
from tests.conftest import toy_batch, toy_task
from tests.test_anatomy import ALL

METHODS = ["lora", "dora", "vera", "adalora", "ia3"]
FAMILIES = ["bert", "roberta", "deberta-v2", "distilbert", "gpt2", "llama", "mistral", "phi3"]
pytestmark = pytest.mark.usefixtures("one_thread")


def batch():
    """toy_batch without token_type_ids, which decoders do not take."""
    return {k: v for k, v in toy_batch(toy_task(), n=4, length=10).items() if k != "token_type_ids"}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", METHODS)
def test_targets_are_found_by_role_and_train(name, family):
    task = toy_task()
    torch.manual_seed(0)
    model = ALL[family]()
    model.config.pad_token_id = 0  # the harness's loader sets it for decoders (backbone.load_model)
    method = registry()[name](**({"total_step": 10} if name == "adalora" else {}))
    expected = method.expected_trainable_params(model, task)
    model = method.apply(model, task)
    trained = count(p for p in model.parameters() if p.requires_grad)
    assert trained == expected, (name, family)
    adapted = {n for n, _ in model.named_modules() if n.endswith(("lora_A", "vera_lambda_d", "ia3_l"))}
    assert adapted, "the method adapted some projection"
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    loss = model(**batch()).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)


@pytest.mark.parametrize(
    ("family", "targets", "adapted"),
    [("gpt2", ["q", "v"], ["c_attn"]), ("phi3", ["q", "k", "v", "o"], ["qkv_proj", "o_proj"])],
)
def test_a_fused_projection_is_adapted_once_whole(family, targets, adapted):
    model = ALL[family]()
    names = linear_names(model, targets, "lora")
    assert [n.rpartition(".")[2] for n in names] == adapted * len(describe(model).blocks)
    lora = registry()["lora"](target_modules=targets)
    d, blocks = describe(model).hidden_size, describe(model).blocks
    fused = blocks[0].projection("q")
    expected = sum(8 * (fused.in_features + sum(fused.fused.sizes)) for _ in blocks)
    if "o" in targets:
        expected += sum(8 * (b.projection("o").in_features + d) for b in blocks)
    assert lora.adapter_params(model, toy_task()) == expected
