"""Compressed storage of the activations autograd keeps for backward.

Shared machinery of the activation-compression methods (methods/mesa.py,
methods/s2a.py); it defines no method itself. Every op keeps an exact forward
and saves, with `ctx.save_for_backward`, only the compressed form of what its
backward needs, de-quantised when backward runs. Saving through
`save_for_backward` (not a `saved_tensors_hooks` context) matters: the
harness's meter counts saved tensors with such hooks, and hooks do not nest,
so compression done in hooks would hide every saved byte from the meter.

Quantisation: a tensor is flattened and cut into groups of `group_size`
consecutive elements; each group stores its minimum `lo` and step
`(max - min) / (2**bits - 1)` in fp32 and one code per element, rounded to
nearest, so |x - dequantise(quantise(x))| <= step / 2 for every element.
4-bit codes are packed two to a byte. Boolean masks are packed eight to a byte.

`install(model, policy)` swaps in these ops on the model's modules that exist
when it is called (instance-level `forward`, so module names, state dicts and
peft's wrappers are untouched):
- nn.Linear and transformers' Conv1D (GPT-2's layers, weight stored (in, out))
  with a trainable weight: their input, for the weight gradient. A frozen one
  needs no saved input at all and is left as is. The three projections q/k/v
  share one input; it is quantised once and shared.
- nn.LayerNorm: its input (mean and 1/std are kept exactly, one float per row).
- RMSNorm (Llama's and its relatives', nn.RMSNorm): its input (1/rms kept
  exactly, one float per row). Only a norm whose output checks out, on a
  probe input at install, as weight * x / rms(x) is swapped (Gemma's
  (1 + weight) form is not, and stays exact); its forward is its own.
- elementwise activations (GELU and the other transformers.activations
  modules, nn.GELU/ReLU/SiLU): their input, or their derivative f'(x).
- gated FFNs (Llama's SwiGLU, down(act(gate(x)) * up(x)), gate and up in one
  fused layer too (Phi-3's), found through harness.anatomy and checked on a
  probe input at install): the product act(g) * u as one op that keeps g and
  u (policy "input"), or its two partial derivatives u * act'(g) and act(g)
  (policy "derivative"), quantised like an activation. Without it the product
  would keep act(g) and u, two full-width tensors, exact.
- nn.Dropout: its keep-mask as bits (lossless).
- attention (through transformers' AttentionInterface, so every model that
  dispatches attention through `config._attn_implementation` is covered):
  one op that keeps what a fused kernel (FlashAttention, memory-efficient
  SDPA) keeps, compressed: Q, K and V, quantised per the policy. Like those
  kernels, it recomputes the softmax in backward instead of storing the
  length x length probabilities, and it replays the attention-dropout mask
  from a saved seed instead of storing it. So it saves less than the
  uncompressed model on every SDPA backend: against math attention (CPU with
  attention dropout), which stores the probabilities and the mask, and
  against the fused kernels, which store Q, K, V, the output and the softmax
  statistics. Of the padding mask (SDPA's boolean one) it keeps one row per
  sequence, shared by every layer. Grouped-query attention (K and V with fewer
  heads than Q, Llama's) is kept at the K/V heads and repeated inside the op,
  as Hugging Face's own attention repeats them; a causal model's attention
  without a mask (no padding) is causal inside the op, as SDPA's is_causal,
  and saves no mask.
Left exact: embedding look-ups (integer ids), the pooler's tanh and the loss,
and any module type not listed above.

Nothing saved outlives its backward: the tensors go to `save_for_backward`
alone (the layout kept on `ctx` holds shapes, not tensors), and the q/k/v
sharing cache holds weak references only.
"""

import copy
import functools
import math
import types
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import unset_fake_temporarily

from harness.anatomy import describe, is_activation, norm_kind, transformers_model
from harness.meter import is_fake


