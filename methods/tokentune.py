"""TokenTune: back-propagate through a random subset of the tokens only.

Simoulin, Park, Liu & Yang, "Memory-Efficient Fine-Tuning of Transformers via
Token Selection", EMNLP 2024 (first as "Memory-Efficient Selective
Fine-Tuning", ICML 2023 Workshop on Efficient Systems for Foundation Models).

Each training forward picks, per sequence, ceil(fraction * n) of its n real
(non-padding) tokens at random. Layer by layer, the selected tokens are
computed with a graph and the others under `torch.no_grad()`: the selected
tokens' queries attend to every token's keys and values (the unselected
tokens' keys and values carry no gradient), while the unselected tokens'
whole layer runs without a graph. The forward output is exactly the full
model's; only the gradient is approximate, and only the selected tokens'
activations are saved, plus each layer's keys and values of all tokens (the
selected queries' attention needs them in backward).

Trainable: nothing is added or frozen. Alone it is full fine-tuning through
the selected tokens; combined with LoRA, `stack: [{method: lora}, {method:
tokentune}]`, the LoRA weights are trained through the selected tokens. That
order (the method that sets what is trainable first, TokenTune after) is the
one declared and tested; TokenTune only swaps the blocks' forwards and calls
their own sub-modules, so plain or peft-wrapped Linear layers, and
activation compression stacked after it, all work. Not back-propagated
through: every computation of the unselected tokens after the embeddings.

Any backbone whose blocks methods/_attention.QueryRows rebuilds from
harness.anatomy's roles works (BERT, RoBERTa, DistilBERT, GPT-2, Llama with
grouped-query attention and rotary positions, ViT): every block's forward is
swapped, at instance level, for one that runs the selected rows and the others
apart; on a causal model each row reads the keys at or before its position,
and rotary embeddings follow each row's position. Attention runs through the
model's configured attention function (eager, sdpa, or a registered one such
as activation compression's).

Departures from the paper:
- The token the classification head reads ([CLS], position 0, or a
  decoder's last real token) is always among the selected tokens; otherwise
  no gradient would reach the backbone.
- Sequences of one batch select different counts; the selected block has the
  batch's largest count, shorter selections are filled with padding
  positions (masked as keys, so they change nothing) or, if a row has too few
  of those, with more of its real tokens.
- The embedding layer runs with a graph for every token (its saved
  activations are not reduced); selection starts at the first layer.
- Evaluation and any forward without a graph use the blocks' own forward.
- Not for use with the harness's `gradient_checkpointing`: a checkpointed
  block's first pass runs without a graph (so as the plain block) and its
  recomputation with one, choosing again.
"""

import inspect
import types
import typing

import torch

from harness.anatomy import describe, transformers_model
from harness.method import Method, count_trainable
from methods import _attention
from methods._attention import QueryRows, rows_mask


