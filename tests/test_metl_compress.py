"""Mechanism tests of the compression-side METL methods (TokenTune, Mesa/S2A activation
compression, WTA-CRS, VeLoRA): each proves what saves the memory, counted by the
harness's own meter, and that the gradients are what the paper says they are."""

from pathlib import Path

import pytest
import torch

from harness.meter import SavedTensorCounter
from methods._activation_compression import BitDropout, dequantize, pack_bits, quantize, unpack_bits
from methods.lora import LoRA
from methods.mesa import Mesa
from methods.s2a import S2A
from methods.tokentune import TokenTune, select_tokens
from methods.velora import VeLoRA
from methods.wta_crs import WTACRS, SampledLinear, sample_rows
from tests.conftest import no_dropout, tiny_bert, toy_batch, toy_task

TASK = toy_task(2)
ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")


def step(model, batch):
    """One training forward+backward: (logits, every parameter's gradient, saved bytes counted by the meter)."""
    model.train()
    model.zero_grad(set_to_none=True)
    counter = SavedTensorCounter(model)
    with counter:
        out = model(**batch)
        out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads, counter.last


def flat(grads):
    return torch.cat([g.reshape(-1) for g in grads.values()])


BATCH = toy_batch(TASK, n=8, length=24)


# ------------------------------------------------------------------ quantisation


