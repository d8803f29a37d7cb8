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
one declared and tested; TokenTune only swaps the encoder's forward and calls
the layers' own sub-modules, so plain or peft-wrapped Linear layers, and
activation compression stacked after it, all work. Not back-propagated
through: every computation of the unselected tokens after the embeddings.

Applies to BERT-style encoders (BERT, RoBERTa, MiniLM...: layers with
attention.self.{query,key,value}, attention.output, intermediate, output) with
absolute position embeddings; attention runs through the model's configured
attention function (eager, sdpa, or a registered one such as activation
compression's).

Departures from the paper:
- The [CLS] token (position 0), which the classification head reads, is always
  among the selected tokens; otherwise no gradient would reach the encoder.
- Sequences of one batch select different counts; the selected block has the
  batch's largest count, shorter selections are filled with padding
  positions (masked as keys, so they change nothing) or, if a row has too few
  of those, with more of its real tokens.
- The embedding layer runs with a graph for every token (its saved
  activations are not reduced); selection starts at the first layer.
- Evaluation and any forward without a graph use the unmodified encoder.
- The layers' sub-modules are called directly, so the harness's
  `gradient_checkpointing` setting does not apply to them.
"""

import types

import torch
from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

from harness.method import Method, count_trainable
from methods._frozen import bert_layout_missing


def select_tokens(valid: torch.Tensor, fraction: float) -> tuple[torch.Tensor, int]:
    """A permutation of each row's positions, selected ones first, and the selected count K.

    valid: (B, L) bool, True for real tokens. Row b selects ceil(fraction * n_b) real tokens
    (always position 0) at random; the next K - k_b slots prefer padding positions.
    """
    B, L = valid.shape
    n = valid.sum(1)
    k = torch.clamp(torch.ceil(fraction * n.float()).long(), min=1)
    K = int(k.max())
    score = torch.rand(B, L, device=valid.device)
    score[:, 0] = 2.0  # [CLS] first
    score[~valid] = -1.0
    rank = torch.empty_like(score, dtype=torch.long)
    rank.scatter_(1, score.argsort(1, descending=True), torch.arange(L, device=valid.device).expand(B, L))
    chosen = valid & (rank < k[:, None])
    # selected real tokens, then padding, then unselected real tokens; random within each class
    priority = torch.where(chosen, 4.0, torch.where(valid, 0.0, 2.0)) + torch.rand(B, L, device=valid.device)
    return priority.argsort(1, descending=True), K


def _gather(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return t.gather(1, index[..., None].expand(-1, -1, t.shape[-1]))


def _eager_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        scores = (
            scores.masked_fill(~attention_mask, float("-inf"))
            if attention_mask.dtype == torch.bool
            else scores + attention_mask
        )
    probs = torch.nn.functional.dropout(torch.softmax(scores, -1), dropout, training=dropout > 0)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


def _attention_function(attn):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    implementation = attn.config._attn_implementation
    if implementation in (None, "eager"):
        return _eager_attention
    return ALL_ATTENTION_FUNCTIONS.get_interface(implementation, _eager_attention)


def _heads(attn, t: torch.Tensor) -> torch.Tensor:
    return t.view(*t.shape[:2], t.shape[-1] // attn.attention_head_size, attn.attention_head_size).transpose(1, 2)


def _rows(layer, h, keys, values, mask):
    """One encoder layer for the query rows `h`, attending to the given keys and values."""
    attn = layer.attention.self
    context, _ = _attention_function(attn)(
        attn,
        _heads(attn, attn.query(h)),
        keys,
        values,
        mask,
        dropout=attn.dropout.p if attn.training else 0.0,
        scaling=attn.scaling,
    )
    attended = layer.attention.output(context.reshape(*h.shape[:2], -1), h)
    return layer.output(layer.intermediate(attended), attended)


def _layer(layer, h_sel, h_rest, mask):
    attn = layer.attention.self
    with torch.no_grad():
        k_rest, v_rest = _heads(attn, attn.key(h_rest)), _heads(attn, attn.value(h_rest))
    keys = torch.cat([_heads(attn, attn.key(h_sel)), k_rest], dim=2)
    values = torch.cat([_heads(attn, attn.value(h_sel)), v_rest], dim=2)
    out_sel = _rows(layer, h_sel, keys, values, mask)
    if h_rest.shape[1] == 0:  # every token selected
        return out_sel, h_rest
    with torch.no_grad():
        out_rest = _rows(layer, h_rest, keys, values, mask)
    return out_sel, out_rest


def _tokentune_forward(original, fraction):
    def forward(self, hidden_states, attention_mask=None, *args, **kwargs):
        if not (self.training and torch.is_grad_enabled()):
            return original(hidden_states, attention_mask, *args, **kwargs)
        if args or kwargs.get("encoder_hidden_states") is not None or kwargs.get("past_key_values") is not None:
            raise ValueError("tokentune supports encoder-only self-attention (no cross-attention or cache)")
        B, L, _ = hidden_states.shape
        if attention_mask is None:
            valid = torch.ones(B, L, dtype=torch.bool, device=hidden_states.device)
        elif attention_mask.dim() == 4:
            first_row = attention_mask[:, :, :1, :]  # bidirectional: every query row masks the same keys
            valid = first_row[:, 0, 0] if first_row.dtype == torch.bool else first_row[:, 0, 0] == 0
        else:
            raise ValueError(f"tokentune expects a 4-D attention mask, got shape {tuple(attention_mask.shape)}")
        order, K = select_tokens(valid, fraction)
        mask = None
        if attention_mask is not None:  # keys come in `order`: reorder the mask's key axis the same way
            mask = first_row.gather(3, order[:, None, None, :].expand(-1, first_row.shape[1], 1, -1))
        self.tokentune_selected = order[:, :K]
        h_sel = _gather(hidden_states, order[:, :K])
        with torch.no_grad():
            h_rest = _gather(hidden_states, order[:, K:])
        for layer in self.layer:
            h_sel, h_rest = _layer(layer, h_sel, h_rest, mask)
        out = _gather(torch.cat([h_sel, h_rest], dim=1), order.argsort(1))
        return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=out)

    return forward


def find_encoder(model: torch.nn.Module):
    """The first module whose `layer` list holds BERT-style layers."""
    for module in model.modules():
        layers = getattr(module, "layer", None)
        if (
            isinstance(layers, torch.nn.ModuleList)
            and len(layers)
            and all(
                hasattr(layer, "attention")
                and hasattr(getattr(layer.attention, "self", None), "query")
                and hasattr(layer, "intermediate")
                and hasattr(layer, "output")
                for layer in layers
            )
        ):
            return module
    return None


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
        return bert_layout_missing(anatomy)

    def apply(self, model, task):
        encoder = find_encoder(model)
        if encoder is None:
            raise ValueError("tokentune needs a BERT-style encoder (layers with attention.self.query/key/value)")
        config = encoder.layer[0].attention.self.config
        if getattr(config, "is_decoder", False) or getattr(config, "position_embedding_type", "absolute") != "absolute":
            raise ValueError("tokentune supports bidirectional encoders with absolute position embeddings")
        encoder.forward = types.MethodType(_tokentune_forward(encoder.forward, self.hparams["fraction"]), encoder)
        return model

    def expected_trainable_params(self, model, task):
        return count_trainable(model)  # adds and freezes nothing: alone, every weight trains