def select_tokens(valid: torch.Tensor, fraction: float, always: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """A permutation of each row's positions, selected ones first, and the selected count K.

    valid: (B, L) bool, True for real tokens. Row b selects ceil(fraction * n_b) real tokens at random,
    always position `always[b]` (default 0, [CLS]); the next K - k_b slots prefer padding positions.
    """
    B, L = valid.shape
    n = valid.sum(1)
    k = torch.clamp(torch.ceil(fraction * n.float()).long(), min=1)
    K = int(k.max())
    score = torch.rand(B, L, device=valid.device)
    rows = torch.arange(B, device=valid.device)
    score[rows, torch.zeros(B, dtype=torch.long, device=valid.device) if always is None else always] = 2.0
    score[~valid] = -1.0
    rank = torch.empty_like(score, dtype=torch.long)
    rank.scatter_(1, score.argsort(1, descending=True), torch.arange(L, device=valid.device).expand(B, L))
    chosen = valid & (rank < k[:, None])
    # selected real tokens, then padding, then unselected real tokens; random within each class
    priority = torch.where(chosen, 4.0, torch.where(valid, 0.0, 2.0)) + torch.rand(B, L, device=valid.device)
    return priority.argsort(1, descending=True), K


def _take(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t[b, index[b, i]] for every row b: by indexing, whose backward keeps the indices only (gather's would keep
    t, a whole sequence of hidden states per block)."""
    return t[torch.arange(t.shape[0], device=t.device)[:, None], index]


class _Selection:
    """One training forward's choice, shared by the blocks: the real tokens (from the backbone's input mask),
    the permutation putting the selected ones first and its inverse, and the selected count K."""

    def __init__(self, fraction: float, reads: str, causal: bool):
        self.fraction, self.reads, self.causal = fraction, reads, causal
        self.attention_mask = None
        self.order = self.inverse = self.valid = None
        self.count = 0

    def choose(self, hidden: torch.Tensor) -> None:
        B, L = hidden.shape[:2]
        mask = self.attention_mask
        valid = torch.ones(B, L, dtype=torch.bool, device=hidden.device) if mask is None else mask[:, -L:].bool()
        always = None
        if self.reads == "last":  # the rightmost real token, whichever side the padding is on
            always = (valid.long() * torch.arange(1, L + 1, device=hidden.device)).argmax(1)
        self.valid = valid
        self.order, self.count = select_tokens(valid, self.fraction, always)
        self.inverse = self.order.argsort(1)


def _remember_mask(base, args, kwargs):
    # through the module the hook fires on, never a closure: a deep copy of the model must fill its own
    base.tokentune_selection.attention_mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)


def _forget_choice(base, args, kwargs, output):
    # Once the forward is done only its graph may hold the choice (as the saved tensors it needs for backward):
    # kept here too, the order and the mask would outlive backward until the next forward.
    selection = base.tokentune_selection
    selection.attention_mask = selection.order = selection.inverse = selection.valid = None


class _Plan:
    """What a block's swapped forward needs: the block rebuilt by roles, whether it is the first (which chooses),
    how the block class returns, and the selection the blocks share."""

    def __init__(self, rows: QueryRows, first: bool, returns_tuple: bool, selection: _Selection):
        self.rows, self.first, self.returns_tuple, self.selection = rows, first, returns_tuple, selection


def _rotary_rows(kwargs, order: torch.Tensor):
    """The block's rotary (cos, sin), if it gets them, gathered in `order`: each row keeps its own position's."""
    rotary = kwargs.get("position_embeddings")
    if rotary is None:
        return None
    return tuple(_take(t.expand(order.shape[0], -1, -1), order) for t in rotary)


def _tokentune_block_forward(self, *args, **kwargs):
    plan = self.tokentune
    if not (self.training and torch.is_grad_enabled()):
        return type(self).forward(self, *args, **kwargs)
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    selection = plan.selection
    if plan.first:
        selection.choose(hidden)
    order, K = selection.order, selection.count
    rotary = _rotary_rows(kwargs, order)
    rot_sel, rot_rest = (
        (None, None) if rotary is None else (tuple(t[:, :K] for t in rotary), tuple(t[:, K:] for t in rotary))
    )
    h_sel = _take(hidden, order[:, :K])
    with torch.no_grad():
        h_rest = _take(hidden, order[:, K:])
        k_rest, v_rest = plan.rows.keys_values(h_rest, rot_rest)
    k_sel, v_sel = plan.rows.keys_values(h_sel, rot_sel)
    keys, values = torch.cat([k_sel, k_rest], dim=2), torch.cat([v_sel, v_rest], dim=2)
    valid = selection.valid.gather(1, order)  # keys come in `order`
    causal = (lambda rows: (order[:, rows], order)) if selection.causal else (lambda rows: (None, None))
    out_sel = plan.rows(h_sel, keys, values, rows_mask(valid, K, *causal(slice(None, K))), rot_sel)
    out_rest = h_rest  # every token selected: no rest
    if h_rest.shape[1]:
        with torch.no_grad():
            rest_mask = rows_mask(valid, h_rest.shape[1], *causal(slice(K, None)))
            out_rest = plan.rows(h_rest, keys, values, rest_mask, rot_rest)
    out = _take(torch.cat([out_sel, out_rest], dim=1), selection.inverse)
    return (out,) if plan.returns_tuple else out


def _returns_tuple(block: torch.nn.Module) -> bool:
    """Whether the block class's forward returns a tuple (transformers 4.x) rather than the hidden states."""
    annotation = inspect.signature(type(block).forward).return_annotation
    return typing.get_origin(annotation) is tuple or annotation is tuple


class TokenTune(Method):
    name = "tokentune"
    family = "METL"
    description = (
        "TokenTune: gradients through a random fraction of the tokens, the rest without a graph; stackable after LoRA"
    )
    paper = "Simoulin et al., Memory-Efficient Fine-Tuning of Transformers via Token Selection, EMNLP 2024"
    trains = "whatever is trainable when applied (alone: all weights), through the selected tokens"
    default_lr = 5e-5  # alone it is full fine-tuning
    defaults = {"fraction": 0.3}
    activations_depend_on_values = True  # the selected block's size follows each row's count of real tokens

    def check_hparams(self):
        if not 0 < self.hparams["fraction"] <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {self.hparams['fraction']}")

    def unsupported(self, anatomy):
        return _attention.unsupported(anatomy)

    def apply(self, model, task):
        backbone = transformers_model(model)  # also inside a wrapper: peft's, when stacked after LoRA
        anatomy = describe(backbone if backbone is not None else model)
        reason = _attention.unsupported(anatomy)
        if reason is not None:
            raise ValueError(f"tokentune: {reason}")
        base = anatomy.base.module
        base.tokentune_selection = _Selection(self.hparams["fraction"], anatomy.head.reads, anatomy.causal)
        base.register_forward_pre_hook(_remember_mask, with_kwargs=True)
        base.register_forward_hook(_forget_choice, with_kwargs=True)
        blocks = anatomy.blocks
        for i, block in enumerate(blocks):
            module = block.module
            rows = QueryRows(anatomy, block)
            module.tokentune = _Plan(rows, i == 0, _returns_tuple(module), base.tokentune_selection)
            module.forward = types.MethodType(_tokentune_block_forward, module)
        return model

    def expected_trainable_params(self, model, task):
        return count_trainable(model)  # adds and freezes nothing: alone, every weight trains