@pytest.mark.parametrize("bits", [8, 4])
def test_dequantisation_error_is_at_most_half_a_step(bits):
    torch.manual_seed(0)
    x = torch.randn(3, 70, 33) * torch.logspace(-3, 2, 33)  # columns of very different scales
    x[0, 0, 0] = 400.0  # an outlier
    group = 64
    codes, lo, step_size = quantize(x, bits, group)
    assert codes.dtype == torch.uint8
    groups = -(-x.numel() // group)
    assert codes.numel() == groups * group * bits // 8, "4-bit codes are packed two to a byte"
    restored = dequantize(codes, lo, step_size, bits, x.shape, x.dtype)
    per_element_step = step_size.repeat_interleave(group)[: x.numel()].reshape(x.shape)
    error = (x - restored).abs()
    assert (error <= per_element_step / 2 * (1 + 1e-4) + 1e-6).all()
    assert error.max() > 0, "lossy, as it should be at this many levels"
    constant = torch.full((100,), 3.25)
    assert torch.equal(dequantize(*quantize(constant, bits, group), bits, constant.shape, constant.dtype), constant)


def test_masks_pack_eight_to_a_byte():
    mask = torch.rand(5, 13) > 0.3
    packed = pack_bits(mask)
    assert packed.numel() == -(-mask.numel() // 8)
    assert torch.equal(unpack_bits(packed, mask.shape), mask)


def test_bit_dropout_backward_uses_the_forward_mask():
    x = torch.randn(4, 50, requires_grad=True)
    counter = SavedTensorCounter(torch.nn.Identity())
    with counter:
        y = BitDropout.apply(x, 0.25)
        g = torch.randn_like(y)
        y.backward(g)
    kept = y.detach() != 0
    assert torch.allclose(y[kept], x[kept] / 0.75)
    assert torch.allclose(x.grad, g * kept / 0.75)
    assert counter.last == x.numel() // 8, "the mask is saved as bits"


# ------------------------------------------------------------------ Mesa / S2A


@pytest.mark.parametrize("cls", [Mesa, S2A])
def test_compression_keeps_forward_exact_and_gradients_close(cls):
    _, exact, _ = step(no_dropout(tiny_bert(TASK)), BATCH)
    reference_logits, _, _ = step(no_dropout(tiny_bert(TASK)), BATCH)
    logits, approx, _ = step(cls().apply(no_dropout(tiny_bert(TASK)), TASK), BATCH)
    assert torch.allclose(logits, reference_logits, atol=1e-6), "the forward pass is exact"
    cosine = torch.nn.functional.cosine_similarity(flat(exact), flat(approx), dim=0)
    assert cosine >= 0.99, f"{cls.name}: cosine {cosine:.4f}"
    assert not torch.equal(flat(exact), flat(approx)), "the backward really used de-quantised activations"


def bert_with_attention_dropout(p: float, length: int):
    """tiny_bert with the given attention dropout: p > 0 sends SDPA on CPU to math attention (which saves
    the length x length probabilities and dropout mask), p == 0 to its fused flash kernel (which saves none)."""
    return tiny_bert(TASK, max_position_embeddings=length, attention_probs_dropout_prob=p)


def sdpa_kernels(model, batch) -> set[str]:
    """The aten attention kernels one training forward of `model` dispatches."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        ops: set = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "scaled_dot_product" in func.__name__:
                self.ops.add(func.__name__.split(".")[0])
            return func(*args, **(kwargs or {}))

    with Seen() as seen:
        model.train()
        model(**batch)
    return seen.ops


@pytest.mark.parametrize("length", [128, 512])
@pytest.mark.parametrize("attention_dropout", [0.1, 0.0], ids=["math-attention", "fused-attention"])
def test_compression_saves_less_than_full_finetuning_on_every_attention_backend(attention_dropout, length):
    batch = toy_batch(TASK, n=4, length=length)
    full_model = bert_with_attention_dropout(attention_dropout, length)
    fused = "_scaled_dot_product_flash_attention_for_cpu" in sdpa_kernels(full_model, batch)
    assert fused == (attention_dropout == 0), "the backend this case is named for is the one that ran"
    _, _, full = step(full_model, batch)
    _, _, mesa = step(Mesa().apply(bert_with_attention_dropout(attention_dropout, length), TASK), batch)
    _, _, s2a = step(S2A().apply(bert_with_attention_dropout(attention_dropout, length), TASK), batch)
    # Mesa quantises nearly everything full fine-tuning keeps to 8 of 32 bits (+ 8 bytes of range per 256 values)
    assert mesa <= 0.30 * full, f"mesa saves {mesa / full:.3f} of full fine-tuning's bytes"
    assert mesa < s2a < full, "s2a compresses only the non-parametric ops"


def test_compressed_attention_saves_quantised_q_k_v_and_no_probabilities():
    """Against the fused kernel on the same inputs: it keeps Q, K, V (and its output and softmax
    statistics); the compressed op keeps Q, K, V at 8 bits and nothing of length x length."""
    from methods._activation_compression import CompressedAttention

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 256, 16, requires_grad=True) for _ in range(3))
    qkv_bytes = 3 * q.numel() * 4
    fused = SavedTensorCounter(torch.nn.Identity())
    with fused:
        torch.nn.functional.scaled_dot_product_attention(q, k, v).sum().backward()
    assert fused.last >= qkv_bytes, "the fused kernel keeps Q, K and V"
    counter = SavedTensorCounter(torch.nn.Identity())
    with counter:
        CompressedAttention.apply(q, k, v, None, 0.25, 0.1, Mesa().policy()).sum().backward()
    groups = q.numel() // 256
    assert counter.last == 3 * (q.numel() + 8 * groups), "8-bit codes and fp32 range per group, nothing else"
    assert counter.last < 0.27 * qkv_bytes


def test_compressed_attention_gradients_are_exact_with_exact_storage_and_replay_its_dropout():
    """With Q, K, V kept exact, recomputing the probabilities and redrawing the dropout mask from its
    seed gives autograd's gradients of the same attention, mask for mask."""
    from methods._activation_compression import CompressedAttention, Policy, _dropout_keep

    policy = Policy(
        linear_bits=None,
        norm_bits=None,
        act_bits=None,
        act_store="input",
        qkv_bits=None,
        pack_dropout=False,
        group_size=64,
    )
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 20, 8, requires_grad=True) for _ in range(3))
    mask = torch.ones(2, 1, 20, 20, dtype=torch.bool)
    mask[0, :, :, 15:] = False
    grad_out = torch.randn(2, 3, 20, 8)
    torch.manual_seed(7)
    out = CompressedAttention.apply(q, k, v, mask, 0.3, 0.25, policy)
    ours = torch.autograd.grad(out, (q, k, v), grad_out)
    torch.manual_seed(7)
    seed = int(torch.randint(0, 2**62, (1,)).item())  # what the op drew
    scores = (q @ k.transpose(-1, -2) * 0.3).masked_fill(~mask, float("-inf"))
    keep = _dropout_keep((2, 3, 20, 20), 0.25, seed, q.device)
    assert 0.6 < keep.float().mean() < 0.9
    reference = (torch.softmax(scores, -1) * keep / 0.75) @ v
    assert torch.allclose(out, reference, atol=1e-6)
    for mine, theirs in zip(ours, torch.autograd.grad(reference, (q, k, v), grad_out)):
        assert torch.allclose(mine, theirs, atol=1e-5)


