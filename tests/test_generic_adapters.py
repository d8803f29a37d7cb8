"""The adapter methods (Houlsby, Pfeiffer, parallel adapter) and the activation compression (Mesa, S2A) on every
architecture family: each adapter sits where its paper puts it, found by role, and the compression keeps the
forward exact and covers what the family adds (grouped-query attention, causal attention without padding,
RMSNorm, GPT-2's Conv1D, gated FFNs)."""

import copy
import functools

import pytest
import torch
import transformers as tf

from harness.anatomy import describe
from harness.families import BUILDERS
from harness.meter import SavedTensorCounter
from harness.method import count, registry
from methods._activation_compression import (
    CompressedAttention,
    CompressedConv1D,
    CompressedRMSNorm,
    GatedProduct,
    Policy,
    install,
)
from methods.lora import LoRA
from tests.conftest import no_dropout, toy_task
from tests.test_anatomy import UNNAMED
from tests.test_families import batch_for
from tests.test_metl_compress import step

TASK = toy_task()
FAMILIES = list(BUILDERS)
ADAPTERS = ("houlsby", "pfeiffer", "parallel_adapter")
EXACT = Policy(None, None, None, "input", None, False, 64)  # every op's storage exact: gradients must be autograd's
pytestmark = pytest.mark.usefixtures("one_thread")


def family_model(family: str):
    torch.manual_seed(0)
    model = BUILDERS[family]()
    model.config.pad_token_id = 0
    return model.eval()


def record(module, store: list, what: str = "output"):
    """Keep `module`'s first input, its own output (before any other hook changes it) or its final output (after
    the hooks registered so far) at every call."""
    if what == "input":
        return module.register_forward_pre_hook(lambda m, args: store.append(args[0]))
    return module.register_forward_hook(
        lambda m, args, out: store.append(out[0] if isinstance(out, tuple) else out), prepend=what == "output"
    )


