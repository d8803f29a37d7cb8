"""Ladder Side-Tuning (LST): a small side network fed by the frozen backbone through gated ladders.

Sung, Cho & Bansal, "LST: Ladder Side-Tuning for Parameter and Memory Efficient
Transfer Learning", NeurIPS 2022.

Trainable: the side network (one layer per backbone layer unless some are
dropped, each of the backbone's own layer class with hidden and feed-forward
widths divided by the reduction factor r, default 8, and the backbone's number
of attention heads),
the ladders (one linear down-projection of the embedding output and of every
layer's output to the side width), one gate scalar per side layer, the
up-projection of the side network's output to the backbone's width, and the
classification head on it.
Not back-propagated through: the backbone. It runs under torch.no_grad, so it
builds no graph, saves no activation and receives no gradient; the side
network reads its hidden states through the ladders, whose down-projections
save those hidden states as their inputs (counted as the side path's
activations).

Per layer i: side = mu_i * side + (1 - mu_i) * down_i(h_i), mu_i = sigmoid(alpha_i / T)
with alpha_i learnable (initialised to 0, so mu_i = 0.5) and T = 0.1; then
side = side_layer_i(side). The first side input is down_0(embedding output).

Departures from the paper:
- Backbone: a BERT-style encoder classifying with a head, not T5 generating
  the label. As the paper feeds the up-projected side output to the
  backbone's LM head, this feeds the up-projected [CLS] position (or the mean
  over tokens, `pooling: mean`) to a fresh linear classifier of the
  backbone's width.
- Side initialisation (`init: prune`, the default, as in the paper): each
  side weight is a structured slice of the matching backbone weight. The
  paper ranks rows by Fisher information (squared gradients over training
  samples); this ranks them by weight magnitude (L1 norm), one of the
  criteria in the authors' code, which needs no data pass. The residual
  dimensions kept are those with the largest L1 norm in the word-embedding
  matrix (shared by all side layers); per layer, the attention dimensions
  kept (within every head, so the head count stays) are those with the
  largest summed L1 norm over the query, key and value rows and the output
  columns; the feed-forward dimensions kept are those with the largest L1
  norm over the intermediate rows and output columns. `init: random` draws
  them as BERT initialises new layers.
- Layer dropping: `drop_layers` lists backbone layers that get no side layer
  (nor ladder), the paper's layer dropping. The default (null) follows the
  authors' script for their GLUE table (T5-base, `encoder_side_layers`
  [1,2,3,5,6,7,9,10,11]): every fourth layer from the first is dropped, so
  layers 0 and 4 of a 6-layer MiniLM. `[]` keeps the backbone's full depth.
- Ladders, up-projection: PyTorch's default Linear initialisation, as in the
  authors' code.
"""

import copy

import torch
from torch import nn

from harness.anatomy import describe
from harness.method import Method, freeze_all
from methods._frozen import (
    POOLINGS,
    ClassifierHead,
    FrozenBackboneClassifier,
    frozen_states,
    init_fresh,
    token_mask,
)


def bert_layout_missing(anatomy) -> str | None:
    """Why LST's side layers (BERT's layer class, pruned through its sub-modules by name) cannot be built for this
    backbone; None on BERT-style blocks. (#14: LST is still to be moved onto harness.anatomy's roles.)"""
    block = anatomy.blocks[0].module
    parts = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output", "intermediate")
    missing = [p for p in (*parts, "output") if not _has(block, p)]
    if missing or anatomy.causal or getattr(anatomy.blocks[0].attention.module, "scaling", None) is None:
        return (
            f"lst builds its side layers from the sub-modules of BERT-style blocks ({', '.join(parts)}, output; "
            f"bidirectional attention with plain scaled dot products); {type(block).__name__} of {anatomy.family} "
            "is not one"
        )
    return None


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


class LadderSideNetwork(FrozenBackboneClassifier):
    def __init__(self, model, reduction_factor: int, gate_temperature: float, init: str, pooling: str, drop_layers=()):
        super().__init__(model)
        config = model.config
        layers = [b.module for b in self.anatomy.blocks]
        self.kept = kept_layers(len(layers), drop_layers)
        width, heads = side_width(config, reduction_factor), config.num_attention_heads
        if width % heads:
            raise ValueError(
                f"side width {width} (hidden {config.hidden_size} / reduction_factor {reduction_factor}) "
                f"must be a multiple of the backbone's {heads} attention heads"
            )
        self.side_config = copy.deepcopy(config)
        self.side_config.hidden_size = width
        self.side_config.intermediate_size = config.intermediate_size // reduction_factor
        self.ladders = nn.ModuleList(nn.Linear(config.hidden_size, width) for _ in range(len(self.kept) + 1))
        self.gate_logits = nn.Parameter(torch.zeros(len(self.kept)))  # alpha_i; mu_i = sigmoid(alpha_i / T)
        self.side_layers = nn.ModuleList(type(layers[0])(self.side_config) for _ in self.kept)
        self.up = nn.Linear(width, config.hidden_size)
        self.head = ClassifierHead(config.hidden_size, config)
        self.temperature, self.pooling = gate_temperature, pooling
        init_fresh(self.side_layers, config.initializer_range)
        self.pruned = prune_into(model, self.kept, self.side_layers, width) if init == "prune" else None

    def frozen_features(self, inputs):
        return frozen_states(self.anatomy, inputs).hidden

    def trainable_path(self, hidden_states, attention_mask):
        attention_mask = token_mask(attention_mask, hidden_states[0])
        side = self.ladders[0](hidden_states[0])
        mask = layer_mask(self.side_config, side, attention_mask)
        gates = torch.sigmoid(self.gate_logits / self.temperature)
        for j, (i, layer) in enumerate(zip(self.kept, self.side_layers)):  # side layer j beside backbone layer i
            side = gates[j] * side + (1 - gates[j]) * self.ladders[j + 1](hidden_states[i + 1])
            side = _run_layer(layer, side, mask)
        return self.head(self.up(self.pool(side, attention_mask, self.pooling)))


