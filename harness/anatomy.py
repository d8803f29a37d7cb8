"""A backbone's anatomy, found once per model from the model itself.

`describe(model)` walks a transformers model with a task head (the
`...ForSequenceClassification` classes, `ViTForImageClassification`) and says
where its parts are: the input embeddings, the ordered transformer blocks, in
each block the attention projections by role (q, k, v, o, or one fused
projection and how its output splits), the FFN projections (ffn_in, ffn_gate,
ffn_out, or a fused gate/up), the norms (LayerNorm or RMSNorm) and whether the
block normalises before or after its sublayers, the head counts (grouped-query
attention included), whether attention is causal, and where the head reads.

Methods ask by role, never by one architecture's module names:

    anatomy = describe(model)
    for path, module in anatomy.projections("v"): ...

How parts are found. Module types and shapes decide, names are only hints:
- linear-like layers are `nn.Linear`, transformers' `Conv1D` (weight stored
  transposed) and wrappers that keep the original as `base_layer` (peft);
- the blocks are the longest `nn.ModuleList` of one class under the base model
  whose members hold linear layers;
- q, k, v are three linear layers of one parent reading the hidden size (k and
  v of equal width), or one fused layer whose width is (heads + 2 kv heads) x
  head dim; o maps heads x head dim back to the hidden size inside the same
  attention sublayer; the FFN's down projection is its last layer writing the
  hidden size, whose input width is the intermediate size, and the up (and
  gate, for gated MLPs) projections read the hidden size and write that width;
- names such as `query`, `q_proj`, `c_attn`, `gate_proj` break ties between
  layers of the same shape, with registration order as the last resort;
- a stack with a final norm after its blocks is pre-norm (a post-norm stack's
  output is already normalised and has none).
A layout none of this fits raises a ValueError that says what was not found.
Nothing runs a forward pass, so a model on the meta device is described too.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch
from torch import nn

ROLES = ("q", "k", "v", "o", "ffn_in", "ffn_gate", "ffn_out")
READS = ("first", "last", "pooler")

# Today's BERT names (the short names suites use, and paths inside one BERT layer) -> role.
ALIASES = MappingProxyType(
    {
        "query": "q",
        "key": "k",
        "value": "v",
        "attention.self.query": "q",
        "attention.self.key": "k",
        "attention.self.value": "v",
        "attention_output": "o",
        "attention.output.dense": "o",
        "intermediate": "ffn_in",
        "intermediate.dense": "ffn_in",
        "output": "ffn_out",
        "output.dense": "ffn_out",
    }
)

# Leaf names that hint at a role; they only break ties between layers of the right shape.
_HINTS = {
    "q": {"query", "q_proj", "q_lin", "q", "wq", "query_proj", "to_q", "q_linear"},
    "k": {"key", "k_proj", "k_lin", "k", "wk", "key_proj", "to_k", "k_linear"},
    "v": {"value", "v_proj", "v_lin", "v", "wv", "value_proj", "to_v", "v_linear"},
    "qkv": {"c_attn", "qkv_proj", "qkv", "wqkv", "query_key_value", "in_proj", "qkv_linear"},
    "o": {"o_proj", "out_proj", "out_lin", "c_proj", "dense", "wo", "o", "out", "proj", "to_out", "o_linear"},
    "ffn_gate": {"gate_proj", "gate", "w1", "wi_0", "fc_gate"},
    "final_norm": {"ln_f", "norm_f", "final_layer_norm", "final_layernorm", "final_norm"},
}


def alias_to_role(name: str) -> str:
    """A role, or today's BERT name for one (`query`, `attention.output.dense`, ...) -> the role."""
    if name in ROLES:
        return name
    if name in ALIASES:
        return ALIASES[name]
    raise ValueError(f"unknown role or alias '{name}'; roles: {', '.join(ROLES)}; aliases: {', '.join(ALIASES)}")


# ---------------------------------------------------------------- linear-like layers and norms


