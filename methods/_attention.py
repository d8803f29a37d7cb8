"""One transformer block computed for chosen query rows, reading given keys and values.

Shared by the methods that run part of a block's rows apart from the others:
VQT (learnable queries read a frozen layer's keys and values) and TokenTune
(the selected tokens with a graph, the others without). Both need what a
block's own forward cannot give: queries that are not the rows the keys and
values come from. `QueryRows(anatomy, block)` rebuilds the block from the roles
harness.anatomy found, so no family's module names appear here:

    pre-norm:  y = x + drop(o(attention(q(n1(x)), K, V)));  out = y + drop(ffn(n2(y)))
    post-norm: y = n1(x + drop(o(attention(q(x), K, V))));  out = n2(y + drop(ffn(y)))

with ffn(x) = out(act(in(x))), or out(act(gate(x)) * in(x)) for gated MLPs;
fused projections (GPT-2's c_attn, Phi-3's qkv_proj and gate_up_proj) are
split by the anatomy's layout. Attention runs through the model's configured
attention function (sdpa, a registered one such as activation compression's,
or eager maths here), with grouped-query heads repeated as transformers does
and rotary position embeddings (Llama's rotate-half form) applied to the rows
whose positions are given.

`unsupported(anatomy)` says why a backbone's blocks cannot be rebuilt so:
attention with scores of its own (DeBERTa's relative-position terms), a block
with other than two norms, an FFN without one activation module, rotary
embeddings on part of the head only.
"""

import torch
from torch import nn

from harness.anatomy import Anatomy, Block, Projection, is_activation

_ATTENTION_DROPOUT = ("attention_dropout", "attn_dropout", "dropout", "dropout_prob")


def _attention_dropout(attention: nn.Module) -> float:
    """The attention probabilities' dropout, as the attention module keeps it: a Dropout child (BERT, GPT-2,
    DistilBERT) or a float attribute (Llama, ViT)."""
    for name in _ATTENTION_DROPOUT:
        value = getattr(attention, name, None)
        if isinstance(value, nn.Dropout):
            return value.p
        if isinstance(value, float):
            return value
    return 0.0


def _dropout_after(anatomy: "Anatomy", block: "Block", role: str) -> nn.Module | None:
    """The Dropout applied to `role`'s output: the one Dropout beside it in its own sub-module (BERT's and ViT's
    output modules, GPT-2's and DistilBERT's MLP), or GPT-2's resid_dropout when o sits in the attention module
    itself; None when the block has none there (Llama, DistilBERT's attention)."""
    parent = _parent(anatomy, block.projections[role].path)
    if parent is block.attention.module:
        found = getattr(parent, "resid_dropout", None)
        return found if isinstance(found, nn.Dropout) else None
    found = [c for c in parent.children() if isinstance(c, nn.Dropout)]
    return found[0] if len(found) == 1 else None


def _parent(anatomy: Anatomy, path: str) -> nn.Module:
    """The module holding the one at `path` (a path from the model top, inside its base model)."""
    parent = path.rpartition(".")[0]
    if anatomy.base.path:
        parent = parent[len(anatomy.base.path) + 1 :]
    return anatomy.base.module.get_submodule(parent)


def _activation(anatomy: Anatomy, block: Block) -> nn.Module | None:
    """The one activation module beside the FFN's up projection (or, failing that, beside its down projection)."""
    for role in ("ffn_in", "ffn_out"):
        parent = _parent(anatomy, block.projections[role].path)
        found = [c for c in parent.children() if is_activation(c)]
        if len(found) == 1:
            return found[0]
    return None


def unsupported(anatomy: Anatomy) -> str | None:
    """Why QueryRows cannot rebuild this backbone's blocks; None when it can."""
    block = anatomy.blocks[0]
    model = anatomy.base.module
    config = getattr(model, "config", None)
    attention = block.attention.module
    if not isinstance(getattr(attention, "scaling", None), float):
        return (
            f"{type(attention).__name__} computes attention scores its own way (no `scaling`, as attention "
            "dispatched through transformers' attention interface has; DeBERTa adds relative-position terms), "
            "so its queries cannot be run apart from its keys"
        )
    if len(block.norms) != 2:
        return f"{type(block.module).__name__} has {len(block.norms)} norms, not one before (or after) each sublayer"
    if _activation(anatomy, block) is None:
        return f"no single activation module found in the FFN of {type(block.module).__name__}"
    if config is not None and getattr(config, "partial_rotary_factor", 1.0) not in (None, 1.0):
        return "rotary embeddings on part of each head only (partial_rotary_factor) are not rebuilt"
    return None


def _project(projection: Projection, x: torch.Tensor) -> torch.Tensor:
    """`projection`'s role from x: the module's output, or this role's features of a fused layer's output."""
    out = projection.module(x)
    return out if projection.fused is None else out[..., projection.indices]


def heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(batch, length, n x head_dim) -> (batch, n, length, head_dim)."""
    return x.view(*x.shape[:2], x.shape[-1] // head_dim, head_dim).transpose(1, 2)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate(x: torch.Tensor, rotary) -> torch.Tensor:
    """Rotary position embedding (cos, sin), each (batch, length, head_dim), on x (batch, heads, length,
    head_dim); x unchanged when `rotary` is None."""
    if rotary is None:
        return x
    cos, sin = (t.unsqueeze(1).to(x.dtype) for t in rotary)
    return x * cos + _rotate_half(x) * sin


def eager_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """softmax(q k^T * scaling + mask) v, the attention function of transformers' own eager paths; the mask
    boolean (True: attend) or additive; grouped-query keys and values repeated to the query heads."""
    repeats = query.shape[1] // key.shape[1]
    if repeats > 1:
        key, value = key.repeat_interleave(repeats, dim=1), value.repeat_interleave(repeats, dim=1)
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        scores = (
            scores.masked_fill(~attention_mask, float("-inf"))
            if attention_mask.dtype == torch.bool
            else scores + attention_mask
        )
    probs = nn.functional.dropout(torch.softmax(scores, -1), dropout, training=dropout > 0)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


def attention_function(config):
    """The attention function the model is configured with (`config._attn_implementation`), else eager."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    implementation = getattr(config, "_attn_implementation", None)
    if implementation in (None, "eager"):
        return eager_attention
    return ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention)


def rows_mask(key_valid: torch.Tensor, rows: int, query_positions=None, key_positions=None) -> torch.Tensor:
    """(batch, 1, rows, length) boolean, True where a query row may attend: every real key, or with positions
    given (causal attention) the real keys at or before the query's position."""
    mask = key_valid[:, None, None, :].to(torch.bool)
    if query_positions is None:
        return mask.expand(-1, -1, rows, -1)
    return mask & (key_positions[:, None, None, :] <= query_positions[:, None, :, None])


class QueryRows:
    """A block of the backbone, rebuilt from its roles: keys and values of some rows, the block's output for
    other rows reading them."""

    def __init__(self, anatomy: Anatomy, block: Block):
        reason = unsupported(anatomy)
        if reason is not None:
            raise ValueError(reason)
        model = anatomy.base.module
        self.block, self.attention = block, block.attention.module
        self.config = model.config
        self.pre_norm = block.norm_order == "pre"
        self.norm1, self.norm2 = (n.module for n in block.norms)
        self.act = _activation(anatomy, block)
        self.attention_dropout = _dropout_after(anatomy, block, "o")
        self.ffn_dropout = _dropout_after(anatomy, block, "ffn_out")

    @staticmethod
    def _dropout(x: torch.Tensor, dropout: nn.Module | None) -> torch.Tensor:
        return x if dropout is None else dropout(x)

    def attention_input(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm1(hidden) if self.pre_norm else hidden

    def keys_values(self, hidden: torch.Tensor, rotary=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values (batch, kv heads, length, head_dim) the block computes from `hidden`, its input."""
        x = self.attention_input(hidden)
        p = self.block.projections
        d = self.block.head_dim
        return rotate(heads(_project(p["k"], x), d), rotary), heads(_project(p["v"], x), d)

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        p = self.block.projections
        up = self.act(_project(p["ffn_in"], x)) if "ffn_gate" not in p else None
        if up is None:
            up = self.act(_project(p["ffn_gate"], x)) * _project(p["ffn_in"], x)
        return p["ffn_out"].module(up)

    def __call__(self, rows: torch.Tensor, keys, values, mask, rotary=None) -> torch.Tensor:
        """The block's output for `rows` (batch, R, width), its input there, attending to `keys` and `values`
        under `mask` (rows_mask's, or None); `rotary` the rows' (cos, sin), if the model has them."""
        x = self.attention_input(rows)
        query = rotate(heads(_project(self.block.projections["q"], x), self.block.head_dim), rotary)
        if mask is not None and getattr(self.config, "_attn_implementation", None) in (None, "eager"):
            mask = torch.zeros(mask.shape, dtype=rows.dtype, device=rows.device).masked_fill(
                ~mask, torch.finfo(rows.dtype).min
            )
        context, _ = attention_function(self.config)(
            self.attention,
            query,
            keys,
            values,
            mask,
            scaling=self.attention.scaling,
            dropout=_attention_dropout(self.attention) if self.block.module.training else 0.0,
        )
        output = self.block.projections["o"].module(context.reshape(*rows.shape[:2], -1))
        attended = self._dropout(output, self.attention_dropout)
        if self.pre_norm:
            y = rows + attended
            return y + self._dropout(self.ffn(self.norm2(y)), self.ffn_dropout)
        y = self.norm1(attended + rows)
        return self.norm2(self._dropout(self.ffn(y), self.ffn_dropout) + y)
