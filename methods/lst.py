"""Ladder Side-Tuning (LST): a small side network fed by the frozen backbone through gated ladders.

Sung, Cho & Bansal, "LST: Ladder Side-Tuning for Parameter and Memory Efficient
Transfer Learning", NeurIPS 2022.

Trainable: the side network (one block per backbone block unless some are
dropped, each of the backbone's own block class built from its config with the
hidden, feed-forward and head widths divided by the reduction factor r,
default 8, and the backbone's numbers of attention and key/value heads; plus,
on a pre-norm backbone, a final norm of the side width), the ladders (one
linear down-projection of the embedding output and of every block's output to
the side width), one gate scalar per side block, the up-projection of the side
network's output to the backbone's width, and the classification head on it
(none on a causal LM, whose own LM head, frozen, reads the side network).
Not back-propagated through: the backbone. It runs under torch.no_grad, so it
builds no graph, saves no activation and receives no gradient; the side
network reads its hidden states through the ladders, whose down-projections
save those hidden states as their inputs (counted as the side path's
activations).

Per block i: side = mu_i * side + (1 - mu_i) * down_i(h_i), mu_i = sigmoid(alpha_i / T)
with alpha_i learnable (initialised to 0, so mu_i = 0.5) and T = 0.1; then
side = side_block_i(side). The first side input is down_0(embedding output).

Any family harness.anatomy describes: side block i is called exactly as the
backbone calls its block i (its attention mask, causal or not, and the other
arguments the backbone's forward passes, caught by methods._frozen), except
that rotary position embeddings are computed again for the side head size by
the backbone's own rotary class, and embeddings of the backbone's width passed
to every block (DeBERTa's relative-position embeddings) are cut to the residual
dimensions the side network keeps. `unsupported` builds one side block on the
meta device and refuses the backbone when a width does not shrink (a config
field lst does not know), when r does not divide the hidden, FFN or head width,
or when it leaves an odd rotary head.

Departures from the paper:
- Backbone: a decoder-only language model (a causal_lm task) or an encoder,
  decoder or ViT classifying with a head, not T5. On a language model, as in
  the paper, the up-projected side states of every position go through the
  backbone's own frozen LM head (the side network's final norm standing in for
  the backbone's). On a classification task, as the paper feeds the
  up-projected side output to the backbone's LM head, this feeds the
  up-projected side state where the backbone's own head reads ([CLS], a
  decoder's last real token; or the mean over tokens, `pooling: mean`) to a
  fresh linear classifier of the backbone's width.
- Side initialisation (`init: prune`, the default, as in the paper): each
  side weight is a structured slice of the matching backbone weight, role by
  role (q, k, v, o, FFN in/gate/out and the norms, fused projections such as
  GPT-2's c_attn split by the anatomy's layout). The paper ranks rows by
  Fisher information (squared gradients over training samples); this ranks
  them by weight magnitude (L1 norm), one of the criteria in the authors'
  code, which needs no data pass. The residual dimensions kept are those with
  the largest L1 norm in the input embedding (token embeddings, or ViT's patch
  convolution), shared by all side blocks; per block, the attention
  dimensions kept are the same within every head of a key/value group (so
  queries and keys still meet on shared dimensions; with one head per group,
  as in BERT, per head), those with the largest summed L1 norm over the
  group's query, key and value rows and output columns; on rotary models they
  are kept in rotate-half pairs (d, d + head_dim / 2), so each side pair is a
  backbone pair, though at the side's own frequencies. The feed-forward
  dimensions kept are those with the largest L1 norm over the up (and gate)
  rows and down columns. Weights outside these roles (DeBERTa's separate
  relative-position projections) are drawn as `init: random` draws every
  weight, the way transformers initialises new layers.
- Layer dropping: `drop_layers` lists backbone blocks that get no side block
  (nor ladder), the paper's layer dropping. The default (null) follows the
  authors' script for their GLUE table (T5-base, `encoder_side_layers`
  [1,2,3,5,6,7,9,10,11]): every fourth block from the first is dropped, so
  blocks 0 and 4 of a 6-layer MiniLM. `[]` keeps the backbone's full depth.
- Ladders, up-projection: PyTorch's default Linear initialisation, as in the
  authors' code.
"""

import copy
import inspect
import math

import torch
from torch import nn

from harness.anatomy import Anatomy, Fused, Projection, in_out_features, out_axis
from harness.backbone import is_quantised, logical_shape
from harness.method import Method, freeze_all
from methods._frozen import (
    POOLINGS,
    BlockCall,
    ClassifierHead,
    FrozenBackboneClassifier,
    FrozenStates,
    frozen_states,
    init_fresh,
    token_mask,
)