def _conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


def transformers_model(module: nn.Module) -> nn.Module | None:
    """The outermost transformers model inside `module` (itself, or under a wrapper such as peft's), else None."""
    from transformers import PreTrainedModel

    return next((m for m in module.modules() if isinstance(m, PreTrainedModel)), None)


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, transformers' Conv1D, or a wrapper (peft) holding one as `base_layer`."""
    conv1d = _conv1d_class()
    if isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d)):
        return True
    base = getattr(module, "base_layer", None)
    return isinstance(base, nn.Module) and base is not module and is_linear(base)


def in_out_features(module: nn.Module) -> tuple[int, int]:
    """(in, out) features of a linear-like layer; Conv1D stores its weight as (in, out)."""
    conv1d = _conv1d_class()
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if conv1d is not None and isinstance(module, conv1d):
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    base = getattr(module, "base_layer", None)
    if isinstance(base, nn.Module) and base is not module and is_linear(base):
        return in_out_features(base)
    raise ValueError(f"{type(module).__name__} is not a linear-like layer (nn.Linear or Conv1D)")


def out_axis(module: nn.Module) -> int:
    """The weight axis that holds the output features: 0 for nn.Linear, 1 for Conv1D."""
    conv1d = _conv1d_class()
    base = module
    while not isinstance(base, nn.Linear) and not (conv1d is not None and isinstance(base, conv1d)):
        base = getattr(base, "base_layer", None)
        if base is None:
            raise ValueError(f"{type(module).__name__} is not a linear-like layer (nn.Linear or Conv1D)")
    return 1 if conv1d is not None and isinstance(base, conv1d) else 0


def is_activation(module: nn.Module) -> bool:
    """An FFN's elementwise activation module: torch's GELU/ReLU/SiLU/Mish or one of transformers.activations
    (not nn.Tanh, which is BERT's pooler's)."""
    if isinstance(module, (nn.GELU, nn.ReLU, nn.SiLU, nn.Mish)):
        return True
    return type(module).__module__ == "transformers.activations"


def norm_kind(module: nn.Module) -> str | None:
    """'rmsnorm', 'layernorm', or None for a module that is no norm."""
    name = type(module).__name__.lower()
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    has_eps = hasattr(module, "variance_epsilon")
    if isinstance(module, getattr(nn, "RMSNorm", ())) or "rmsnorm" in name:
        return "rmsnorm"
    if isinstance(module, nn.LayerNorm) or name.endswith("layernorm"):
        # T5's LayerNorm is an RMSNorm: a scale, no bias, no mean subtracted
        return "rmsnorm" if has_eps and bias is None and not isinstance(module, nn.LayerNorm) else "layernorm"
    if isinstance(weight, torch.Tensor) and weight.dim() == 1 and bias is None and has_eps:
        return "rmsnorm"
    return None


# ---------------------------------------------------------------- the description


@dataclass(frozen=True, eq=False)
class Located:
    """A module and its path relative to the model given to describe()."""

    path: str
    module: nn.Module = field(repr=False)

    def __iter__(self) -> Iterator:
        yield self.path
        yield self.module


@dataclass(frozen=True, eq=False)
class Norm(Located):
    kind: str = "layernorm"  # 'layernorm' | 'rmsnorm'

    @property
    def has_bias(self) -> bool:
        return isinstance(getattr(self.module, "bias", None), torch.Tensor)


