"""Mechanism tests of WTA-CRS's real-token sampling, VQT's feature normalisation and UniPT's
padding mask and confidence aggregation (issue 12): each checks what the method's docstring
says it does, with expected values worked out independently of the implementation."""

import copy
import math

import pytest
import torch

import methods.wta_crs as wta_crs
from methods.unipt import UniPT
from methods.vqt import VisualQueryTuning
from methods.wta_crs import WTACRS, SampledLinear, sample_rows
from tests.conftest import no_dropout, tiny_bert, toy_task

TASK = toy_task(2)


pytestmark = pytest.mark.usefixtures("one_thread")


def padded_batch(lengths, length, seed=0):
    """Random ids; sequence b has lengths[b] real tokens, then padding (id 0, mask 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(20, 96, (len(lengths), length), generator=g)
    mask = (torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]).long()
    ids[mask == 0] = 0
    labels = torch.randint(0, 2, (len(lengths),), generator=g)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids), "labels": labels}


# a quarter of the tokens are real, as in the measurement
HEAVY = padded_batch([8] * 4 + [4, 12, 6, 10], 32)


def relative(estimate, exact):
    return ((estimate - exact).norm() / exact.norm()).item()


# ------------------------------------------------------------------ WTA-CRS


def test_padding_rows_get_exactly_zero_output_gradient():
    """Why leaving padding out keeps the estimate unbiased: no gradient reaches a padding row."""
    model = tiny_bert(TASK)
    seen = []
    for name, module in model.named_modules():
        if name.endswith(("attention.output.dense", "intermediate.dense", "output.dense")):
            module.register_full_backward_hook(lambda m, gin, gout: seen.append(gout[0].detach()))
    model.train()
    model(**HEAVY).loss.backward()
    padding = HEAVY["attention_mask"] == 0
    assert len(seen) == 6
    for g in seen:
        assert g[padding].abs().max() == 0, "padding rows' output gradient is exactly zero"
        assert g[~padding].abs().max() > 0


def record_samples(monkeypatch):
    """Every call of sample_rows from the sampled layers: (k asked for, rows allowed, rows kept)."""
    calls = []
    original = sample_rows

    def recording(x2d, k, valid=None):
        index, scale = original(x2d, k, valid)
        calls.append((k, valid, index))
        return index, scale

    monkeypatch.setattr(wta_crs, "sample_rows", recording)
    return calls


def test_wta_crs_keeps_a_ratio_of_the_real_rows_and_never_padding(monkeypatch):
    calls = record_samples(monkeypatch)
    batch = padded_batch([24, 12, 6, 3], 24)  # 45 real tokens of 96
    model = WTACRS(ratio=0.3).apply(tiny_bert(TASK), TASK)
    model.train()
    model(**batch).loss.backward()
    assert len(calls) == 6, "attention output, intermediate and output dense of both layers"
    real = batch["attention_mask"].reshape(-1).bool()
    for k, valid, index in calls:
        assert k == math.floor(0.3 * 45) == 13, "k = int(ratio * real rows)"
        assert torch.equal(valid, real), "the batch's attention mask reached the layer"
        assert index.numel() == 13, "k rows saved for backward"
        assert real[index].all(), "no padding row is ever kept"


def test_wta_crs_keeps_every_real_row_when_k_covers_them():
    x = torch.randn(2, 10, 8)
    valid = torch.zeros(2, 10, dtype=torch.bool)
    valid[0, :3] = valid[1, :1] = True
    index, scale = sample_rows(x.reshape(-1, 8), 5, valid.reshape(-1))
    assert sorted(index.tolist()) == [0, 1, 2, 10] and torch.equal(scale, torch.ones(4))


def test_wta_crs_samples_every_row_without_a_mask():
    """A forward without an attention mask (or a Linear outside a masked model) samples among all rows."""
    layer = WTACRS(ratio=0.5, skip=[]).apply(torch.nn.Sequential(torch.nn.Linear(8, 8)), TASK)
    x = torch.randn(2, 10, 8, requires_grad=True)
    captured = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: captured.append(t) or t, lambda t: t):
        layer(x).sum().backward()
    assert any(t.dtype == torch.int64 and t.numel() == 10 for t in captured), "k = int(0.5 * 20) rows"


@pytest.mark.parametrize("layer", ["intermediate.dense", "attention.output.dense"])
def test_wta_crs_estimate_is_unbiased_on_a_heavily_padded_batch(layer):
    """A real layer's input and output gradient on a batch of 25% real tokens, through the sampled op."""
    torch.manual_seed(0)
    model = no_dropout(tiny_bert(TASK))
    linear = model.get_submodule(f"bert.encoder.layer.0.{layer}")
    seen = {}
    linear.register_forward_hook(lambda m, inputs, out: seen.update(x=inputs[0].detach()))
    linear.register_full_backward_hook(lambda m, gin, gout: seen.update(g=gout[0].detach()))
    model.train()
    model(**HEAVY).loss.backward()
    x, g, real = seen["x"], seen["g"], HEAVY["attention_mask"].bool()
    exact = linear.weight.grad
    assert torch.allclose(exact, g.flatten(0, 1).t() @ x.flatten(0, 1), atol=1e-6)
    weight = linear.weight.detach().clone().requires_grad_(True)
    draws, total, squared = 2000, torch.zeros_like(exact), 0.0
    for _ in range(draws):
        (estimate,) = torch.autograd.grad(SampledLinear.apply(x, weight, None, 0.3, real), weight, g)
        total += estimate
        squared += relative(estimate, exact) ** 2
    noise = math.sqrt(squared / draws / draws)  # the error an unbiased mean of `draws` estimates has
    assert math.sqrt(squared / draws) > 0.5, "one estimate is noisy: it really samples"
    assert relative(total / draws, exact) < min(0.1, 1.3 * noise), "the mean converges to the exact gradient"