@dataclass(frozen=True)
class Policy:
    """Which saved activations are compressed, and to how many bits (None: kept exact)."""

    linear_bits: int | None  # inputs of Linear (and Conv1D) layers with a trainable weight
    norm_bits: int | None  # inputs of LayerNorm and RMSNorm
    act_bits: int | None  # elementwise activations (GELU...) and the gated product of a gated FFN
    act_store: str  # "input": quantise x, recompute f'(x) in backward; "derivative": quantise f'(x)
    qkv_bits: int | None  # Q, K, V as operands of the attention matmuls (probabilities are recomputed)
    pack_dropout: bool  # hidden dropout keep-masks as bits
    group_size: int

    def __post_init__(self):
        for key in ("linear_bits", "norm_bits", "act_bits", "qkv_bits"):
            if getattr(self, key) not in (None, 4, 8):
                raise ValueError(f"{key} must be 4, 8 or None, got {getattr(self, key)}")
        if self.act_store not in ("input", "derivative"):
            raise ValueError(f"act_store must be 'input' or 'derivative', got {self.act_store!r}")
        if self.group_size < 2 or self.group_size % 2:
            raise ValueError(f"group_size must be an even number >= 2, got {self.group_size}")


# --------------------------------------------------------------------- quantisation


def check_bits(bits: int, group_size: int) -> None:
    """The user-facing checks of a compression method's `bits` and `group_size` hyperparameters."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if group_size < 2 or group_size % 2:
        raise ValueError(f"group_size must be an even number >= 2, got {group_size}")


def quantize(x: torch.Tensor, bits: int, group_size: int):
    """x -> (codes uint8, lo fp32 per group, step fp32 per group); round-to-nearest, min-max per group."""
    flat = x.detach().reshape(-1).float()
    pad = (-flat.numel()) % group_size
    if pad:  # repeat the last value so padding never widens the last group's range
        flat = torch.cat([flat, flat[-1:].expand(pad)])
    groups = flat.view(-1, group_size)
    lo = groups.amin(1, keepdim=True)
    levels = 2**bits - 1
    step = (groups.amax(1, keepdim=True) - lo) / levels
    step = torch.where(step > 0, step, torch.ones_like(step))  # a constant group: any step is exact
    codes = torch.round((groups - lo) / step).clamp_(0, levels).to(torch.uint8)
    if bits == 4:
        codes = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return codes, lo.squeeze(1), step.squeeze(1)


def dequantize(codes, lo, step, bits: int, shape, dtype) -> torch.Tensor:
    if bits == 4:
        codes = torch.stack([codes & 15, codes >> 4], dim=-1).reshape(codes.shape[0], -1)
    values = codes.float() * step[:, None] + lo[:, None]
    numel = math.prod(shape)
    return values.reshape(-1)[:numel].reshape(shape).to(dtype)


_SHIFTS = torch.arange(8, dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    flat = mask.reshape(-1).to(torch.uint8)
    flat = F.pad(flat, (0, (-flat.numel()) % 8))
    return (flat.view(-1, 8) << _SHIFTS.to(flat.device)).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape) -> torch.Tensor:
    bits = (packed.unsqueeze(1) >> _SHIFTS.to(packed.device)) & 1
    return bits.reshape(-1)[: math.prod(shape)].reshape(shape).bool()


class Stored:
    """One saved activation, exact or quantised: `tensors` go to save_for_backward, `restore` undoes it."""

    def __init__(self, x: torch.Tensor, bits: int | None, group_size: int, packed=None):
        self.bits, self.shape, self.dtype = bits, tuple(x.shape), x.dtype
        self.tensors = (x,) if bits is None else (packed or quantize(x, bits, group_size))

    def restore(self, tensors) -> torch.Tensor:
        if self.bits is None:
            return tensors[0]
        return dequantize(*tensors, self.bits, self.shape, self.dtype)


def save(ctx, *items: Stored | torch.Tensor | None) -> None:
    """save_for_backward for a mix of Stored activations and plain tensors. The layout left on
    ctx keeps shapes only: a tensor referenced from ctx would outlive backward, unseen by the meter."""
    flat, layout = [], []
    for item in items:
        if isinstance(item, Stored):
            layout.append((item, len(item.tensors)))
            flat.extend(item.tensors)
            item.tensors = ()
        else:
            layout.append((None, 1))
            flat.append(item)
    ctx.layout = layout
    ctx.save_for_backward(*flat)


def load(ctx) -> list:
    tensors, out, i = ctx.saved_tensors, [], 0
    for item, n in ctx.layout:
        part = tensors[i : i + n]
        out.append(item.restore(part) if item is not None else part[0])
        i += n
    return out


# q, k and v read the same input: quantise it once so the three ops save one copy (the
# meter, like memory, counts a shared storage once). Keyed by the tensor object itself, and
# holding weak references only: the codes live exactly as long as some op's saved tensors.
_shared: dict = {}


def quantize_shared(x: torch.Tensor, bits: int, group_size: int):
    key = (bits, group_size)
    hit = _shared.get(key)
    if hit is not None and hit[0]() is x and hit[1] == x._version:
        packed = tuple(ref() for ref in hit[2])
        if all(t is not None for t in packed):
            return packed
    packed = quantize(x, bits, group_size)
    _shared[key] = (weakref.ref(x), x._version, tuple(weakref.ref(t) for t in packed))
    return packed


# --------------------------------------------------------------------- autograd ops


def _weight_grad(g: torch.Tensor, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return (g.reshape(-1, g.shape[-1]).float().t() @ x.reshape(-1, x.shape[-1]).float()).to(like.dtype)


class CompressedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, bits, group_size):
        ctx.x_dtype = x.dtype
        stored = Stored(x, bits, group_size, quantize_shared(x, bits, group_size))
        save(ctx, stored, weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, weight = load(ctx)
        grad_x = (g @ weight.to(g.dtype)).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        grad_w = _weight_grad(g, x, weight) if ctx.needs_input_grad[1] else None
        grad_b = g.reshape(-1, g.shape[-1]).sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None


class CompressedConv1D(torch.autograd.Function):
    """transformers' Conv1D, x @ W + b with W stored (in, out), computed as its own forward does (addmm)."""

    @staticmethod
    def forward(ctx, x, weight, bias, bits, group_size):
        ctx.x_dtype = x.dtype
        stored = Stored(x, bits, group_size, quantize_shared(x, bits, group_size) if bits else None)
        save(ctx, stored, weight)
        out = torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight)
        return out.view(*x.shape[:-1], weight.shape[1])

    @staticmethod
    def backward(ctx, g):
        x, weight = load(ctx)
        grad_x = (g @ weight.to(g.dtype).t()).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        grad_w = _weight_grad(g, x, weight).t() if ctx.needs_input_grad[1] else None
        grad_b = g.reshape(-1, g.shape[-1]).sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None


class CompressedLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, bits, group_size):
        out = F.layer_norm(x, x.shape[-1:], weight, bias, eps)
        xf = x.float()
        mean = xf.mean(-1, keepdim=True)
        rstd = torch.rsqrt(xf.var(-1, unbiased=False, keepdim=True) + eps)
        ctx.x_dtype = x.dtype
        save(ctx, Stored(x, bits, group_size), mean, rstd, weight)
        return out

    @staticmethod
    def backward(ctx, g):
        x, mean, rstd, weight = load(ctx)
        xhat = (x.float() - mean) * rstd
        g = g.float()
        gw = g * weight.float() if weight is not None else g
        grad_x = rstd * (gw - gw.mean(-1, keepdim=True) - xhat * (gw * xhat).mean(-1, keepdim=True))
        lead = tuple(range(g.dim() - 1))
        grad_w = (g * xhat).sum(lead).to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_b = g.sum(lead).to(weight.dtype) if ctx.needs_input_grad[2] else None
        return grad_x.to(ctx.x_dtype), grad_w, grad_b, None, None, None


class CompressedRMSNorm(torch.autograd.Function):
    """y = weight * x / rms(x), the output computed by the norm's own forward (`norm_forward`); saved: x
    quantised, 1/rms(x) exact (one float per row) and the weight."""

    @staticmethod
    def forward(ctx, x, weight, norm_forward, eps, bits, group_size):
        out = norm_forward(x)
        rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
        ctx.x_dtype = x.dtype
        save(ctx, Stored(x, bits, group_size), rstd, weight)
        return out

    @staticmethod
    def backward(ctx, g):
        x, rstd, weight = load(ctx)
        xhat = x.float() * rstd
        g = g.float()
        gw = g * weight.float()
        grad_x = rstd * (gw - xhat * (gw * xhat).mean(-1, keepdim=True))
        lead = tuple(range(g.dim() - 1))
        grad_w = (g * xhat).sum(lead).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return grad_x.to(ctx.x_dtype), grad_w, None, None, None, None


