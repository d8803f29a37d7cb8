"""Mechanism tests for the side and parallel networks (LST, UniPT, SHERL, VQT).

What each must prove, on tiny random BERTs:
- the backbone's part of the forward keeps no graph: the bytes saved for
  backward by a whole forward+backward equal those of the trainable path
  alone fed the same frozen features, even when embedding weights are made to
  require grad (which would pull the whole backbone into the graph if it were
  not run under no_grad), and the counter does see a backbone graph when one
  is built;
- the backbone's weights get no gradient and stay bit-identical;
- each method's own mechanism (pruned initialisation, anti-redundancy,
  queries reading frozen keys and values, saved bytes linear in queries and
  in sequence length).
"""

from dataclasses import replace

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from harness.anatomy import describe
from harness.families import BUILDERS
from harness.meter import SavedTensorCounter
from harness.method import count, registry
from methods._attention import QueryRows, rows_mask
from methods._frozen import classification_loss, frozen_states
from methods.sherl import AntiRedundancyAggregation
from tests.conftest import toy_batch, toy_task

SIDE_METHODS = ["lst", "unipt", "sherl", "vqt"]


def deeper_bert(task, layers: int = 3, seed: int = 0):
    """Like conftest's tiny BERT but with 3 layers, so SHERL has more than one early layer to consolidate."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=96,
        hidden_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
        num_labels=task.num_labels,
        problem_type="single_label_classification",
    )
    return BertForSequenceClassification(config)


def applied(name, model=None, task=None, **hparams):
    task = task or toy_task(2)
    model = model or deeper_bert(task)
    return registry()[name](**hparams).apply(model, task), task


def saved_bytes(model, fn) -> int:
    counter = SavedTensorCounter(model)
    with counter:
        fn().backward()
    return counter.last


def split_batch(batch):
    return batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]


def test_frozen_hidden_states_are_the_models_own():
    task = toy_task(2)
    model = deeper_bert(task).eval()
    batch = toy_batch(task)
    ours = frozen_states(describe(model), batch).hidden
    theirs = model.base_model(
        **{k: v for k, v in batch.items() if k != "labels"}, output_hidden_states=True
    ).hidden_states
    assert len(ours) == len(theirs) == 4
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)
    assert not any(h.requires_grad for h in ours)


@pytest.mark.parametrize("unfreeze_embeddings", [False, True], ids=["as-applied", "embeddings-require-grad"])
@pytest.mark.parametrize("name", SIDE_METHODS)
def test_backbone_saves_nothing_for_backward(name, unfreeze_embeddings):
    torch.manual_seed(0)
    wrapped, task = applied(name)
    embeddings = wrapped.model.base_model.embeddings
    if unfreeze_embeddings:  # were the backbone not under no_grad, its whole forward would now join the graph
        for p in embeddings.parameters():
            p.requires_grad_(True)
    batch = toy_batch(task)
    ids, mask, types = split_batch(batch)
    wrapped.train()

    whole = saved_bytes(wrapped, lambda: wrapped(**batch).loss)
    features = wrapped.frozen_features(batch)
    loss = lambda: classification_loss(wrapped.trainable_path(features, mask), batch["labels"], wrapped.config)
    side_only = saved_bytes(wrapped, loss)
    assert whole > 0
    assert whole == side_only, "the backbone's forward saved tensors for backward"
    assert all(p.grad is None for p in embeddings.parameters())
    if unfreeze_embeddings:  # control: the counter does see a backbone graph when one is built
        backbone_graph = lambda: wrapped.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state.sum()
        assert saved_bytes(wrapped, backbone_graph) > whole


@pytest.mark.parametrize(
    "name,hparams",
    [
        ("lst", {}),
        ("lst", {"init": "random"}),
        ("unipt", {}),
        ("sherl", {}),
        ("sherl", {"train_late_layers": True}),
        ("vqt", {"num_queries": 2}),
    ],
    ids=["lst", "lst-random", "unipt", "sherl", "sherl-tuned-late", "vqt"],
)
def test_backbone_gets_no_gradient_and_stays_bit_identical(name, hparams):
    task = toy_task(2)
    model = deeper_bert(task)
    backbone = dict(model.base_model.named_parameters())
    before = {n: p.detach().clone() for n, p in backbone.items()}
    wrapped, _ = applied(name, model, task, **hparams)
    tuned_late = {f"encoder.layer.{len(describe(model).blocks) - 1}."} if hparams.get("train_late_layers") else set()
    is_tuned = lambda n: any(n.startswith(prefix) for prefix in tuned_late)

    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
    batch = toy_batch(task)
    wrapped.train()
    for _ in range(3):
        optimizer.zero_grad(set_to_none=True)
        wrapped(**batch).loss.backward()
        for n, p in backbone.items():
            assert (p.grad is not None) == is_tuned(n), f"{n}: gradient {'missing' if is_tuned(n) else 'present'}"
        optimizer.step()
    for n, p in backbone.items():
        assert torch.equal(p, before[n]) == (not is_tuned(n)), f"{n}: {'not trained' if is_tuned(n) else 'changed'}"


def test_lst_prune_init_slices_the_backbone_by_magnitude():
    task = toy_task(2)
    model = deeper_bert(task)
    with torch.no_grad():
        model.base_model.embeddings.word_embeddings.weight[:, 5] *= 100  # residual dimension 5 must be kept
        model.base_model.encoder.layer[0].intermediate.dense.weight[7] *= 100  # and feed-forward unit 7 of layer 0
    wrapped, _ = applied("lst", model, task, drop_layers=[])  # every layer, so layer 0 has a side layer
    kept = wrapped.pruned
    assert 5 in kept["hidden"].tolist() and 7 in kept["feed_forward"][0].tolist()
    assert len(kept["hidden"]) == 64 // 8
    heads, per_head = 4, 16
    for inner in kept["attention"]:  # the same number of dimensions kept in every head
        assert (inner // per_head).bincount(minlength=heads).tolist() == [len(inner) // heads] * heads
    big, small = model.base_model.encoder.layer[1], wrapped.side_layers[1]
    rows, cols = kept["attention"][1], kept["hidden"]
    assert torch.equal(small.attention.self.key.weight, big.attention.self.key.weight[rows][:, cols])
    assert torch.equal(small.output.dense.weight, big.output.dense.weight[cols][:, kept["feed_forward"][1]])
    assert torch.equal(small.output.LayerNorm.bias, big.output.LayerNorm.bias[cols])


def test_lst_gates_mix_side_and_ladder():
    """mu -> 1 closes every ladder after the first: later backbone layers no longer reach the output."""
    torch.manual_seed(0)
    wrapped, task = applied("lst")
    wrapped.eval()
    batch = toy_batch(task)
    mask = batch["attention_mask"]
    states = wrapped.frozen_features(batch)
    changed = replace(states, hidden=states.hidden[:1] + [h + torch.randn_like(h) for h in states.hidden[1:]])
    with torch.no_grad():
        open_ = wrapped.trainable_path(states, mask), wrapped.trainable_path(changed, mask)
        wrapped.gate_logits.fill_(100.0)
        closed = wrapped.trainable_path(states, mask), wrapped.trainable_path(changed, mask)
    assert not torch.allclose(*open_)
    torch.testing.assert_close(*closed)


def test_sherl_aggregation_ignores_duplicated_layers():
    """Anti-redundancy: repeating a shallow layer's features does not give that layer more weight."""
    torch.manual_seed(0)
    aggregate = AntiRedundancyAggregation(hidden=16, width=4).eval()
    with torch.no_grad():
        aggregate.score.weight.fill_(1.0)
        aggregate.score.bias.fill_(1.0)  # positive scores, so relu keeps every layer
    a = torch.tensor([[[1.0, 2.0, 0.0, 0.0]]])
    b = torch.tensor([[[0.0, 0.0, 3.0, 1.0]]])  # orthogonal to a: they share no redundancy
    deep = torch.tensor([[[0.5, 0.5, 0.5, 0.5]]])
    once = aggregate(torch.cat([a, b], dim=1), deep)
    twice = aggregate(torch.cat([a, a, b], dim=1), deep)
    torch.testing.assert_close(once, twice)
    # without the redundancy discount, the duplicate would shift the result
    plain = lambda x: (
        torch.relu(aggregate.score(x * deep)) / torch.relu(aggregate.score(x * deep)).sum(1, keepdim=True) * x
    ).sum(1)
    assert not torch.allclose(plain(torch.cat([a, b], 1)), plain(torch.cat([a, a, b], 1)))