def mean_error(x, g, k, valid, draws=300):
    exact = g.t() @ x
    total = 0.0
    for _ in range(draws):
        index, scale = sample_rows(x, k, valid)
        total += relative(g[index].t() @ (x[index] * scale[:, None]), exact)
    return total / draws


def test_real_token_sampling_error_is_far_below_sampling_among_all_rows():
    """With 25% real tokens: sampling all rows spends three draws in four on padding (zero gradient)."""
    torch.manual_seed(0)
    real = HEAVY["attention_mask"].reshape(-1).bool()  # 64 of 256 rows
    x = torch.randn(256, 16) * (0.5 + torch.rand(256, 1))
    g = torch.randn(256, 6) * real[:, None]  # what a padded batch's output gradient looks like
    k_all, k_real = int(0.3 * 256), int(0.3 * 64)
    all_rows = mean_error(x, g, k_all, None)  # the former behaviour at ratio 0.3: 76 rows kept
    assert all_rows > 1.0
    # at the former memory (76 rows) every real row fits: the gradient is exact, to the rounding of a
    # sum taken over other rows in another order
    assert mean_error(x, g, k_all, real, draws=3) < 1e-6
    # at equal memory (19 rows each), real-token sampling has half the error (a quarter of the variance)
    assert mean_error(x, g, k_real, real) < 0.6 * mean_error(x, g, k_real, None)
    # at ratio 0.3 of real rows it keeps a quarter of the rows for no more error than 76 rows over all
    assert mean_error(x, g, k_real, real) < 1.15 * all_rows


def test_wta_crs_mask_travels_with_a_deep_copy():
    model = WTACRS().apply(tiny_bert(TASK), TASK)
    twin = copy.deepcopy(model)
    twin.train()
    twin(**HEAVY)
    layer = lambda m: m.bert.encoder.layer[0].intermediate.dense
    assert torch.equal(layer(twin).wta_crs_valid, HEAVY["attention_mask"].bool())
    assert layer(model).wta_crs_valid is None, "the original's layers are not the copy's"


def test_wta_crs_declares_what_is_trainable_when_applied_and_changes_none_of_it():
    """It adds and freezes nothing (the contract test checks apply against this declaration), so after a
    method that froze the embeddings it declares exactly what that method left trainable."""
    model = tiny_bert(TASK)
    frozen = model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    declared = WTACRS(skip=[]).expected_trainable_params(model, TASK)
    assert declared == sum(p.numel() for p in model.parameters()) - frozen.numel()
    model = WTACRS(skip=[]).apply(model, TASK)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == declared
    assert WTACRS.activations_depend_on_values, "saved bytes follow the mask: the meter counts every step"


