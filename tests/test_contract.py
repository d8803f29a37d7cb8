"""The contract every registered method must keep. A new method gets this
coverage by existing: it trains a few steps on a tiny random BERT, its loss
falls, the weights it freezes stay bit-identical, and it trains exactly the
number of parameters it declares."""

import pytest
import torch

from harness.method import FAMILIES, registry
from tests.conftest import tiny_bert, toy_batch, toy_task

METHODS = sorted(registry())
STEPS = 40


def loss_on(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch).loss.item()


@pytest.mark.parametrize("num_labels", [2, 1], ids=["classification", "regression"])
@pytest.mark.parametrize("name", METHODS)
def test_method_contract(name, num_labels):
    cls = registry()[name]
    assert cls.family in FAMILIES and cls.description and cls.paper, "family, description and paper are declared"
    task = toy_task(num_labels)
    model = tiny_bert(task)
    method = cls()
    declared = method.expected_trainable_params(model, task)
    originals = {id(p): (p, p.detach().clone()) for p in model.parameters()}

    model = method.apply(model, task)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == declared, "trains exactly what it declares"
    frozen = [(p, copy) for p, copy in originals.values() if not p.requires_grad]

    batch = toy_batch(task)
    out = model(**batch)
    assert out.logits.shape == (len(batch["labels"]), num_labels)
    before = loss_on(model, batch)
    optimizer = torch.optim.AdamW(method.param_groups(model, cls.default_lr * 3))
    for _ in range(STEPS):
        model.train()
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    after = loss_on(model, batch)
    assert after < 0.95 * before, f"loss fell from {before:.4f} to {after:.4f}"
    for p, copy in frozen:
        assert torch.equal(p, copy), "a frozen weight changed"