def randomise(adapter):
    """Non-zero weights, so an adapter's change is large enough to see."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_(0, 0.3)


# ------------------------------------------------------------------ adapters: where they are


@pytest.mark.parametrize("family", FAMILIES)
def test_houlsby_adapters_read_each_sublayer_s_output_projection(family):
    base = family_model(family)
    anatomy = describe(base)
    model = registry()["houlsby"]().apply(base, TASK)
    block = anatomy.blocks[0]
    for role in ("o", "ffn_out"):
        projection = block.projections[role]
        produced, read = [], []
        record(projection.module, produced)
        record(projection.module.houlsby.down, read, "input")
        with torch.no_grad():
            model(**batch_for(family, TASK))
        # eval mode: a BERT-style sublayer's dropout between the two is the identity
        assert torch.equal(produced[0], read[0]), (family, role)


@pytest.mark.parametrize("family", FAMILIES)
def test_houlsby_trains_every_norm_of_the_backbone_rmsnorm_included(family):
    base = family_model(family)
    norms = describe(base).norms()
    method = registry()["houlsby"]()
    declared = method.expected_trainable_params(base, TASK)
    model = method.apply(base, TASK)
    assert norms and all(p.requires_grad for norm in norms for p in norm.module.parameters())
    assert count(p for p in model.parameters() if p.requires_grad) == declared
    if family == "llama":
        assert {norm.kind for norm in norms} == {"rmsnorm"} and not any(norm.has_bias for norm in norms)


@pytest.mark.parametrize("family", FAMILIES)
def test_pfeiffer_adapts_the_block_output_after_the_ffn(family):
    """Post-norm: the block's output norm(z) becomes norm(z + A(norm(z))); pre-norm: its output z becomes
    z + A(z). Checked on the first block, whose input the adapters do not change."""
    base = family_model(family)
    batch = batch_for(family, TASK)
    model = registry()["pfeiffer"]().apply(copy.deepcopy(base), TASK)
    block, adapted_block = describe(base).blocks[0], describe(model).blocks[0]
    adapter = adapted_block.projections["ffn_out"].module.pfeiffer
    randomise(adapter)
    plain_out, norm_in, adapted_out = [], [], []
    record(block.module, plain_out)
    record(block.norms[-1].module, norm_in, "input")
    record(adapted_block.module, adapted_out, "final output")  # after the adapter's hook
    with torch.no_grad():
        base(**batch)
        model(**batch)
        if block.norm_order == "post":
            norm = adapted_block.norms[-1].module
            expected = norm.forward(norm_in[0] + adapter(norm.forward(norm_in[0])))  # forward: without the hook
        else:
            expected = plain_out[0] + adapter(plain_out[0])
    assert torch.allclose(adapted_out[0], expected, atol=1e-6), family
    assert not torch.allclose(adapted_out[0], plain_out[0], atol=1e-3), "the adapter changed the block's output"


@pytest.mark.parametrize("family", FAMILIES)
def test_parallel_adapter_reads_the_ffn_input_and_adds_beside_the_ffn(family):
    """FFN(x) + s * A(x) before the residual add: the same as adding s * A(x) to the FFN's down projection,
    with x what the up (and gate) projection reads."""
    base = family_model(family)
    batch = batch_for(family, TASK)
    model = registry()["parallel_adapter"]().apply(copy.deepcopy(base), TASK)
    for block in describe(model).blocks:
        randomise(block.projections["ffn_out"].module.parallel_adapter)
    block = describe(model).blocks[0]
    seen_by_ffn, seen_by_branch = [], []
    record(block.projections["ffn_in"].module, seen_by_ffn, "input")
    record(block.projections["ffn_out"].module.parallel_adapter.down, seen_by_branch, "input")
    with torch.no_grad():
        adapted = model(**batch).logits
    assert torch.equal(seen_by_ffn[0], seen_by_branch[0])

    # the same branch written by hand on the plain model: s * A(x) added to the down projection's output
    reference = copy.deepcopy(base)
    for plain, done in zip(describe(reference).blocks, describe(model).blocks):
        branch, held = done.projections["ffn_out"].module.parallel_adapter, {}
        plain.projections["ffn_in"].module.register_forward_pre_hook(lambda m, a, held=held: held.update(x=a[0]))
        plain.projections["ffn_out"].module.register_forward_hook(
            lambda m, a, out, held=held, branch=branch: out + 4.0 * branch(held["x"])
        )
    with torch.no_grad():
        expected = reference(**batch).logits
        untouched = base(**batch).logits
    # BERT-style sublayers add the branch to the residual input instead: the same sum, rounded in another order
    assert torch.allclose(adapted, expected, atol=1e-5), family
    assert not torch.allclose(adapted, untouched, atol=1e-3)


@pytest.mark.parametrize("name", ADAPTERS)
@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_an_adapted_model_is_still_described_by_role_and_copies_with_its_hooks(name, family):
    """The adapters live inside their projections, where harness.anatomy does not look: a method stacked after
    them finds the same projections; and a deep copy's hooks drive the copy's adapters, not the original's."""
    base = family_model(family)
    before = {role: [p.path for p in describe(base).projections(role)] for role in describe(base).roles()}
    model = registry()[name]().apply(base, TASK)
    after = describe(model)
    assert {role: [p.path for p in after.projections(role)] for role in after.roles()} == before

    batch = batch_for(family, TASK)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        noise = torch.Generator().manual_seed(0)
        for p in (p for n, p in twin.named_parameters() if name in n):
            p.add_(torch.randn(p.shape, generator=noise))  # random: a constant shift is what a LayerNorm removes
        original, changed, again = (
            m(**batch, output_hidden_states=True).hidden_states[-1] for m in (model, twin, model)
        )
    assert torch.equal(original, again), "changing the copy's adapters left the original alone"
    assert not torch.allclose(original, changed, atol=1e-4), "the copy runs its own adapters"


# ------------------------------------------------------------------ compression: the new ops, exact storage