class CompressedActivation(torch.autograd.Function):
    """Any elementwise f: save quantised x (recompute f'(x) in backward) or quantised f'(x)."""

    @staticmethod
    def forward(ctx, x, fn, store, bits, group_size):
        ctx.fn, ctx.store = fn, store
        if store == "derivative":
            y, derivative = _value_and_derivative(fn, x)
            save(ctx, Stored(derivative, bits, group_size))
            return y
        save(ctx, Stored(x, bits, group_size))
        return fn(x)

    @staticmethod
    def backward(ctx, g):
        (saved,) = load(ctx)
        derivative = saved if ctx.store == "derivative" else _value_and_derivative(ctx.fn, saved)[1]
        return g * derivative.to(g.dtype), None, None, None, None


class GatedProduct(torch.autograd.Function):
    """A gated FFN's act(g) * u in one op. store "input": save g and u quantised, recompute act and act' from g
    in backward. store "derivative": save the product's partial derivatives u * act'(g) (for g) and act(g)
    (for u), quantised: all backward needs, and no more tensors than the inputs."""

    @staticmethod
    def forward(ctx, g, u, fn, store, bits, group_size):
        ctx.fn, ctx.store = fn, store
        if store == "derivative":
            value, derivative = _value_and_derivative(fn, g)
            save(ctx, Stored(u.detach() * derivative, bits, group_size), Stored(value, bits, group_size))
            return value * u
        save(ctx, Stored(g, bits, group_size), Stored(u, bits, group_size))
        return fn(g) * u

    @staticmethod
    def backward(ctx, grad):
        first, second = load(ctx)
        if ctx.store == "derivative":
            d_g, d_u = first, second
        else:
            value, derivative = _value_and_derivative(ctx.fn, first)
            d_g, d_u = second * derivative, value
        return grad * d_g.to(grad.dtype), grad * d_u.to(grad.dtype), None, None, None, None


def _value_and_derivative(fn, x):
    """f(x) and f'(x) of an elementwise f by forward-mode AD: no graph, so nothing saved (or counted) twice."""
    x = x.detach()
    return torch.func.jvp(fn, (x,), (torch.ones_like(x),))


class BitDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p):
        keep = torch.empty_like(x).bernoulli_(1 - p)
        ctx.p, ctx.shape = p, tuple(x.shape)
        save(ctx, pack_bits(keep.bool()))
        return x * keep / (1 - p)

    @staticmethod
    def backward(ctx, g):
        (packed,) = load(ctx)
        return g * unpack_bits(packed, ctx.shape).to(g.dtype) / (1 - ctx.p), None


def _masked_scores(q, k, mask, scaling):
    scores = torch.matmul(q, k.transpose(-1, -2)) * scaling
    if mask is None:
        return scores
    if mask.dtype == torch.bool:  # True = attend
        return scores.masked_fill(~mask, float("-inf"))
    return scores + mask


# Every layer reads the same mask object: compact it once, hold it weakly (as quantize_shared does).
_compact_masks: dict = {}


def compact_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """What backward needs of the attention mask, small: a padding mask is the same for every query
    row, so one row per sequence (B x 1 x 1 x keys) stands for all of them; any other is kept whole."""
    if mask is None or mask.dim() != 4 or mask.shape[2] == 1:
        return mask
    hit = _compact_masks.get("last")
    if hit is not None and hit[0]() is mask and hit[1] == mask._version and hit[2]() is not None:
        return hit[2]()
    first_row = mask[:, :, :1]
    compact = first_row.clone() if torch.equal(mask, first_row.expand_as(mask)) else mask
    _compact_masks["last"] = (weakref.ref(mask), mask._version, weakref.ref(compact))
    return compact