def test_linear_layers_reading_one_input_save_one_quantised_copy():
    class QKV(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = (torch.nn.Linear(64, 64) for _ in range(3))

        def forward(self, x):
            return self.q(x) + self.k(x) + self.v(x)

    model = Mesa().apply(QKV(), TASK)
    counter = SavedTensorCounter(model)
    x = torch.randn(4, 64, 64)  # 16384 values: 64 groups of 256
    with counter:
        model(x).sum().backward()
    assert counter.last == 16384 + 64 * 4 * 2, "one copy of 8-bit codes plus fp32 min and step per group"


def test_compression_stacks_after_lora():
    lora_model = LoRA().apply(tiny_bert(TASK), TASK)
    declared = sum(p.numel() for p in lora_model.parameters() if p.requires_grad)
    _, _, lora_bytes = step(lora_model, BATCH)
    stacked = Mesa().apply(LoRA().apply(tiny_bert(TASK), TASK), TASK)
    assert sum(p.numel() for p in stacked.parameters() if p.requires_grad) == declared
    _, grads, stacked_bytes = step(stacked, BATCH)
    assert stacked_bytes < 0.5 * lora_bytes
    assert any("lora_A" in name for name in grads), "the adapters are what gets trained"


# ------------------------------------------------------------------ TokenTune


def test_tokentune_selection_keeps_cls_and_the_fraction_of_real_tokens():
    valid = torch.ones(3, 10, dtype=torch.bool)
    valid[1, 6:] = False
    valid[2, 2:] = False
    order, K = select_tokens(valid, 0.5)
    assert K == 5 and (order[:, :K] == 0).any(1).all(), "[CLS] is always selected"
    assert valid[1].gather(0, order[1, :K]).sum() == 3, "ceil(0.5 * 6) real tokens in row 1"
    assert not valid[1].gather(0, order[1, 3:K]).any(), "the rest of its slots are padding"
    assert torch.equal(order.sort(1).values, torch.arange(10).expand(3, 10)), "a permutation of each row"


def test_tokentune_forward_is_exact_and_eval_untouched():
    reference, _, _ = step(no_dropout(tiny_bert(TASK)), BATCH)
    model = TokenTune(fraction=0.3).apply(no_dropout(tiny_bert(TASK)), TASK)
    logits, _, _ = step(model, BATCH)
    assert torch.allclose(logits, reference, atol=1e-5)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(**BATCH).logits, reference, atol=1e-5)


def test_tokentune_saved_bytes_scale_with_the_fraction():
    batch = toy_batch(TASK, n=8, length=24)
    batch["attention_mask"][:] = 1  # no padding: K = ceil(fraction * 24) exactly
    _, _, full = step(tiny_bert(TASK), batch)
    saved = {f: step(TokenTune(fraction=f).apply(tiny_bert(TASK), TASK), batch)[2] for f in (0.25, 0.5, 1.0)}
    assert saved[0.25] < saved[0.5] < saved[1.0]
    # Selected-token activations grow linearly with K = 6, 12, 24 (the keys/values and embeddings are fixed).
    first, second = saved[0.5] - saved[0.25], saved[1.0] - saved[0.5]
    assert second == pytest.approx(2 * first, rel=0.05)
    assert saved[0.25] / saved[0.5] < 0.75
    assert saved[0.25] < 0.55 * full, f"fraction 0.25 saves {saved[0.25] / full:.3f} of full fine-tuning"


def test_tokentune_gradient_flows_only_through_selected_tokens():
    model = TokenTune(fraction=0.3).apply(no_dropout(tiny_bert(TASK)), TASK)
    selection, chosen = model.bert.tokentune_selection, {}
    choose = selection.choose

    def remember(hidden):  # the choice is forgotten once the forward ends: only the graph holds it then
        choose(hidden)
        chosen.update(order=selection.order, count=selection.count)

    selection.choose = remember
    step(model, BATCH)
    selected_ids = set(BATCH["input_ids"].gather(1, chosen["order"][:, : chosen["count"]]).flatten().tolist())
    touched = set(model.bert.embeddings.word_embeddings.weight.grad.abs().sum(1).nonzero().flatten().tolist())
    assert touched and touched <= selected_ids