def layer_mask(config, hidden: torch.Tensor, attention_mask: torch.Tensor):
    """The (batch, length) 0/1 padding mask in the form BERT-style layers take for `config`'s attention
    implementation (eager: additive float, sdpa: boolean or None when nothing is padded)."""
    try:
        from transformers.masking_utils import create_bidirectional_mask
    except ImportError:  # transformers 4.x: layers take the additive (batch, 1, 1, length) mask
        return (1.0 - attention_mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
    return create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=attention_mask)


def _run_layer(layer: nn.Module, hidden: torch.Tensor, mask) -> torch.Tensor:
    out = layer(hidden, mask)
    return out[0] if isinstance(out, tuple) else out


def side_width(config, reduction_factor: int) -> int:
    return config.hidden_size // reduction_factor


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
def prune_into(model, layer_ids: list[int], side_layers: nn.ModuleList, width: int) -> dict:
    """Initialise side layer j with a structured slice of backbone layer layer_ids[j] (magnitude criterion).
    Returns the kept indices: residual dimensions, and per layer the attention and feed-forward dimensions."""
    keep = _top(model.base_model.embeddings.word_embeddings.weight.abs().sum(0), width)
    heads = model.config.num_attention_heads
    kept = {"hidden": keep, "attention": [], "feed_forward": []}
    blocks = describe(model).blocks
    for big, small in zip([blocks[i].module for i in layer_ids], side_layers):
        try:
            q, k, v = big.attention.self.query, big.attention.self.key, big.attention.self.value
            o, ln1 = big.attention.output.dense, big.attention.output.LayerNorm
            up, down, ln2 = big.intermediate.dense, big.output.dense, big.output.LayerNorm
        except AttributeError:
            raise ValueError(
                "init: prune needs BERT-style layers (attention.self.query, ...); use init: random"
            ) from None
        # attention dimensions: keep the strongest within every head, so the number of heads stays
        score = sum(w.weight[:, keep].abs().sum(1) for w in (q, k, v)) + o.weight[keep].abs().sum(0)
        per_head, side_per_head = q.out_features // heads, width // heads
        inner = torch.cat([h * per_head + _top(s, side_per_head) for h, s in enumerate(score.view(heads, per_head))])
        ffn = _top(
            up.weight[:, keep].abs().sum(1) + down.weight[keep].abs().sum(0), small.intermediate.dense.out_features
        )
        s_att = small.attention.self
        for src, dst in ((q, s_att.query), (k, s_att.key), (v, s_att.value)):
            _copy(dst, src.weight[inner][:, keep], src.bias[inner])
        _copy(small.attention.output.dense, o.weight[keep][:, inner], o.bias[keep])
        _copy(small.intermediate.dense, up.weight[ffn][:, keep], up.bias[ffn])
        _copy(small.output.dense, down.weight[keep][:, ffn], down.bias[keep])
        for src, dst in ((ln1, small.attention.output.LayerNorm), (ln2, small.output.LayerNorm)):
            _copy(dst, src.weight[keep], src.bias[keep])
        kept["attention"].append(inner)
        kept["feed_forward"].append(ffn)
    return kept


def _copy(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> None:
    module.weight.copy_(weight)
    module.bias.copy_(bias)


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
        return bert_layout_missing(anatomy)

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
        config = model.config
        hidden, r = config.hidden_size, self.hparams["reduction_factor"]
        layers = len(kept_layers(config.num_hidden_layers, self.dropped(config.num_hidden_layers)))
        width = side_width(config, r)
        ladders = (layers + 1) * (hidden * width + width)
        side = layers * _bert_layer_size(width, config.intermediate_size // r)
        up = width * hidden + hidden
        return ladders + layers + side + up + ClassifierHead.size(hidden, task.num_labels)


def _bert_layer_size(hidden: int, intermediate: int) -> int:
    """Parameters of one BERT layer of this width, from the shapes alone."""
    attention = 4 * (hidden * hidden + hidden) + 2 * hidden  # q, k, v, output dense; LayerNorm
    feed_forward = (hidden * intermediate + intermediate) + (intermediate * hidden + hidden) + 2 * hidden
    return attention + feed_forward