def test_grouped_query_attention_keeps_k_v_at_their_heads_and_gets_autograd_s_gradients():
    torch.manual_seed(0)
    q = torch.randn(2, 4, 10, 8, requires_grad=True)
    k, v = (torch.randn(2, 2, 10, 8, requires_grad=True) for _ in range(2))
    grad_out = torch.randn(2, 4, 10, 8)
    for causal in (False, True):
        out = CompressedAttention.apply(q, k, v, None, 0.3, 0.0, EXACT, causal)
        reference = torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), scale=0.3, is_causal=causal
        )
        assert torch.allclose(out, reference, atol=1e-6)
        for mine, theirs in zip(
            torch.autograd.grad(out, (q, k, v), grad_out), torch.autograd.grad(reference, (q, k, v), grad_out)
        ):
            assert mine.shape == theirs.shape and torch.allclose(mine, theirs, atol=1e-5)
    counter = SavedTensorCounter(torch.nn.Identity())
    with counter:
        CompressedAttention.apply(q, k, v, None, 0.3, 0.0, EXACT, True).sum().backward()
    assert counter.last == (q.numel() + k.numel() + v.numel()) * 4, "K and V at 2 heads, no mask saved"


def test_rmsnorm_conv1d_and_gated_product_get_autograd_s_gradients_with_exact_storage():
    torch.manual_seed(0)
    norm = tf.models.llama.modeling_llama.LlamaRMSNorm(16)
    norm.weight.data.normal_()
    x, g = torch.randn(3, 5, 16, requires_grad=True), torch.randn(3, 5, 16)
    own = functools.partial(type(norm).forward, norm)
    out = CompressedRMSNorm.apply(x, norm.weight, own, norm.variance_epsilon, None, 64)
    assert torch.equal(out, norm(x))
    for mine, theirs in zip(
        torch.autograd.grad(out, (x, norm.weight), g), torch.autograd.grad(norm(x), (x, norm.weight), g)
    ):
        assert torch.allclose(mine, theirs, atol=1e-5)

    conv = tf.pytorch_utils.Conv1D(12, 16)
    out = CompressedConv1D.apply(x, conv.weight, conv.bias, None, 64)
    assert torch.equal(out, conv(x))
    g12 = torch.randn(3, 5, 12)
    wrt = (x, conv.weight, conv.bias)
    for mine, theirs in zip(torch.autograd.grad(out, wrt, g12), torch.autograd.grad(conv(x), wrt, g12)):
        assert torch.allclose(mine, theirs, atol=1e-5)

    gate, up, act = (
        torch.randn(3, 5, 16, requires_grad=True),
        torch.randn(3, 5, 16, requires_grad=True),
        torch.nn.SiLU(),
    )
    for store in ("input", "derivative"):
        out = GatedProduct.apply(gate, up, act, store, None, 64)
        assert torch.equal(out, act(gate) * up)
        for mine, theirs in zip(
            torch.autograd.grad(out, (gate, up), g), torch.autograd.grad(act(gate) * up, (gate, up), g)
        ):
            assert torch.allclose(mine, theirs, atol=1e-5), store


# ------------------------------------------------------------------ compression on the families


def one_step(model, batch):
    """test_metl_compress.step, with every parameter's gradient in one vector (for one cosine)."""
    logits, grads, saved = step(model, batch)
    return logits, torch.cat([g.reshape(-1) for g in grads.values()]), saved


@pytest.mark.parametrize("padding", [True, False], ids=["padded", "unpadded"])
@pytest.mark.parametrize("name", ["mesa", "s2a"])
@pytest.mark.parametrize("family", FAMILIES)
def test_compression_keeps_the_forward_exact_and_saves_less_on_every_family(family, name, padding):
    """Without padding a decoder's mask is skipped (SDPA's is_causal): the compressed attention must be causal
    then too, or the logits would differ."""
    base = no_dropout(family_model(family))
    batch = batch_for(family, TASK)
    if not padding and "attention_mask" in batch:
        batch["attention_mask"] = torch.ones_like(batch["attention_mask"])
    logits, grads, full = one_step(copy.deepcopy(base), batch)
    compressed = registry()[name]().apply(copy.deepcopy(base), TASK)
    c_logits, c_grads, saved = one_step(compressed, batch)
    assert torch.allclose(c_logits, logits, atol=1e-6), "the forward pass is exact"
    assert torch.nn.functional.cosine_similarity(grads, c_grads, dim=0) >= 0.99
    assert saved < full
    compressed.eval()
    with torch.no_grad():  # no graph: the plain SDPA path, causal and with grouped-query attention too
        assert torch.allclose(compressed(**batch).logits, base(**batch).logits, atol=1e-6)