def test_tokentune_with_every_token_is_full_finetuning():
    batch = dict(BATCH)
    _, exact, _ = step(no_dropout(tiny_bert(TASK)), batch)
    _, grads, _ = step(TokenTune(fraction=1.0).apply(no_dropout(tiny_bert(TASK)), TASK), batch)
    assert torch.allclose(flat(exact), flat(grads), atol=1e-5, rtol=1e-4)


def test_tokentune_stacks_after_lora():
    lora_model = LoRA().apply(tiny_bert(TASK), TASK)
    _, _, lora_bytes = step(lora_model, BATCH)
    stacked = TokenTune().apply(LoRA().apply(tiny_bert(TASK), TASK), TASK)
    trainable = [p for p in stacked.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == LoRA().expected_trainable_params(tiny_bert(TASK), TASK)
    _, _, stacked_bytes = step(stacked, BATCH)
    assert stacked_bytes < 0.7 * lora_bytes
    optimizer = torch.optim.AdamW(trainable, lr=3e-3)
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = stacked(**BATCH).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]


def test_lora_tokentune_and_compression_stack():
    _, _, two = step(TokenTune().apply(LoRA().apply(tiny_bert(TASK), TASK), TASK), BATCH)
    model = Mesa().apply(TokenTune().apply(LoRA().apply(tiny_bert(TASK), TASK), TASK), TASK)
    _, grads, three = step(model, BATCH)
    assert three < 0.5 * two
    assert any("lora_B" in name for name in grads)


# ------------------------------------------------------------------ WTA-CRS


def test_wta_crs_estimate_is_unbiased():
    torch.manual_seed(0)
    x = torch.randn(64, 12) * torch.rand(64, 1) * 3  # rows of very different norms
    g = torch.randn(64, 6)
    exact = g.t() @ x
    k = int(64 * 0.3)

    def estimate():
        index, scale = sample_rows(x, k)
        return g[index].t() @ (x[index] * scale[:, None])

    estimates = torch.stack([estimate() for _ in range(1500)])
    relative = lambda e: ((e - exact).norm() / exact.norm()).item()
    assert relative(estimates[0]) > 0.5, "one estimate is noisy: it really samples"
    # unbiased: the mean's error shrinks like 1/sqrt(n) (about 1.5 / sqrt(1500) = 0.04 here)
    assert relative(estimates.mean(0)) < 0.1, "their mean converges to the exact gradient"
    # the autograd op computes exactly this estimate for the weight gradient
    weight = torch.randn(6, 12, requires_grad=True)
    torch.manual_seed(1)
    (through_op,) = torch.autograd.grad(SampledLinear.apply(x[None], weight, None, 0.3), weight, g[None])
    torch.manual_seed(1)
    assert torch.allclose(through_op, estimate(), atol=1e-5)


def test_wta_crs_saves_the_sampled_rows_only():
    x = torch.randn(8, 25, 32, requires_grad=True)
    layer = WTACRS(ratio=0.3, skip=[]).apply(torch.nn.Sequential(torch.nn.Linear(32, 32)), TASK)
    counter = SavedTensorCounter(layer)
    with counter:
        layer(x).sum().backward()
    k = int(200 * 0.3)
    assert counter.last == k * 32 * 4 + k * 8, "k rows of the input and their int64 indices"


def test_wta_crs_on_a_model_keeps_every_other_gradient_exact():
    _, exact, full_bytes = step(no_dropout(tiny_bert(TASK)), BATCH)
    logits, sampled, sampled_bytes = step(WTACRS().apply(no_dropout(tiny_bert(TASK)), TASK), BATCH)
    assert sampled_bytes < full_bytes
    for name in ("query.weight", "intermediate.dense.bias", "output.LayerNorm.weight", "classifier.weight"):
        for key in (k for k in exact if k.endswith(name)):
            assert torch.allclose(exact[key], sampled[key], atol=1e-6), f"{key}: exact input gradients flow through"
    targeted = [k for k in exact if k.endswith("intermediate.dense.weight")]
    assert targeted and not torch.allclose(exact[targeted[0]], sampled[targeted[0]])


