"""The contract every registered method must keep. A new method gets this
coverage by existing: it trains a few steps on a tiny random BERT, its loss
falls, the weights it freezes stay bit-identical, and it trains exactly the
number of parameters it declares."""

import gc
import weakref

import pytest
import torch

from harness.meter import SavedTensorCounter
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


@pytest.mark.parametrize("name", METHODS)
def test_every_trainable_parameter_gets_a_gradient(name):
    """Within a few steps every trainable tensor receives a non-zero gradient: a detached ladder,
    a gate that is never read or a head the loss does not reach would train nothing."""
    cls = registry()[name]
    task = toy_task()
    model = cls().apply(tiny_bert(task), task)
    batch = toy_batch(task)
    optimizer = torch.optim.AdamW(cls().param_groups(model, cls.default_lr))
    reached = {n: False for n, p in model.named_parameters() if p.requires_grad}
    model.train()
    for _ in range(3):  # zero-initialised factors (LoRA's B, VeRA's b) pass gradient on after one step
        optimizer.zero_grad()
        model(**batch).loss.backward()
        for n, p in model.named_parameters():
            if p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0:
                reached[n] = True
        optimizer.step()
    missed = sorted(n for n, ok in reached.items() if not ok)
    assert not missed, f"no gradient reached {missed}"


@pytest.mark.parametrize("name", METHODS)
def test_nothing_saved_for_backward_outlives_it(name):
    """Every tensor autograd saved during a forward is freed by its backward, while the loss (and so
    the graph) is still referenced, as in the training loop. A tensor kept alive from elsewhere (a
    custom op's ctx, a cache) would sit in memory through the next step, unseen by the meter."""
    cls = registry()[name]
    task = toy_task()
    model = cls().apply(tiny_bert(task), task)
    batch = toy_batch(task)
    model.train()
    model(**batch).loss.backward()  # state a method builds on its first step (VeLoRA's projection) is state
    gc.collect()
    kept = {id(t) for t in gc.get_objects() if torch.is_tensor(t)}  # what lived before: weights, batch, state
    saved = []

    def pack(t):
        if id(t) not in kept:
            saved.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    assert saved, "a training forward saves something"
    loss.backward()
    gc.collect()
    alive = [ref() for ref in saved if ref() is not None]
    assert not alive, f"{len(alive)} saved tensors outlived backward: {[tuple(t.shape) for t in alive][:5]}"
    del loss


@pytest.mark.parametrize("name", METHODS)
def test_saved_bytes_follow_the_shapes_unless_declared(name):
    """The meter counts each batch shape once unless a method declares that its saved bytes follow the
    values: two batches of one shape that differ in padding must then save the same bytes."""
    cls = registry()[name]
    task = toy_task()
    model = cls().apply(tiny_bert(task), task)
    model.train()
    counts = []
    for padded in (0, 0, 7):  # the first step may differ (VeLoRA initialises from its first batch)
        batch = toy_batch(task, n=8, length=16)
        batch["attention_mask"][:, 16 - padded :] = 0
        counter = SavedTensorCounter(model)
        with counter:
            model(**batch).loss.backward()
        counts.append(counter.last)
    counts = counts[1:]
    if counts[0] != counts[1]:
        assert cls.activations_depend_on_values, f"saved {counts} bytes for two batches of one shape, undeclared"