def test_mesa_covers_llama_s_rmsnorms_gated_ffns_and_grouped_query_attention():
    model = family_model("llama")
    counts = install(model, registry()["mesa"]().policy())
    anatomy = describe(model)
    assert counts["rmsnorm"] == len(anatomy.norms()) == 2 * len(anatomy.blocks) + 1
    assert counts["gated_ffn"] == len(anatomy.blocks) and counts["attention"] == 1
    batch = batch_for("llama", TASK)
    _, _, full = one_step(family_model("llama"), batch)
    _, _, saved = one_step(model, batch)
    # 8 of 32 bits nearly everywhere; the gated product's act(g) and u would otherwise stay at 32
    assert saved <= 0.25 * full, f"mesa keeps {saved / full:.3f} of full fine-tuning's bytes on Llama"


@pytest.mark.parametrize("relative", ["mistral", "qwen2", "phi3"])
def test_relatives_gated_ffns_are_found_by_role_fused_gate_up_too(relative):
    """No code of their own: Mistral's and Qwen2's gate/up/down like Llama's, Phi-3's gate and up in one layer."""
    torch.manual_seed(0)
    base = no_dropout(UNNAMED[relative]())
    batch = batch_for("roberta", TASK)  # a text batch without token types
    logits, grads, full = one_step(copy.deepcopy(base), batch)
    model = copy.deepcopy(base)
    counts = install(model, registry()["mesa"]().policy())
    assert counts["gated_ffn"] == len(describe(model).blocks)
    c_logits, c_grads, saved = one_step(model, batch)
    assert torch.allclose(c_logits, logits, atol=1e-6)
    assert torch.nn.functional.cosine_similarity(grads, c_grads, dim=0) >= 0.99
    assert saved <= 0.25 * full


def test_mesa_compresses_gpt2_s_trainable_conv1d_layers_only():
    model = family_model("gpt2")
    conv1d = [m for m in model.modules() if isinstance(m, tf.pytorch_utils.Conv1D)]
    frozen, trained = conv1d[0], conv1d[1]
    frozen.weight.requires_grad_(False)
    counts = install(model, registry()["mesa"]().policy())
    assert counts["conv1d"] == len(conv1d) == 4 * len(describe(model).blocks)
    x = torch.randn(4, 64, 32, requires_grad=True)  # 8192 values: 32 groups of 256
    for layer, expected in ((frozen, 0), (trained, x.numel() + 32 * 8)):
        counter = SavedTensorCounter(layer)
        with counter:
            layer(x).sum().backward()
        assert counter.last == expected, "a frozen Conv1D keeps no input; a trained one keeps it at 8 bits"


def test_after_lora_the_gated_ffns_inside_peft_s_wrapper_are_compressed_too():
    model = LoRA().apply(family_model("llama"), TASK)
    counts = install(model, registry()["mesa"]().policy())
    assert counts["gated_ffn"] == len(describe(family_model("llama")).blocks)
    batch = batch_for("llama", TASK)
    _, _, lora_bytes = one_step(LoRA().apply(family_model("llama"), TASK), batch)
    _, grads, saved = one_step(model, batch)
    assert saved < 0.5 * lora_bytes and len(grads) > 0


def test_a_norm_of_another_form_is_left_exact():
    class OnePlusWeightRMSNorm(torch.nn.Module):  # Gemma's form: (1 + weight) * x / rms(x)
        def __init__(self, width):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(width))
            self.eps = 1e-6

        def forward(self, x):
            return (1 + self.weight) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    holder = torch.nn.Sequential(OnePlusWeightRMSNorm(8), tf.models.llama.modeling_llama.LlamaRMSNorm(8))
    counts = install(holder, registry()["mesa"]().policy())
    assert counts["rmsnorm"] == 1 and "forward" not in vars(holder[0]) and "forward" in vars(holder[1])


def test_a_copy_of_a_compressed_llama_computes_with_its_own_weights():
    model = registry()["mesa"]().apply(family_model("llama"), TASK)
    twin = copy.deepcopy(model)
    batch = batch_for("llama", TASK)
    with torch.no_grad():
        for block in describe(twin).blocks:
            block.norms[-1].module.weight.mul_(3)
            block.projections["ffn_gate"].module.weight.mul_(-1)
    model.train()
    twin.train()
    assert not torch.allclose(model(**batch).logits, twin(**batch).logits, atol=1e-4)