def test_vqt_query_equal_to_a_token_reproduces_that_tokens_layer_output():
    """A query that equals token j's layer input, reading the frozen keys and values, is token j's layer output."""
    task = toy_task(2)
    model = deeper_bert(task).eval()
    wrapped, _ = applied("vqt", model, task)
    wrapped.eval()
    batch = toy_batch(task)
    mask = batch["attention_mask"]
    anatomy = describe(model)
    states = frozen_states(anatomy, batch).hidden
    _, keys_values = wrapped.frozen_features(batch)
    for block, (keys, values), h_in, h_out in zip(anatomy.blocks, keys_values, states[:-1], states[1:]):
        with torch.no_grad():
            out = QueryRows(anatomy, block)(h_in[:, 2:4], keys, values, rows_mask(mask, 2))
        torch.testing.assert_close(out, h_out[:, 2:4], atol=1e-5, rtol=1e-4)


def _vqt_saved(num_queries: int, length: int) -> int:
    torch.manual_seed(0)
    wrapped, task = applied("vqt", num_queries=num_queries)
    wrapped.train()
    batch = toy_batch(task, length=length)
    return saved_bytes(wrapped, lambda: wrapped(**batch).loss)


def _full_saved(length: int) -> int:
    task = toy_task(2)
    model = deeper_bert(task)
    model.train()
    batch = toy_batch(task, length=length)
    return saved_bytes(model, lambda: model(**batch).loss)