def test_sampled_linear_ignores_a_mask_of_another_shape():
    x = torch.randn(1, 20, 4)
    weight = torch.randn(3, 4, requires_grad=True)
    out = SampledLinear.apply(x, weight, None, 1.0, torch.ones(2, 7, dtype=torch.bool))
    (grad,) = torch.autograd.grad(out.sum(), weight)
    assert torch.allclose(grad, torch.ones(1, 20, 3).reshape(-1, 3).t() @ x.reshape(-1, 4), atol=1e-5)


# ------------------------------------------------------------------ VQT


def test_vqt_head_reads_one_unit_vector_per_feature_group():
    hidden, layers, queries = 64, 2, 3
    model = VisualQueryTuning(num_queries=queries).apply(tiny_bert(TASK), TASK)
    seen = []
    model.head.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    model.eval()
    model(**HEAVY)
    features = seen[0]
    assert features.shape == (8, hidden + layers * queries * hidden)
    cls, per_layer = features[:, :hidden], features[:, hidden:].reshape(8, layers, queries * hidden)
    assert torch.allclose(cls.norm(dim=-1), torch.ones(8), atol=1e-5), "[CLS] state L2-normalised"
    assert torch.allclose(per_layer.norm(dim=-1), torch.ones(8, layers), atol=1e-5), "each layer's queries, together"
    per_query = per_layer.reshape(8, layers, queries, hidden).norm(dim=-1)
    assert not torch.allclose(per_query, torch.ones_like(per_query), atol=1e-2), "one norm per layer, not per query"
    assert torch.allclose(features.norm(dim=-1), torch.full((8,), math.sqrt(1 + layers)), atol=1e-5)


def test_vqt_normalisation_can_be_turned_off():
    model = VisualQueryTuning(normalize_features=False).apply(tiny_bert(TASK), TASK)
    seen = []
    model.head.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    model.eval()
    model(**HEAVY)
    cls = seen[0][:, :64]
    assert cls.norm(dim=-1).min() > 2, "the raw LayerNorm output (norm about sqrt(width)) reaches the head"


# ------------------------------------------------------------------ UniPT


def unipt(pooling="cls", seed=0):
    torch.manual_seed(seed)
    model = UniPT(pooling=pooling).apply(no_dropout(tiny_bert(TASK, seed=seed)), TASK)
    return model.eval()