def _dropout_keep(shape, p: float, seed: int, device) -> torch.Tensor:
    """The attention-dropout keep-mask drawn from `seed`: the same mask in forward and in backward."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return torch.empty(shape, device=device).bernoulli_(1 - p, generator=generator).bool()


def _causal_mask(q_len: int, k_len: int, device) -> torch.Tensor:
    """True where a query may attend: keys up to its own position (the last q_len of k_len, as SDPA's is_causal
    aligns them when k_len > q_len)."""
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)


def _probabilities(q, k, mask, scaling, p, seed, causal=False):
    """softmax(QK^T * scaling + mask) in fp32, and the same after dropout (the two are one tensor if p == 0)."""
    if causal:
        mask = _causal_mask(q.shape[-2], k.shape[-2], q.device)
    probs = torch.softmax(_masked_scores(q.float(), k.float(), mask, scaling), dim=-1)
    if p == 0:
        return probs, probs
    return probs, probs * _dropout_keep(probs.shape, p, seed, probs.device) / (1 - p)


def _repeat_heads(x: torch.Tensor, repeats: int) -> torch.Tensor:
    """Grouped-query attention: each of K's or V's heads serves `repeats` consecutive query heads (Hugging
    Face's repeat_kv)."""
    return x if repeats == 1 else x.repeat_interleave(repeats, dim=1)


def _sum_heads(grad: torch.Tensor, repeats: int) -> torch.Tensor:
    """The gradient of `_repeat_heads`: the query heads' gradients summed back onto the K/V head they share."""
    if repeats == 1:
        return grad
    b, h, *rest = grad.shape
    return grad.view(b, h // repeats, repeats, *rest).sum(2)


class CompressedAttention(torch.autograd.Function):
    """softmax(QK^T * scaling + mask), dropout, @V in one op. Saved: Q, K, V (quantised per the
    policy) and the mask; the probabilities are recomputed in backward from the restored Q and K,
    and the dropout mask is redrawn from its seed, as fused attention kernels do. K and V may have
    fewer heads than Q (grouped-query attention): they are saved so and repeated inside. `causal`
    (with no mask) masks future keys inside, saving nothing for it."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scaling, p, policy, causal=False):
        # The seed comes from the global generator, so a seeded run draws the same masks.
        seed = int(torch.randint(0, 2**62, (1,)).item()) if p > 0 else 0
        repeats = q.shape[1] // k.shape[1]
        _, dropped = _probabilities(q, _repeat_heads(k, repeats), mask, scaling, p, seed, causal)
        out = torch.matmul(dropped.to(v.dtype), _repeat_heads(v, repeats))
        ctx.scaling, ctx.p, ctx.seed, ctx.dtypes = scaling, p, seed, (q.dtype, k.dtype, v.dtype)
        ctx.repeats, ctx.causal = repeats, causal
        g = policy.group_size
        save(
            ctx,
            Stored(q, policy.qkv_bits, g),
            Stored(k, policy.qkv_bits, g),
            Stored(v, policy.qkv_bits, g),
            compact_mask(mask),
        )
        return out

    @staticmethod
    def backward(ctx, g_out):
        q, k, v, mask = load(ctx)
        k, v = _repeat_heads(k, ctx.repeats), _repeat_heads(v, ctx.repeats)
        probs, dropped = _probabilities(q, k, mask, ctx.scaling, ctx.p, ctx.seed, ctx.causal)
        g_out = g_out.float()
        grad_v = torch.matmul(dropped.transpose(-1, -2), g_out)
        grad_dropped = torch.matmul(g_out, v.float().transpose(-1, -2))
        grad_probs = grad_dropped if ctx.p == 0 else grad_dropped * (dropped != 0) / (1 - ctx.p)
        grad_scores = probs * (grad_probs - (grad_probs * probs).sum(-1, keepdim=True)) * ctx.scaling
        grad_q = torch.matmul(grad_scores, k.float())
        grad_k = torch.matmul(grad_scores.transpose(-1, -2), q.float())
        grad_k, grad_v = _sum_heads(grad_k, ctx.repeats), _sum_heads(grad_v, ctx.repeats)
        q_dtype, k_dtype, v_dtype = ctx.dtypes
        return grad_q.to(q_dtype), grad_k.to(k_dtype), grad_v.to(v_dtype), None, None, None, None, None


# --------------------------------------------------------------------- installing the ops


def _attention_function(policy: Policy):
    """An AttentionInterface function: the compressed op when a graph is built, SDPA otherwise."""

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, is_causal=None, **kwargs):
        scaling = query.size(-1) ** -0.5 if scaling is None else scaling
        # as transformers' SDPA attention: causal when the module is and no mask was built (no padding)
        is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
        causal = bool(is_causal) and attention_mask is None and query.shape[2] > 1
        if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
            out = CompressedAttention.apply(query, key, value, attention_mask, scaling, dropout, policy, causal)
        else:
            repeats = query.shape[1] // key.shape[1]
            out = F.scaled_dot_product_attention(
                query,
                _repeat_heads(key, repeats),
                _repeat_heads(value, repeats),
                attn_mask=attention_mask,
                dropout_p=dropout,
                scale=scaling,
                is_causal=causal,
            )
        return out.transpose(1, 2).contiguous(), None

    return attention


def _set_attention(model: nn.Module, policy: Policy) -> bool:
    """Register the compressed attention under a name that encodes the policy and switch the model to it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    name = f"compressed_q{policy.qkv_bits or 32}_g{policy.group_size}"
    AttentionInterface.register(name, _attention_function(policy))
    AttentionMaskInterface.register(name, sdpa_mask)  # boolean (1 byte a pair), or None without padding
    top = transformers_model(model)
    if top is None:
        return False
    top.set_attn_implementation(name)
    return top.config._attn_implementation == name


def _conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


def _probe(width: int, like: torch.Tensor, rows: int = 3) -> torch.Tensor:
    """A fixed input of `rows` x `width` values of varied size and sign, drawn from no generator (so installing
    changes no run's random numbers)."""
    steps = torch.arange(rows * width, dtype=torch.float32, device=like.device)
    return (torch.sin(steps * 0.7) * (1 + steps % 5)).reshape(rows, width).to(like.dtype)


def _with_values(module: nn.Module) -> nn.Module:
    """`module`, or for a plan's module of fake tensors (harness.plan) a copy holding real, fixed values: a probe
    asks what the module's code computes, which the code decides and the values of its weights do not. The copy
    is shallow but for its children and tensors (a deep copy of fake tensors outside their mode is unsafe)."""
    if not any(is_fake(t) for t in (*module.parameters(), *module.buffers())):
        return module

    def real(t: torch.Tensor | None):
        if t is None:
            return None
        values = _probe(t.numel(), torch.empty(0, dtype=t.dtype), rows=1).reshape(t.shape)
        return nn.Parameter(values, t.requires_grad) if isinstance(t, nn.Parameter) else values

    copied = copy.copy(module)
    copied._parameters = {name: real(t) for name, t in module._parameters.items()}
    copied._buffers = {name: real(t) for name, t in module._buffers.items()}
    copied._modules = {name: _with_values(child) for name, child in module._modules.items()}
    return copied


def _rms_eps(module: nn.Module) -> float | None:
    """The epsilon of an RMSNorm whose forward is weight * x / sqrt(mean(x^2) + eps) (checked on a probe input),
    else None: another form (Gemma's (1 + weight)) gets no compressed backward."""
    weight = getattr(module, "weight", None)
    if norm_kind(module) != "rmsnorm" or not isinstance(weight, nn.Parameter) or weight.dim() != 1:
        return None
    if "forward" in vars(module) or weight.is_meta:  # swapped already (its forward is not its class's), or no data
        return None
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    eps = torch.finfo(weight.dtype).eps if eps is None else float(eps)
    with unset_fake_temporarily():  # a plan's module is probed through a copy with values, outside the fake mode
        return _rms_probe(_with_values(module), eps)


def _rms_probe(module: nn.Module, eps: float) -> float | None:
    weight = module.weight
    x = _probe(weight.shape[0], weight)
    with torch.no_grad():
        try:
            out = type(module).forward(module, x)  # the class's forward: what the patched one computes
        except Exception:  # a norm that wants more than one tensor is no plain RMSNorm
            return None
        xf = x.float()
        expected = weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    same = isinstance(out, torch.Tensor) and out.shape == expected.shape
    return eps if same and torch.allclose(out.float(), expected.float(), rtol=1e-4, atol=1e-5) else None


def _gated_ffns(model: nn.Module) -> list[tuple[nn.Module, tuple[str, str, str, str], tuple[slice, slice] | None]]:
    """(ffn module, names of its gate, up, down and activation children, and where gate and up lie in the output
    of a fused gate/up layer (Phi-3's), else None) of each block whose FFN computes down(act(gate(x)) * up(x)),
    found through harness.anatomy and checked on a probe input; [] for a model harness.anatomy does not
    describe."""
    model = transformers_model(model) or model  # also inside a wrapper (peft's, when stacked after LoRA)
    try:
        blocks = describe(model).blocks
    except (ValueError, AttributeError):  # not a transformers model with a head (a bare module in a test)
        return []
    found, verdicts = [], {}  # a plan's verdict per FFN class and layout: its copies with values cost memory
    for block in blocks:
        if not block.gated:
            continue
        gate, up, down = (block.projections[r] for r in ("ffn_gate", "ffn_in", "ffn_out"))
        fused = gate.fused is not None and gate.fused is up.fused
        if (gate.fused is not None or up.fused is not None) and not fused:
            continue
        try:
            parts = (gate.part, up.part) if fused else None
        except ValueError:  # the two halves interleaved: no slice of the output holds one of them
            continue
        paths = [gate.path, up.path, down.path]
        parent = paths[0].rpartition(".")[0]
        if any(p.rpartition(".")[0] != parent for p in paths) or "forward" in vars(model.get_submodule(parent)):
            continue
        ffn = model.get_submodule(parent)
        activations = [name for name, c in ffn.named_children() if is_activation(c)]
        weight = _probe_like(ffn)
        if len(activations) != 1 or weight.is_meta:
            continue
        names = (*(p.rpartition(".")[2] for p in paths), activations[0])
        if is_fake(weight):
            layout = (type(ffn), names, parts, tuple((n, t.shape) for n, t in ffn.named_parameters()))
            if layout not in verdicts:
                with unset_fake_temporarily():  # the copy's values and the probe are real
                    verdicts[layout] = _computes_gated(_with_values(ffn), names, parts, up.in_features)
            gated = verdicts[layout]
        else:
            gated = _computes_gated(ffn, names, parts, up.in_features)
        if gated:
            found.append((ffn, names, parts))
    return found


def _probe_like(ffn: nn.Module) -> torch.Tensor:
    """A floating weight, which gives the probe its dtype; bitsandbytes' packed weights are integers, computed
    in bf16."""
    weight = next((p for p in ffn.parameters() if p.is_floating_point()), None)
    return weight if weight is not None else torch.empty(0, dtype=torch.bfloat16, device=next(ffn.parameters()).device)


def _computes_gated(ffn: nn.Module, names, parts, width: int) -> bool:
    """Whether the FFN's own forward gives down(act(gate(x)) * up(x)) on a probe input, to the bit."""
    x = _probe(width, _probe_like(ffn))
    with torch.no_grad():
        return torch.equal(type(ffn).forward(ffn, x), _gated_ffn(ffn, names, parts, x, None, None, None))


def _gated_ffn(ffn: nn.Module, names, parts, x, store, bits, group_size):
    """down(act(gate(x)) * up(x)), the product compressed when `bits` is set and a graph is built. `parts`: the
    gate's and the up projection's features in one fused layer's output. The activation's class forward, since
    install may swap the module's own for a compressed one."""
    gate, up, down, act = (getattr(ffn, name) for name in names)
    if parts is None:
        g, u = gate(x), up(x)
    else:
        both = gate(x)
        g, u = both[..., parts[0]], both[..., parts[1]]
    act_fn = functools.partial(type(act).forward, act)
    if bits and torch.is_grad_enabled() and (g.requires_grad or u.requires_grad):
        return down(GatedProduct.apply(g, u, act_fn, store, bits, group_size))
    return down(act_fn(g) * u)


def _patch(module: nn.Module, forward) -> None:
    module.forward = types.MethodType(forward, module)


def _linear_forward(bits, group_size):
    def forward(self, x):
        if torch.is_grad_enabled() and self.weight.requires_grad:
            return CompressedLinear.apply(x, self.weight, self.bias, bits, group_size)
        return F.linear(x, self.weight, self.bias)  # a frozen weight needs no saved input

    return forward


def _conv1d_forward(bits, group_size):
    def forward(self, x):
        if torch.is_grad_enabled() and self.weight.requires_grad:
            return CompressedConv1D.apply(x, self.weight, self.bias, bits, group_size)
        return type(self).forward(self, x)  # a frozen weight needs no saved input

    return forward


def _norm_forward(bits, group_size):
    def forward(self, x):
        params = [t for t in (x, self.weight, self.bias) if t is not None]
        if torch.is_grad_enabled() and any(t.requires_grad for t in params):
            return CompressedLayerNorm.apply(x, self.weight, self.bias, self.eps, bits, group_size)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    return forward


def _rms_norm_forward(eps, bits, group_size):
    def forward(self, x):
        # the class's forward, looked up on self: a deep copy of the model then uses the copy's weight
        own = functools.partial(type(self).forward, self)
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return CompressedRMSNorm.apply(x, self.weight, own, eps, bits, group_size)
        return own(x)

    return forward


def _gated_ffn_forward(names, parts, store, bits, group_size):
    def forward(self, x):
        return _gated_ffn(self, names, parts, x, store, bits, group_size)

    return forward


def _activation_forward(original, store, bits, group_size):
    def forward(self, x):
        if torch.is_grad_enabled() and x.requires_grad:
            return CompressedActivation.apply(x, original, store, bits, group_size)
        return original(x)

    return forward


def _dropout_forward(self, x):
    if self.training and self.p > 0 and torch.is_grad_enabled() and x.requires_grad:
        return BitDropout.apply(x, self.p)
    return F.dropout(x, self.p, self.training, self.inplace)


def install(model: nn.Module, policy: Policy) -> dict:
    """Swap compressed ops into `model` in place; returns how many modules of each kind were covered."""
    counts = {
        "linear": 0,
        "conv1d": 0,
        "layernorm": 0,
        "rmsnorm": 0,
        "activation": 0,
        "gated_ffn": 0,
        "dropout": 0,
        "attention": 0,
    }
    if policy.act_bits:
        for ffn, names, parts in _gated_ffns(model):
            _patch(ffn, _gated_ffn_forward(names, parts, policy.act_store, policy.act_bits, policy.group_size))
            counts["gated_ffn"] += 1
    conv1d = _conv1d_class()
    for module in model.modules():
        kind = type(module)
        if policy.linear_bits and isinstance(module, nn.Linear) and kind.forward is nn.Linear.forward:
            _patch(module, _linear_forward(policy.linear_bits, policy.group_size))
            counts["linear"] += 1
        elif policy.linear_bits and conv1d is not None and kind is conv1d and isinstance(module.bias, torch.Tensor):
            _patch(module, _conv1d_forward(policy.linear_bits, policy.group_size))
            counts["conv1d"] += 1
        elif (
            policy.norm_bits
            and isinstance(module, nn.LayerNorm)
            and kind.forward is nn.LayerNorm.forward
            and len(module.normalized_shape) == 1
        ):
            _patch(module, _norm_forward(policy.norm_bits, policy.group_size))
            counts["layernorm"] += 1
        elif policy.norm_bits and (eps := _rms_eps(module)) is not None:
            _patch(module, _rms_norm_forward(eps, policy.norm_bits, policy.group_size))
            counts["rmsnorm"] += 1
        elif policy.act_bits and is_activation(module):
            _patch(module, _activation_forward(module.forward, policy.act_store, policy.act_bits, policy.group_size))
            counts["activation"] += 1
        elif policy.pack_dropout and isinstance(module, nn.Dropout) and kind.forward is nn.Dropout.forward:
            _patch(module, _dropout_forward)
            counts["dropout"] += 1
    if _set_attention(model, policy):
        counts["attention"] = 1
    return counts