def test_vqt_saved_bytes_grow_linearly_with_queries_and_length():
    by_queries = [_vqt_saved(t, 12) for t in (1, 2, 3, 4)]
    steps = [b - a for a, b in zip(by_queries, by_queries[1:])]
    assert steps[0] > 0 and len(set(steps)) == 1, f"not linear in the number of queries: {by_queries}"

    # in sequence length: linear for VQT (no length x length map is saved), quadratic for full fine-tuning
    vqt = [_vqt_saved(2, n) for n in (12, 24, 36)]
    full = [_full_saved(n) for n in (12, 24, 36)]
    assert vqt[2] - 2 * vqt[1] + vqt[0] == 0, f"VQT saved bytes not linear in length: {vqt}"
    assert full[2] - 2 * full[1] + full[0] > 0, "full fine-tuning should save length x length attention maps"
    assert vqt[0] < full[0] / 4


def test_lst_dropped_layers_have_no_ladder():
    torch.manual_seed(0)
    wrapped, task = applied("lst", drop_layers=[0])
    wrapped.eval()
    assert len(wrapped.side_layers) == 2 and len(wrapped.ladders) == 3
    batch = toy_batch(task)
    mask = batch["attention_mask"]
    states = wrapped.frozen_features(batch)
    shifted = lambda k: replace(
        states, hidden=[h + torch.randn_like(h) if i == k else h for i, h in enumerate(states.hidden)]
    )
    with torch.no_grad():
        base = wrapped.trainable_path(states, mask)
        torch.testing.assert_close(wrapped.trainable_path(shifted(1), mask), base)  # layer 0's output: dropped
        assert not torch.allclose(wrapped.trainable_path(shifted(2), mask), base)


@pytest.mark.parametrize(
    "layers, kept", [(1, [0]), (3, [1, 2]), (6, [1, 2, 3, 5]), (12, [1, 2, 3, 5, 6, 7, 9, 10, 11])]
)
def test_lst_drops_every_fourth_layer_by_default(layers, kept):
    """The authors' GLUE script keeps side layers [1,2,3,5,6,7,9,10,11] of T5-base's 12."""
    task = toy_task(2)
    method = registry()["lst"]()
    wrapped = method.apply(deeper_bert(task, layers=layers), task)
    assert wrapped.kept == kept and len(wrapped.side_layers) == len(kept)
    assert count(p for p in wrapped.parameters() if p.requires_grad) == method.expected_trainable_params(
        deeper_bert(task, layers=layers), task
    )


def test_sherl_tuned_late_layers_get_their_own_learning_rate():
    task = toy_task(2)
    method = registry()["sherl"](train_late_layers=True, late_lr_ratio=0.1)
    wrapped = method.apply(deeper_bert(task), task)
    groups = method.param_groups(wrapped, 1e-3)
    late = {id(p) for p in wrapped.late().parameters()}
    assert [g["lr"] for g in groups] == [1e-3, pytest.approx(1e-4)]
    assert {id(p) for p in groups[1]["params"]} == late
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in wrapped.parameters() if p.requires_grad)


def _matrix(module):
    from harness.anatomy import out_axis

    return module.weight.T if out_axis(module) == 1 else module.weight