def with_garbage_at_padding(hidden_states, mask, seed):
    g = torch.Generator().manual_seed(seed)
    padding = (mask == 0)[..., None]
    return [torch.where(padding, torch.randn(h.shape, generator=g) * 5, h) for h in hidden_states]


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_unipt_padding_never_reaches_the_logits(pooling):
    model = unipt(pooling)
    mask = HEAVY["attention_mask"]
    states = model.frozen_features({"input_ids": HEAVY["input_ids"], "attention_mask": mask})
    with torch.no_grad():
        logits = model.trainable_path(states, mask)
        for seed in (1, 2):
            other = model.trainable_path(with_garbage_at_padding(states, mask, seed), mask)
            assert torch.allclose(logits, other, atol=1e-6), "hidden states at padding change nothing"
        # the test can fail: unmasked, the same garbage moves the logits
        unmasked = torch.ones_like(mask)
        assert not torch.allclose(
            model.trainable_path(states, unmasked),
            model.trainable_path(with_garbage_at_padding(states, mask, 1), unmasked),
            atol=1e-3,
        )
    # end to end: other token ids at the padded positions
    ids = HEAVY["input_ids"].clone()
    ids[mask == 0] = torch.randint(20, 96, (int((mask == 0).sum()),), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(model(**{**HEAVY, "input_ids": ids}).logits, model(**HEAVY).logits, atol=1e-5)


def test_unipt_interaction_weights_cover_real_tokens_only():
    torch.manual_seed(0)
    mask = HEAVY["attention_mask"]
    weights_of = UniPT().apply(tiny_bert(TASK), TASK).interaction_weights
    anchor, x = torch.rand(8, 32, 16), torch.rand(8, 32, 16)  # positive: every real key gets some weight
    weights = weights_of(anchor, x, mask)
    assert weights.shape == (8, 32, 32)
    assert (weights[(mask == 0)[:, None, :].expand(-1, 32, -1)] == 0).all(), "no weight on a padding key"
    assert torch.allclose(weights.sum(-1), torch.ones(8, 32), atol=1e-4), "L1-normalised over the real keys"
    anchor, x = torch.randn(8, 32, 16), torch.randn(8, 32, 16)
    weights = weights_of(anchor, x, mask)
    for i in range(4):
        expected = torch.relu(anchor[0, i] @ x[0, :8].t())  # sequence 0 has 8 real tokens
        assert torch.allclose(weights[0, i, :8], expected / (expected.sum() + 1e-6), atol=1e-5), "relu(<a_i, x_j>)"


def test_unipt_confidences_follow_the_papers_formula():
    model = unipt()
    mask = HEAVY["attention_mask"]
    states = model.frozen_features({"input_ids": HEAVY["input_ids"], "attention_mask": mask})
    with torch.no_grad():
        xs = [down(h) for down, h in zip(model.down, states)]
        confidence = model.layer_confidences(xs[-1], xs[:-1], mask)
        assert confidence.shape == (8, len(states) - 1)
        assert torch.allclose(confidence.sum(1), torch.ones(8), atol=1e-6)
        w = model.gate.weight[0]
        for row in range(8):
            n = int(mask[row].sum())
            mean = lambda x, row=row, n=n: x[row, :n].sum(0) / n  # mean over the real tokens only
            scores = torch.stack([(mean(xs[-1]) * mean(x) * w).sum() for x in xs[:-1]])
            assert torch.allclose(confidence[row], torch.exp(scores) / torch.exp(scores).sum(), atol=1e-5)


def test_unipt_aggregation_weighs_layers_by_their_confidence(monkeypatch):
    model = unipt()
    mask = HEAVY["attention_mask"]
    states = model.frozen_features({"input_ids": HEAVY["input_ids"], "attention_mask": mask})
    lower = len(states) - 1
    g = torch.Generator().manual_seed(1)
    noisy = [torch.randn(h.shape, generator=g) if i not in (0, lower) else h for i, h in enumerate(states)]
    with torch.no_grad():
        # all the confidence on layer 0: the other lower layers' states change nothing
        one_hot = torch.zeros(8, lower)
        one_hot[:, 0] = 1
        monkeypatch.setattr(model, "layer_confidences", lambda *args: one_hot)
        assert torch.allclose(model.trainable_path(states, mask), model.trainable_path(noisy, mask), atol=1e-6)
        # spread evenly, they do
        monkeypatch.setattr(model, "layer_confidences", lambda *args: torch.full((8, lower), 1 / lower))
        assert not torch.allclose(model.trainable_path(states, mask), model.trainable_path(noisy, mask), atol=1e-3)
    monkeypatch.undo()
    # and the real confidences are used: the gate, which feeds nothing else, gets a gradient
    model.train()
    model(**HEAVY).loss.backward()
    assert model.gate.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------ which side networks keep length x length maps


@pytest.mark.parametrize("name, quadratic", [("lst", True), ("unipt", True), ("sherl", True), ("vqt", False)])
def test_which_side_networks_save_length_by_length_maps(name, quadratic):
    """The README's claim: LST's side attention, UniPT's interaction and SHERL's late layer keep
    length x length maps for backward; VQT's queries attend to the tokens, so it keeps none."""
    from harness.method import registry

    length = 37  # no other dimension of the tiny model or the batch is 37
    batch = padded_batch([length] * 4, length)
    model = registry()[name]().apply(tiny_bert(TASK), TASK)
    model.train()
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        model(**batch).loss.backward()
    square = [s for s in shapes if list(s).count(length) >= 2]
    assert bool(square) == quadratic, f"{name}: saved tensors with two length axes: {square}"