@dataclass(frozen=True, eq=False)
class Fused(Located):
    """One linear layer computing several roles, and how its output splits into them.

    layout 'concat': the roles' outputs one after another, in `roles` order (GPT-2's c_attn as q|k|v, Phi-3's
    qkv_proj, Phi-3's gate_up_proj as gate|up). layout 'grouped': `groups` repeats of every role's share in turn,
    for attention one group per kv head of [heads/kv q heads, one k head, one v head] (GPT-NeoX, BLOOM and Falcon's
    query_key_value; with one group it is 'concat').
    """

    roles: tuple[str, ...] = ()
    sizes: tuple[int, ...] = ()  # output features of each role, in all
    layout: str = "concat"
    groups: int = 1

    def indices(self, role: str) -> list[int]:
        """The output features of `role` (along weight axis `out_axis(module)`), in order."""
        if role not in self.roles:
            raise ValueError(f"fused layer {self.path} computes {', '.join(self.roles)}, not '{role}'")
        shares = [size // self.groups for size in self.sizes]
        width, start = sum(shares), sum(shares[: self.roles.index(role)])
        share = shares[self.roles.index(role)]
        return [g * width + start + i for g in range(self.groups) for i in range(share)]

    def part(self, role: str) -> slice:
        """The output features of `role` as one slice; a ValueError for a grouped layout (use indices())."""
        found = self.indices(role)
        if found != list(range(found[0], found[-1] + 1)):
            raise ValueError(f"fused layer {self.path} interleaves {', '.join(self.roles)}: use indices('{role}')")
        return slice(found[0], found[-1] + 1)


@dataclass(frozen=True, eq=False)
class Projection(Located):
    """One role's projection. Iterates as (path, module); `fused` is set when the module computes other roles too."""

    role: str = ""
    in_features: int = 0
    out_features: int = 0  # of this role (its part of a fused layer's output)
    fused: Fused | None = None

    @property
    def part(self) -> slice | None:
        """This role's output features within a fused layer as a slice; None when the layer is this role's alone."""
        return None if self.fused is None else self.fused.part(self.role)

    @property
    def indices(self) -> list[int] | None:
        """This role's output features within a fused layer, any layout; None when the layer is this role's alone."""
        return None if self.fused is None else self.fused.indices(self.role)


@dataclass(frozen=True, eq=False)
class Block:
    index: int
    path: str
    module: nn.Module = field(repr=False)
    attention: Located  # the module computing attention from q, k, v (their smallest common parent)
    projections: Mapping[str, Projection] = field(repr=False)
    norms: tuple[Norm, ...]  # in registration order: for the usual two, attention's then the FFN's
    norm_order: str  # 'pre' | 'post'
    num_heads: int
    num_kv_heads: int
    head_dim: int

    def projection(self, role: str) -> Projection | None:
        return self.projections.get(alias_to_role(role))

    @property
    def gated(self) -> bool:
        return "ffn_gate" in self.projections

    @property
    def fused(self) -> tuple[Fused, ...]:
        seen: dict[int, Fused] = {}
        for p in self.projections.values():
            if p.fused is not None:
                seen.setdefault(id(p.fused), p.fused)
        return tuple(seen.values())


@dataclass(frozen=True, eq=False)
class Embeddings:
    input: Located  # model.get_input_embeddings(): token embedding, or ViT's patch embedding
    block: Located | None  # the module holding it with positions, norm, ... (BERT's `embeddings`), if any
    norms: tuple[Norm, ...] = ()


@dataclass(frozen=True, eq=False)
class Head:
    modules: tuple[Located, ...]  # the task head: the model's children outside the base model
    input: Located  # the head's first linear layer, whose input is the pooled representation
    # 'first' token, 'last' real token, the 'pooler' output (a pooling of no known position), or 'every' position
    # (a causal LM's head, its output embeddings: pretrained, so not a task head to train)
    reads: str
    pooler: Located | None = None  # BERT's pooler, DeBERTa's ContextPooler, ...
    pooler_in_backbone: bool = False  # the pooler belongs to the base model (BERT) rather than the head


@dataclass(frozen=True, eq=False)
class Anatomy:
    family: str  # config.model_type
    causal: bool
    hidden_size: int
    base: Located  # model.base_model ('' when the model is its own base)
    embeddings: Embeddings
    blocks_path: str
    blocks: tuple[Block, ...] = field(repr=False)
    final_norm: Norm | None  # after the last block, in pre-norm stacks
    head: Head

    @property
    def norm_order(self) -> str:
        return self.blocks[0].norm_order

    @property
    def num_heads(self) -> int:
        return self.blocks[0].num_heads

    @property
    def num_kv_heads(self) -> int:
        return self.blocks[0].num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.blocks[0].head_dim

    def roles(self) -> tuple[str, ...]:
        """The roles every block has, in ROLES order."""
        return tuple(r for r in ROLES if all(r in b.projections for b in self.blocks))

    def projections(self, role: str) -> list[Projection]:
        """`role`'s projection (or an alias's) in every block, in order; each iterates as (path, module)."""
        role = alias_to_role(role)
        return [b.projections[role] for b in self.blocks if role in b.projections]

    def norms(self) -> list[Norm]:
        """Every norm of the backbone (the base model, not the head), in registration order: the embeddings',
        each block's, the final one, and any other (DeBERTa-v3's norm of its relative position embeddings)."""
        return _norms(self.base.module, self.base.path)

    def bias_count(self) -> int:
        """Bias elements of the backbone: of its linear-like layers (Conv1D too), convolutions (ViT's patch
        embedding) and norms. Zero for bias-free models (Llama, Mistral)."""
        return sum(
            m.bias.numel()
            for m in self.base.module.modules()
            if isinstance(getattr(m, "bias", None), nn.Parameter)
            and (is_linear(m) or isinstance(m, nn.modules.conv._ConvNd) or norm_kind(m) is not None)
        )

    def summary(self) -> str:
        b = self.blocks[0]
        roles = ", ".join(f"{r}={p.path[len(b.path) + 1 :]}" for r, p in b.projections.items())
        kind = b.norms[0].kind if b.norms else "no norm"
        return (
            f"{self.family}: {len(self.blocks)} blocks at {self.blocks_path} ({type(b.module).__name__}), "
            f"{'causal' if self.causal else 'bidirectional'}, {self.norm_order}-norm ({kind})"
            f", heads {b.num_heads}/{b.num_kv_heads}x{b.head_dim}; {roles}; head reads {self.head.reads} "
            f"via {self.head.input.path}"
        )


# ---------------------------------------------------------------- finding it


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _parent(path: str) -> str:
    return path.rpartition(".")[0]


def _leaf(path: str) -> str:
    return path.rpartition(".")[2].lower()


def _within(path: str, prefix: str) -> bool:
    return prefix == "" or path == prefix or path.startswith(prefix + ".")


def _linears(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """Linear-like layers under `module`, in registration order; a wrapper counts once."""
    found = []
    for name, child in module.named_children():
        path = _join(prefix, name)
        if is_linear(child):
            found.append((path, child))
        else:
            found += _linears(child, path)
    return found


def _norms(module: nn.Module, prefix: str = "", skip: tuple[str, ...] = ()) -> list[Norm]:
    found = []
    for name, child in module.named_modules(prefix=prefix):
        if any(_within(name, s) for s in skip):
            continue
        kind = norm_kind(child)
        if kind is not None and not any(_within(name, n.path) for n in found):
            found.append(Norm(name, child, kind))
    return found


def _pick(candidates: list, role: str):
    """The (path, module) whose leaf name hints at `role`, else the first; None when there is none."""
    for c in candidates:
        if _leaf(c[0]) in _HINTS[role]:
            return c
    return candidates[0] if candidates else None


def _attr(module: nn.Module, names: tuple[str, ...]) -> int | None:
    for name in names:
        value = getattr(module, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _config_int(config, name: str) -> int | None:
    value = getattr(config, name, None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


_HEADS = ("num_heads", "num_attention_heads", "n_heads", "n_head")
_KV_HEADS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "n_head_kv")
_HEAD_DIM = ("head_dim", "attention_head_size", "head_size")


def _declared_heads(module: nn.Module, config, d: int, kv_default: bool = True):
    """(heads, kv heads, head dim) as the attention module or the config declare them; any may be None.

    Undeclared kv heads are the heads (plain multi-head attention) unless kv_default is False."""
    heads = _attr(module, _HEADS) or _config_int(config, "num_attention_heads")
    kv = _attr(module, _KV_HEADS)
    groups = _attr(module, ("num_key_value_groups",))
    if kv is None and groups and heads and heads % groups == 0:
        kv = heads // groups
    kv = kv or _config_int(config, "num_key_value_heads") or (heads if kv_default else None)
    head_dim = _attr(module, _HEAD_DIM) or _config_int(config, "head_dim")
    if head_dim is None and heads and d % heads == 0:
        head_dim = d // heads
    return heads, kv, head_dim


def _find_blocks(base: nn.Module, what: str) -> tuple[str, nn.ModuleList]:
    best = None
    for name, module in base.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        kinds = {type(m) for m in module}
        if len(kinds) != 1 or not all(_linears(m) for m in module):
            continue
        nested = best is not None and len(module) == len(best[1]) and name.startswith(best[0] + ".")
        if best is None or len(module) > len(best[1]) or nested:
            best = (name, module)
    if best is None:
        raise ValueError(
            f"{what}: no transformer blocks found (no nn.ModuleList of identical modules holding linear layers "
            "under the base model)"
        )
    return best


def _attention(block: nn.Module, lins, d: int, config, what: str):
    """(q, k, v, o projections by role with paths relative to the block, the attention module's path, the
    attention sublayer's path, heads, kv heads, head dim)."""
    io = {path: in_out_features(m) for path, m in lins}
    reading = [(p, m) for p, m in lins if io[p][0] == d]
    q = k = v = fused = None
    # separate q, k, v: three layers of one parent reading the hidden size, k and v of equal width
    parents = list(dict.fromkeys(_parent(p) for p, _ in reading))
    hinted = [par for par in parents if all(_pick_hinted(reading, par, r) for r in ("q", "k", "v"))]
    for par in hinted or parents:
        group = [(p, m) for p, m in reading if _parent(p) == par]
        if len(group) < 3:
            continue
        q = _pick_hinted(group, par, "q") or group[0]
        rest = [c for c in group if c is not q]
        k = _pick_hinted(rest, par, "k") or rest[0]
        rest = [c for c in rest if c is not k]
        v = _pick_hinted(rest, par, "v") or next((c for c in rest if io[c[0]][1] == io[k[0]][1]), None)
        if v is not None and io[k[0]][1] == io[v[0]][1]:
            break
        q = k = v = None
    if q is None:
        # one fused layer of width (heads + 2 kv heads) x head dim
        for p, m in sorted(reading, key=lambda c: _leaf(c[0]) not in _HINTS["qkv"]):
            heads, kv, head_dim = _declared_heads(block.get_submodule(_parent(p)), config, d)
            if heads and kv and head_dim and io[p][1] == (heads + 2 * kv) * head_dim:
                # query_key_value (GPT-NeoX, BLOOM, Falcon) groups q, k, v per kv head; the others concatenate
                grouped = _leaf(p) == "query_key_value" and kv > 1
                sizes = (heads * head_dim, kv * head_dim, kv * head_dim)
                fused = Fused(p, m, ("q", "k", "v"), sizes, "grouped" if grouped else "concat", kv if grouped else 1)
                break
        if fused is None:
            raise ValueError(
                f"{what}: no attention projections found (neither q, k, v reading the hidden size {d} in one module, "
                "nor a fused qkv layer of width (heads + 2 kv heads) x head dim)"
            )
    attn_path = fused.path.rpartition(".")[0] if fused else _common_parent([q[0], k[0], v[0]])
    attn_module = block.get_submodule(attn_path) if attn_path else block
    # the attention sublayer: the largest module above the attention that holds no other sublayer's layers
    scope = attn_path
    while scope and _parent(scope) and not all(_within(p, _parent(scope)) for p, _ in lins):
        scope = _parent(scope)
    declared = _declared_heads(attn_module, config, d, kv_default=False)
    q_out = fused.sizes[0] if fused else io[q[0]][1]
    kv_out = fused.sizes[1] if fused else io[k[0]][1]
    heads, kv, head_dim = declared
    head_dim = head_dim or (q_out // heads if heads else None)
    if not head_dim or q_out % head_dim or kv_out % head_dim:
        raise ValueError(f"{what}: q width {q_out} and k/v width {kv_out} do not divide into heads of {head_dim}")
    heads, kv = q_out // head_dim, kv_out // head_dim
    if declared[0] and declared[0] != heads or declared[1] and declared[1] != kv or heads % kv:
        raise ValueError(
            f"{what}: q/k widths {q_out}/{kv_out} give {heads}/{kv} heads of {head_dim}, "
            f"but the model declares {declared[0]}/{declared[1]}"
        )
    taken = {fused.path} if fused else {q[0], k[0], v[0]}
    o_candidates = [(p, m) for p, m in lins if p not in taken and _within(p, scope) and io[p] == (heads * head_dim, d)]
    o = _pick(o_candidates, "o")
    if o is None:
        raise ValueError(
            f"{what}: no attention output projection found ({heads * head_dim} -> {d} inside {scope or 'the block'})"
        )
    found = {}
    if fused:
        for role in fused.roles:
            size = fused.sizes[fused.roles.index(role)]
            found[role] = Projection(fused.path, fused.module, role, io[fused.path][0], size, fused)
    else:
        for role, (p, m) in (("q", q), ("k", k), ("v", v)):
            found[role] = Projection(p, m, role, *io[p])
    found["o"] = Projection(o[0], o[1], "o", *io[o[0]])
    return found, attn_path, scope, heads, kv, head_dim


def _pick_hinted(candidates, parent: str, role: str):
    return next((c for c in candidates if _parent(c[0]) == parent and _leaf(c[0]) in _HINTS[role]), None)


def _common_parent(paths: list[str]) -> str:
    parts = [p.split(".")[:-1] for p in paths]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


def _ffn(lins, scope: str, d: int, what: str) -> dict[str, Projection]:
    ffn = [(p, m) for p, m in lins if not _within(p, scope)]
    io = {p: in_out_features(m) for p, m in ffn}
    writing = [(p, m) for p, m in ffn if io[p][1] == d]
    if not writing:
        raise ValueError(
            f"{what}: no FFN down projection found (a layer writing the hidden size {d} outside attention)"
        )
    down = writing[-1]
    inter = io[down[0]][0]
    reading = [(p, m) for p, m in ffn if p != down[0] and io[p][0] == d]
    plain = [c for c in reading if io[c[0]][1] == inter]
    double = [c for c in reading if io[c[0]][1] == 2 * inter]
    found = {"ffn_out": Projection(down[0], down[1], "ffn_out", *io[down[0]])}
    if len(plain) == 1:
        found["ffn_in"] = Projection(plain[0][0], plain[0][1], "ffn_in", *io[plain[0][0]])
    elif len(plain) == 2:
        gate = _pick(plain, "ffn_gate")
        up = next(c for c in plain if c is not gate)
        found["ffn_gate"] = Projection(gate[0], gate[1], "ffn_gate", *io[gate[0]])
        found["ffn_in"] = Projection(up[0], up[1], "ffn_in", *io[up[0]])
    elif not plain and len(double) == 1:
        p, m = double[0]
        fused = Fused(p, m, ("ffn_gate", "ffn_in"), (inter, inter))
        found["ffn_gate"] = Projection(p, m, "ffn_gate", d, inter, fused)
        found["ffn_in"] = Projection(p, m, "ffn_in", d, inter, fused)
    else:
        raise ValueError(
            f"{what}: no FFN up projection found ({len(plain)} layers {d} -> {inter}, {len(double)} of {d} -> "
            f"{2 * inter}; expected one, or two for a gated MLP)"
        )
    return found


def _paths(model: nn.Module) -> dict[int, str]:
    return {id(m): name for name, m in model.named_modules(remove_duplicate=False)}


def _final_norm(base: nn.Module, base_path: str, skip: tuple[str, ...], d: int) -> Norm | None:
    """A norm after the blocks: outside blocks and embeddings, not one that normalises an embedding."""
    candidates = []
    for parent_name, parent in base.named_modules(prefix=base_path):
        if any(_within(parent_name, s) for s in skip):
            continue
        previous = None
        for name, child in parent.named_children():
            path = _join(parent_name, name)
            kind = norm_kind(child)
            if kind is not None and not any(_within(path, s) for s in skip):
                weight = getattr(child, "weight", None)
                size_ok = not isinstance(weight, torch.Tensor) or weight.shape[-1] == d
                after_embedding = isinstance(previous, nn.Embedding)
                if size_ok and (not after_embedding or name.lower() in _HINTS["final_norm"]):
                    candidates.append(Norm(path, child, kind))
            if any(True for _ in child.parameters()):  # dropouts and activations do not count
                previous = child
    hinted = [n for n in candidates if _leaf(n.path) in _HINTS["final_norm"]]
    return (hinted or candidates or [None])[-1]


def describe(model: nn.Module) -> Anatomy:
    """The anatomy of a transformers model with a task head; a ValueError names what was not found."""
    what = type(model).__name__
    config = getattr(model, "config", None)
    family = getattr(config, "model_type", None) or what
    paths = _paths(model)
    base = getattr(model, "base_model", model)
    base_path = paths.get(id(base), "")

    d = _config_int(config, "hidden_size")
    blocks_rel, blocks_list = _find_blocks(base, what)
    blocks_path = _join(base_path, blocks_rel)
    if d is None:
        first_norms = _norms(blocks_list[0])
        if not first_norms:
            raise ValueError(f"{what}: hidden size not found (no config.hidden_size and no norm in a block)")
        d = int(first_norms[0].module.weight.shape[-1])

    try:
        emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        emb = None
    if not isinstance(emb, nn.Module) or id(emb) not in paths:
        raise ValueError(f"{what}: no input embeddings found (get_input_embeddings() gave {type(emb).__name__})")
    emb_path = paths[id(emb)]
    # the embeddings block: the largest module above the input embedding that does not hold the blocks
    emb_block_path, probe = None, emb_path
    while _parent(probe) and _within(_parent(probe), base_path) and _parent(probe) != base_path:
        if _within(blocks_path, _parent(probe)):
            break
        probe = _parent(probe)
        emb_block_path = probe
    emb_block = Located(emb_block_path, model.get_submodule(emb_block_path)) if emb_block_path else None
    emb_norms = tuple(_norms(emb_block.module, emb_block.path)) if emb_block else ()

    # head: the model's own children outside the base model, with parameters
    head_modules = tuple(
        Located(name, child)
        for name, child in model.named_children()
        if child is not base and any(True for _ in child.parameters())
    )
    if base is model or not head_modules:
        raise ValueError(f"{what}: no task head found (no module with parameters outside the base model)")

    causal_flags = []
    blocks = []
    skip = (blocks_path,) + ((emb_block_path,) if emb_block_path else ())
    final_norm = _final_norm(base, base_path, skip, d)
    norm_order = "pre" if final_norm is not None else "post"
    for i, block in enumerate(blocks_list):
        block_path = _join(blocks_path, str(i))
        where = f"{what} block {i} ({type(block).__name__} at {block_path})"
        lins = _linears(block)
        attn, attn_rel, scope, heads, kv, head_dim = _attention(block, lins, d, config, where)
        ffn = _ffn(lins, scope, d, where)
        found, moved, projections = {**attn, **ffn}, {}, {}
        for role in ROLES:
            p = found.get(role)
            if p is not None:
                fused = p.fused and moved.setdefault(id(p.fused), _moved(p.fused, block_path))
                projections[role] = Projection(
                    _join(block_path, p.path), p.module, role, p.in_features, p.out_features, fused
                )
        attn_module = block.get_submodule(attn_rel) if attn_rel else block
        causal_flags.append(_causal(attn_module, block, attn_rel))
        blocks.append(
            Block(
                index=i,
                path=block_path,
                module=block,
                attention=Located(_join(block_path, attn_rel), attn_module),
                projections=MappingProxyType(projections),
                norms=tuple(_norms(block, block_path)),
                norm_order=norm_order,
                num_heads=heads,
                num_kv_heads=kv,
                head_dim=head_dim,
            )
        )
    flags = {f for f in causal_flags if f is not None}
    causal = flags.pop() if len(flags) == 1 else _declared_causal(config)

    head = _head(model, base, base_path, head_modules, skip, causal, d, what)
    return Anatomy(
        family=family,
        causal=causal,
        hidden_size=d,
        base=Located(base_path, base),
        embeddings=Embeddings(Located(emb_path, emb), emb_block, emb_norms),
        blocks_path=blocks_path,
        blocks=tuple(blocks),
        final_norm=final_norm,
        head=head,
    )


def _moved(fused: Fused, prefix: str) -> Fused:
    return Fused(_join(prefix, fused.path), fused.module, fused.roles, fused.sizes, fused.layout, fused.groups)


def _causal(attn: nn.Module, block: nn.Module, attn_rel: str) -> bool | None:
    """The attention module's own is_causal (or its parents' inside the block); None when none says."""
    probe = attn_rel
    while True:
        module = block.get_submodule(probe) if probe else block
        value = getattr(module, "is_causal", None)
        if isinstance(value, bool):
            return value
        if not probe:
            return None
        probe = _parent(probe)


def _declared_causal(config) -> bool:
    """For attention that does not say: the config's is_decoder, else a family transformers offers as a causal LM
    and not as a masked LM (BLOOM); BERT-style encoders are offered as both and read as bidirectional."""
    if getattr(config, "is_decoder", False):
        return True
    try:
        from transformers.models.auto.modeling_auto import (
            MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
            MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        )
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    family = getattr(config, "model_type", None)
    return family in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and family not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def _head(model, base, base_path, head_modules, skip, causal: bool, d: int, what: str) -> Head:
    def is_pooler(name: str, module: nn.Module) -> bool:
        return "pool" in _leaf(name) or "pool" in type(module).__name__.lower()

    pooler, in_backbone = None, False
    for name, child in base.named_children():  # the first pooling module with parameters, else the first
        path = _join(base_path, name)
        if is_pooler(name, child) and not any(_within(path, s) for s in skip):
            if pooler is None or (not any(True for _ in pooler.module.parameters()) and _linears(child)):
                pooler, in_backbone = Located(path, child), True
    for h in head_modules:
        if pooler is None and is_pooler(h.path, h.module):
            pooler = h
    first = None
    for h in head_modules:
        if pooler is not None and h.module is pooler.module:
            continue
        lins = [(h.path, h.module)] if is_linear(h.module) else _linears(h.module, h.path)
        if lins:
            first = lins[0]
            break
    if first is None:
        raise ValueError(f"{what}: the head has no linear layer (head modules: {[h.path for h in head_modules]})")
    if in_out_features(first[1])[0] != d:
        raise ValueError(f"{what}: the head's first layer {first[0]} reads {in_out_features(first[1])[0]}, not {d}")
    try:
        output_embeddings = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        output_embeddings = None
    if output_embeddings is not None and first[1] is output_embeddings:
        reads = "every"  # a language model's head: the next token at every position
    elif causal:
        reads = "last"
    elif pooler is not None and not _linears(pooler.module):
        reads = "pooler"  # a parameter-free pooling (mean, ...): no one position
    else:
        reads = "first"
    return Head(head_modules, Located(*first), reads, pooler, in_backbone)