def test_wta_crs_after_lora_needs_skip_emptied():
    with pytest.raises(ValueError, match="skip"):
        WTACRS().apply(LoRA().apply(tiny_bert(TASK), TASK), TASK)
    stacked = WTACRS(skip=[]).apply(LoRA().apply(tiny_bert(TASK), TASK), TASK)
    _, grads, _ = step(stacked, BATCH)
    assert any("lora_A" in name for name in grads)


# ------------------------------------------------------------------ VeLoRA


def test_velora_saves_less_than_lora():
    # 8 groups of the tiny model's 64 features: sub-tokens of 8 values (64 groups of MiniLM's 384 give 6)
    _, _, lora_bytes = step(LoRA().apply(tiny_bert(TASK), TASK), BATCH)
    model = VeLoRA(num_groups=8).apply(tiny_bert(TASK), TASK)
    assert model.peft_config["default"].velora_config.num_groups == 8, "peft's VeLoRA variant is what runs"
    _, grads, velora_bytes = step(model, BATCH)
    assert velora_bytes < lora_bytes
    assert any("lora_A" in name for name in grads)


def test_velora_down_projection_gradient_is_the_rank_one_reconstructions():
    """A's weight gradient is g^T x_hat, where x_hat rebuilds each input token from its sub-tokens'
    coefficients on one unit vector v (the normalised mean sub-token of the first batch), computed
    here from the paper's description, not from peft's code."""
    groups = 8
    model = VeLoRA(num_groups=groups, dropout=0.0).apply(tiny_bert(TASK), TASK)
    layer = model.base_model.model.bert.encoder.layer[0].attention.self.query
    torch.nn.init.normal_(layer.lora_B["default"].weight)  # B starts at zero, which would give A no gradient
    seen = {}
    layer.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0].detach()))

    def grad_of_a_output(module, args):
        args[0].register_hook(lambda g: seen.__setitem__("g", g.detach()))

    layer.lora_B["default"].register_forward_pre_hook(grad_of_a_output)
    model.train()
    model(**BATCH).loss.backward()
    x = seen["x"].reshape(-1, seen["x"].shape[-1])  # tokens x 64
    g = seen["g"].reshape(-1, seen["g"].shape[-1])  # tokens x r
    sub = x.reshape(len(x), groups, -1)  # 8 sub-tokens of 8 values per token
    v = sub.reshape(-1, sub.shape[-1]).mean(0)
    v = v / v.norm()
    x_hat = ((sub @ v)[..., None] * v).reshape(len(x), -1)  # coefficient times v, scale 1
    expected = g.t() @ x_hat
    actual = layer.lora_A["default"].weight.grad
    relative = lambda a, b: float((a - b).norm() / b.norm())
    assert relative(actual, expected) < 1e-4
    assert relative(actual, g.t() @ x) > 0.1, "not the exact gradient: the input was compressed"


# ------------------------------------------------------------------ the comparison suite


def test_metl_memory_suite_runs_every_metl_method_at_both_paddings():
    """suites/metl_memory.yaml is where issue 5's ratios come from: a METL method added
    to the registry but left out of it (at either padding) fails here."""
    from harness.config import load_suite
    from harness.method import registry

    suite = load_suite(ROOT / "suites" / "metl_memory.yaml")
    assert suite.tasks[0].name == "sst2" and suite.train.batch_size == 32 and suite.train.max_seq_length == 128
    padding = {e.label: e.train.get("padding", suite.train.padding) for e in suite.methods}
    for label, pad in padding.items():
        assert pad == {"dynamic": "dynamic", "fixed128": "max_length"}[label.rsplit(".", 1)[1]], label
    ran = {(c.ref, padding[e.label]) for e in suite.methods for c in e.components}
    metl = {name for name, cls in registry().items() if cls.family == "METL"}
    for name in metl | {"full", "lora", "linear_probe"}:
        assert {(name, "dynamic"), (name, "max_length")} <= ran, name