# Where configs keep the FFN's inner width, in the order they are tried (BERT, Llama, ViT...; GPT-2; DistilBERT; ...).
_FFN_WIDTH = ("intermediate_size", "n_inner", "hidden_dim", "ffn_dim", "d_ff")


def _rotary(anatomy: Anatomy) -> nn.Module | None:
    """The backbone's rotary position embedding module (the one holding `inv_freq`), if it has one."""
    return next(
        (m for m in anatomy.base.module.modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor)), None
    )


def side_config(anatomy: Anatomy, reduction_factor: int):
    """The backbone's config with every width divided by `reduction_factor` (hidden, FFN, head dim) and the
    number of heads kept; a ValueError says why no such side network exists."""
    config, r = anatomy.base.module.config, reduction_factor
    block = anatomy.blocks[0]
    inner = block.projections["ffn_out"].in_features
    widths = {"hidden": anatomy.hidden_size, "FFN": inner, "head": block.head_dim}
    uneven = [f"{name} {w}" for name, w in widths.items() if w % r]
    if uneven:
        raise ValueError(f"reduction_factor {r} does not divide the backbone's widths ({', '.join(uneven)})")
    if _rotary(anatomy) is not None and (block.head_dim // r) % 2:
        raise ValueError(
            f"reduction_factor {r} leaves side heads of {block.head_dim // r} dimension(s); rotary embeddings "
            "rotate pairs, so the side head dimension must be even"
        )
    field = next((f for f in _FFN_WIDTH if hasattr(config, f)), None)
    if field is None:
        raise ValueError(f"{type(config).__name__} keeps its FFN width in none of {', '.join(_FFN_WIDTH)}")
    side = copy.deepcopy(config)
    side.hidden_size = anatomy.hidden_size // r  # attribute_map turns it into GPT-2's n_embd, DistilBERT's dim
    setattr(side, field, inner // r)
    if isinstance(getattr(config, "head_dim", None), int):
        side.head_dim = block.head_dim // r
    return side


def new_block(anatomy: Anatomy, config, index: int) -> nn.Module:
    """A block of the backbone's own class, built from `config`."""
    cls = type(anatomy.blocks[0].module)
    takes_index = "layer_idx" in inspect.signature(cls.__init__).parameters
    return cls(config, layer_idx=index) if takes_index else cls(config)


def _relative(block, path: str) -> str:
    """A path inside `block` (from the model top) as a path from the block: how a side block of its class names it."""
    return path[len(block.path) + 1 :]


def side_layout_problem(anatomy: Anatomy, reduction_factor: int) -> str | None:
    """Why no side network at 1/reduction_factor width can be built for this backbone; None when one can. It builds
    one side block on the meta device and checks every role's and norm's shape against the backbone's / r."""
    try:
        config = side_config(anatomy, reduction_factor)
        with torch.device("meta"):
            small = new_block(anatomy, config, 0)
    except (ValueError, TypeError) as error:
        return f"no side network at 1/{reduction_factor} width: {error}"
    block, r = anatomy.blocks[0], reduction_factor
    wrong = []
    for role, p in block.projections.items():
        want = tuple(n // r for n in in_out_features(p.module))
        got = in_out_features(small.get_submodule(_relative(block, p.path)))
        if got != want:
            wrong.append(f"{role} {got} (want {want})")
    for norm in block.norms:
        got = tuple(small.get_submodule(_relative(block, norm.path)).weight.shape)
        if got != (anatomy.hidden_size // r,):
            wrong.append(f"norm {_relative(block, norm.path)} {got}")
    if wrong:
        return (
            f"a {type(block.module).__name__} built from the config at 1/{r} width does not shrink every width "
            f"({'; '.join(wrong)}): the config keeps one in a field lst does not set"
        )
    if anatomy.final_norm is not None and type(anatomy.final_norm.module) is not type(block.norms[-1].module):
        return f"the final norm ({type(anatomy.final_norm.module).__name__}) is not of the blocks' norm class"
    return None


class LadderSideNetwork(FrozenBackboneClassifier):
    def __init__(self, model, reduction_factor: int, gate_temperature: float, init: str, pooling: str, drop_layers=()):
        super().__init__(model)
        anatomy, config = self.anatomy, model.config
        self.kept = kept_layers(len(anatomy.blocks), drop_layers)
        self.side_config = side_config(anatomy, reduction_factor)
        hidden, width = anatomy.hidden_size, anatomy.hidden_size // reduction_factor
        self.ladders = nn.ModuleList(nn.Linear(hidden, width) for _ in range(len(self.kept) + 1))
        self.gate_logits = nn.Parameter(torch.zeros(len(self.kept)))  # alpha_i; mu_i = sigmoid(alpha_i / T)
        self.side_layers = nn.ModuleList(new_block(anatomy, self.side_config, j) for j in range(len(self.kept)))
        self.up = nn.Linear(width, hidden)
        # a language model's output is the backbone's own (frozen) LM head on the up-projected side states, as in
        # the paper; a classifier's, a fresh linear head
        self.head = anatomy.head.input.module if self.language_model else ClassifierHead(hidden, config)
        self.temperature, self.pooling = gate_temperature, pooling
        init_fresh(self.side_layers, getattr(config, "initializer_range", 0.02))
        # a pre-norm stack normalises after its last block; so does the side network, with a norm of its blocks' class
        last_norm = _relative(anatomy.blocks[0], anatomy.blocks[0].norms[-1].path)
        self.final_norm = (
            copy.deepcopy(self.side_layers[0].get_submodule(last_norm)) if anatomy.final_norm is not None else None
        )
        rotary = _rotary(anatomy)
        self.side_rotary = type(rotary)(config=self.side_config) if rotary is not None else None
        self.residual = _top(_embedding_scores(anatomy), width)
        self.pruned = None
        if init == "prune":
            self.pruned = prune_into(
                anatomy, self.kept, self.side_layers, self.residual, reduction_factor, rotary is not None
            )
            if self.final_norm is not None:
                _copy_norm(anatomy.final_norm.module, self.final_norm, self.residual)

    def frozen_features(self, inputs) -> FrozenStates:
        """The backbone's hidden states, and its calls to each block as the side blocks take them."""
        states = frozen_states(self.anatomy, inputs)
        rotary = {}
        return FrozenStates(states.hidden, [self._side_call(call, rotary) for call in states.calls])

    @torch.no_grad()
    def _side_call(self, call: BlockCall, rotary: dict) -> BlockCall:
        """The backbone's call to a block, for a side block: rotary (cos, sin) computed for the side head size, and
        embeddings of the backbone's width (DeBERTa's relative-position embeddings) cut to the residual dimensions
        the side network keeps."""
        kwargs = dict(call.kwargs)
        for name, value in call.kwargs.items():
            if name == "position_embeddings" and value is not None:
                if id(value) not in rotary:
                    cos = value[0]
                    positions = kwargs.get("position_ids")
                    if positions is None:
                        positions = torch.arange(cos.shape[1], device=cos.device)[None]
                    rotary[id(value)] = self.side_rotary(cos, positions)
                kwargs[name] = rotary[id(value)]
            elif name.endswith("embeddings") and torch.is_tensor(value) and value.shape[-1] == self.anatomy.hidden_size:
                kwargs[name] = value[..., self.residual]
        return BlockCall(call.args, kwargs)

    def trainable_path(self, states: FrozenStates, attention_mask):
        hidden = states.hidden
        attention_mask = token_mask(attention_mask, hidden[0])
        side = self.ladders[0](hidden[0])
        gates = torch.sigmoid(self.gate_logits / self.temperature)
        for j, (i, layer) in enumerate(zip(self.kept, self.side_layers)):  # side layer j beside backbone layer i
            side = gates[j] * side + (1 - gates[j]) * self.ladders[j + 1](hidden[i + 1])
            side = states.calls[i].run(layer, side)
        if self.final_norm is not None:
            side = self.final_norm(side)
        if self.language_model:
            return self.head(self.up(side))
        return self.head(self.up(self.pool(side, attention_mask, self.pooling)))


def kept_layers(num_layers: int, drop_layers) -> list[int]:
    bad = [i for i in drop_layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"drop_layers {bad} are not layers of this {num_layers}-layer backbone (0..{num_layers - 1})")
    kept = [i for i in range(num_layers) if i not in set(drop_layers)]
    if not kept:
        raise ValueError("drop_layers drops every layer; keep at least one")
    return kept


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, in their original order."""
    return scores.topk(k).indices.sort().values


@torch.no_grad()
def _embedding_scores(anatomy: Anatomy) -> torch.Tensor:
    """Per residual dimension, the L1 norm of the input embedding's weights writing it (token embeddings, or the
    patch embedding's convolution)."""
    module = anatomy.embeddings.input.module
    for m in module.modules():
        if isinstance(m, nn.Embedding):
            return m.weight.abs().sum(0)
        if isinstance(m, nn.modules.conv._ConvNd):
            return m.weight.abs().flatten(1).sum(1)
    raise ValueError(f"no token embedding or patch convolution found in {type(module).__name__}")


def _matrix(module: nn.Module) -> torch.Tensor:
    """A linear-like layer's weight as (out, in), a view (Conv1D stores it as (in, out)); a quantised backbone
    layer's (bitsandbytes), dequantised: a copy, read to prune from."""
    if is_quantised(module.weight):
        from peft.utils.integrations import dequantize_module_weight

        return dequantize_module_weight(module)
    return module.weight.T if out_axis(module) == 1 else module.weight


def _rows(p: Projection) -> list[int]:
    """The output features of p's role within its module (all of them for a layer of its own)."""
    return p.indices if p.fused is not None else list(range(p.out_features))


def _side_projection(p: Projection, small: nn.Module, block, r: int) -> Projection:
    """The projection of the same role in a side block, its fused layout shrunk by r."""
    path = _relative(block, p.path)
    module = small.get_submodule(path)
    fused = p.fused and Fused(
        path, module, p.fused.roles, tuple(s // r for s in p.fused.sizes), p.fused.layout, p.fused.groups
    )
    return Projection(path, module, p.role, p.in_features // r, p.out_features // r, fused)


def _role_matrix(p: Projection) -> torch.Tensor:
    """p's role's weight as (its output features, in)."""
    return _matrix(p.module)[_rows(p)]


def _row_strength(p: Projection, cols: torch.Tensor) -> torch.Tensor:
    """Per output feature of p's role, the L1 norm of its weights reading input features `cols`."""
    return _role_matrix(p)[:, cols].abs().sum(1)


def _column_strength(p: Projection, rows: torch.Tensor) -> torch.Tensor:
    """Per input feature of p (a layer of its own), the L1 norm of its weights writing output features `rows`."""
    return _matrix(p.module)[rows].abs().sum(0)


def _write(dst: Projection, src: Projection, rows, cols) -> None:
    """dst's role <- src's role's weights at its output features `rows` and input features `cols`, and its bias
    at `rows`."""
    target = _matrix(dst.module)
    target[_rows(dst)] = _role_matrix(src)[rows][:, cols].to(target.dtype)
    if isinstance(getattr(src.module, "bias", None), torch.Tensor):
        dst.module.bias[_rows(dst)] = src.module.bias[_rows(src)][rows].to(dst.module.bias.dtype)


@torch.no_grad()
def _copy_norm(src: nn.Module, dst: nn.Module, keep: torch.Tensor) -> None:
    dst.weight.copy_(src.weight[keep])
    if isinstance(getattr(src, "bias", None), torch.Tensor):
        dst.bias.copy_(src.bias[keep])


def _attention_dims(block, keep: torch.Tensor, side_head_dim: int, rotary: bool) -> tuple[list, list]:
    """(q dims, k/v dims) to keep: within each kv group the same side_head_dim dimensions of every head, those
    with the largest L1 norm summed over the group's q, k and v rows and o columns; for rotary models whole
    rotate-half pairs (d, d + head_dim / 2), in the order the side head's rotation pairs them."""
    p = block.projections
    heads, groups, head_dim = block.num_heads, block.num_kv_heads, block.head_dim
    q = _row_strength(p["q"], keep).view(groups, heads // groups, head_dim).sum(1)
    o = _column_strength(p["o"], keep).view(groups, heads // groups, head_dim).sum(1)
    k, v = (_row_strength(p[role], keep).view(groups, head_dim) for role in ("k", "v"))
    score = q + k + v + o
    if rotary:
        half = head_dim // 2
        pairs = [_top(s[:half] + s[half:], side_head_dim // 2) for s in score]
        dims = [torch.cat([d, d + half]) for d in pairs]
    else:
        dims = [_top(s, side_head_dim) for s in score]
    kv = torch.cat([g * head_dim + d for g, d in enumerate(dims)])
    q_dims = torch.cat([h * head_dim + dims[h // (heads // groups)] for h in range(heads)])
    return q_dims, kv


@torch.no_grad()
def prune_into(
    anatomy: Anatomy, layer_ids: list[int], side_layers: nn.ModuleList, keep: torch.Tensor, r: int, rotary: bool
) -> dict:
    """Initialise side block j with a structured slice of backbone block layer_ids[j] (magnitude criterion), role by
    role. Returns the kept indices: residual dimensions, and per layer the attention (q; k and v) and feed-forward
    dimensions."""
    kept = {"hidden": keep, "attention": [], "kv_attention": [], "feed_forward": []}
    for i, small in zip(layer_ids, side_layers):
        block = anatomy.blocks[i]
        p = block.projections
        side = {role: _side_projection(proj, small, block, r) for role, proj in p.items()}
        q_dims, kv_dims = _attention_dims(block, keep, block.head_dim // r, rotary)
        ffn_roles = [role for role in ("ffn_in", "ffn_gate") if role in p]
        score = sum(_row_strength(p[role], keep) for role in ffn_roles)
        ffn = _top(score + _column_strength(p["ffn_out"], keep), p["ffn_out"].in_features // r)
        for role, rows in (("q", q_dims), ("k", kv_dims), ("v", kv_dims)):
            _write(side[role], p[role], rows, keep)
        _write(side["o"], p["o"], keep, q_dims)
        for role in ffn_roles:
            _write(side[role], p[role], ffn, keep)
        _write(side["ffn_out"], p["ffn_out"], keep, ffn)
        for norm in block.norms:
            _copy_norm(norm.module, small.get_submodule(_relative(block, norm.path)), keep)
        kept["attention"].append(q_dims)
        kept["kv_attention"].append(kv_dims)
        kept["feed_forward"].append(ffn)
    return kept


class LadderSideTuning(Method):
    name = "lst"
    family = "METL"
    description = "Ladder Side-Tuning: gated ladders into a 1/r-width side network; backbone under no_grad"
    paper = (
        "Sung, Cho & Bansal, LST: Ladder Side-Tuning for Parameter and Memory Efficient Transfer Learning, NeurIPS 2022"
    )
    trains = "side network (width/r) + ladders + gates + up-projection + head"
    default_lr = 3e-3  # the authors' GLUE script for T5-base
    defaults = {"reduction_factor": 8, "gate_temperature": 0.1, "init": "prune", "pooling": "cls", "drop_layers": None}

    def check_hparams(self):
        h = self.hparams
        if h["reduction_factor"] < 1:
            raise ValueError("reduction_factor must be at least 1")
        if h["gate_temperature"] <= 0:
            raise ValueError("gate_temperature must be positive")
        if h["init"] not in ("prune", "random"):
            raise ValueError(f"init must be 'prune' or 'random', got {h['init']!r}")
        if h["pooling"] not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {h['pooling']!r}")
        drop = h["drop_layers"]
        if drop is not None and (
            not isinstance(drop, (list, tuple))
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in drop)
            or len(set(drop)) != len(drop)
        ):
            raise ValueError(f"drop_layers must be null or list distinct layer indices, got {drop!r}")

    def dropped(self, num_layers: int) -> list[int]:
        """The layers without a side layer: as set, or by default every fourth from layer 0
        (none of a one-layer backbone, which would be left without a side network)."""
        drop = self.hparams["drop_layers"]
        if drop is None:
            return list(range(0, num_layers, 4)) if num_layers > 1 else []
        return list(drop)

    def unsupported(self, anatomy):
        return side_layout_problem(anatomy, self.hparams["reduction_factor"])

    def apply(self, model, task):
        freeze_all(model)
        h = self.hparams
        return LadderSideNetwork(
            model,
            h["reduction_factor"],
            h["gate_temperature"],
            h["init"],
            h["pooling"],
            self.dropped(model.config.num_hidden_layers),
        )

    def expected_trainable_params(self, model, task):
        """From the shapes: each side block has every weight of a backbone block with each dimension divided by r."""
        from harness.anatomy import describe

        anatomy = describe(model)
        hidden, r = anatomy.hidden_size, self.hparams["reduction_factor"]
        layers = len(kept_layers(len(anatomy.blocks), self.dropped(len(anatomy.blocks))))
        width = hidden // r
        shrunk = lambda module: sum(math.prod(n // r for n in logical_shape(p)) for p in module.parameters())
        side = layers * shrunk(anatomy.blocks[0].module)
        final_norm = shrunk(anatomy.final_norm.module) if anatomy.final_norm is not None else 0
        ladders = (layers + 1) * (hidden * width + width)
        up = width * hidden + hidden
        head = 0 if anatomy.head.reads == "every" else ClassifierHead.size(hidden, task.num_labels)  # LM head: frozen
        return ladders + layers + side + final_norm + up + head