@pytest.mark.parametrize("family", [f for f in BUILDERS])
def test_lst_prunes_every_role_of_any_family(family):
    """Side block j is backbone block kept[j] sliced role by role: q, k, v (fused in GPT-2's c_attn) at the kept
    attention rows and residual columns, o and the FFN at theirs, the norms at the residual dimensions; within a
    grouped-query group every head keeps the same dimensions, and rotary models keep rotate-half pairs."""
    torch.manual_seed(0)
    model = BUILDERS[family]()
    model.config.pad_token_id = 0
    wrapped, _ = applied("lst", model, toy_task(2), drop_layers=[])
    kept, anatomy = wrapped.pruned, describe(model)
    r = 8
    hidden = kept["hidden"]
    for j, block in enumerate(anatomy.blocks):
        small = wrapped.side_layers[j]
        q, kv, ffn = kept["attention"][j], kept["kv_attention"][j], kept["feed_forward"][j]
        slices = {"q": (q, hidden), "k": (kv, hidden), "v": (kv, hidden), "o": (hidden, q), "ffn_out": (hidden, ffn)}
        slices |= {role: (ffn, hidden) for role in ("ffn_in", "ffn_gate") if role in block.projections}
        for role, (rows, cols) in slices.items():
            p = block.projections[role]
            side = small.get_submodule(p.path[len(block.path) + 1 :])
            big_rows = torch.tensor(p.indices if p.fused else range(p.out_features))[rows]
            side_rows = torch.arange(len(rows))
            if p.fused:  # the role's part of the side's fused layer: the same layout at 1/r of each size
                share = [s // r for s in p.fused.sizes]
                side_rows += sum(share[: p.fused.roles.index(role)])
            assert torch.equal(_matrix(side)[side_rows], _matrix(p.module)[big_rows][:, cols]), f"{family} {role}"
        for norm in block.norms:
            side = small.get_submodule(norm.path[len(block.path) + 1 :])
            assert torch.equal(side.weight, norm.module.weight[hidden])
        per_head, side_per_head = block.head_dim, block.head_dim // r
        within = (q % per_head).view(block.num_heads, side_per_head)
        group = block.num_heads // block.num_kv_heads
        assert all(torch.equal(within[h], within[h - h % group]) for h in range(block.num_heads))
        assert torch.equal(within, (kv % per_head).view(block.num_kv_heads, side_per_head).repeat_interleave(group, 0))
        if wrapped.side_rotary is not None:
            half = side_per_head // 2
            assert torch.equal(within[:, half:], within[:, :half] + per_head // 2), "rotate-half pairs kept whole"
    if anatomy.final_norm is not None:
        assert torch.equal(wrapped.final_norm.weight, anatomy.final_norm.module.weight[hidden])


def test_lst_side_network_on_llama_is_a_llama_of_the_side_width():
    """With every ladder after the first shut (mu = 1), LST's side network is a stack of Llama blocks on the first
    ladder's output: it must equal LlamaModel built from the side config with those blocks and that final norm, fed
    the same embeddings and mask. This checks the causal mask, padding and the rotary embeddings recomputed for the
    side head size, against transformers' own forward."""
    from transformers import LlamaModel

    torch.manual_seed(0)
    task = toy_task(2)
    model = BUILDERS["llama"]()
    model.config.pad_token_id = 0
    wrapped, _ = applied("lst", model, task, drop_layers=[])
    wrapped.eval()
    batch = {k: v.clamp(max=99) for k, v in toy_batch(task).items() if k in ("input_ids", "attention_mask")}
    seen = []
    wrapped.final_norm.register_forward_hook(lambda module, args, out: seen.append(out))
    with torch.no_grad():
        wrapped.gate_logits.fill_(1000.0)  # sigmoid(1000 / T) is exactly 1.0 in float32: the ladders add 0
        for layer in wrapped.side_layers:  # sharp attention, so that positions and masks show in the output
            layer.self_attn.q_proj.weight.mul_(300.0)
            layer.self_attn.k_proj.weight.mul_(300.0)
        states = wrapped.frozen_features(batch)
        wrapped.trainable_path(states, batch["attention_mask"])
        reference = LlamaModel(wrapped.side_config).eval()
        reference.layers, reference.norm = wrapped.side_layers, wrapped.final_norm
        expected = reference(
            inputs_embeds=wrapped.ladders[0](states.hidden[0]), attention_mask=batch["attention_mask"]
        ).last_hidden_state
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(seen[0][real], expected[real])  # seen[1] is the reference's own final norm
    assert wrapped.side_config.head_dim == 2 and states.calls[0].kwargs["position_embeddings"][0].shape[-1] == 2
