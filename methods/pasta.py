"""PASTA: trainable vectors added to the special tokens' hidden states before each self-attention.

Yang, Huang, Zhou & Chen, "Parameter-Efficient Tuning with Special Token
Adaptation", EACL 2023.
At the input of every layer l, the hidden state of the i-th special token of
the sequence gets a trainable vector e_l,i added (with dropout, as in the
authors' code); nothing else in the network changes. A single sentence has two
special tokens ([CLS] text [SEP]), a sentence pair three ([CLS] a [SEP] b
[SEP]), so the task's number of text columns decides how many vectors each
layer has. Vectors start at N(0, 0.02) (BERT's initialiser, as in the
authors' code). Trainable: the vectors (layers x special tokens x width) and
the task head, as in the paper.
Not back-propagated through: nothing is skipped; the gradient reaches the
vectors through the frozen layers above them.

Departures from the paper: the authors find special tokens by their ids
(101, 102 in BERT's vocabulary); the method has no tokenizer, so it finds them
by where a BERT tokenizer puts them: [CLS] at the first attended position,
the final [SEP] at the last attended position and, for pairs, the middle
[SEP] at the last attended position of segment A (token_type_ids 0). The
paper trains BERT-large for up to 150 epochs at lr 2.5e-4; the default 5e-3
is a choice for this small encoder and short runs (like BitFit, only vectors
are trained).
"""

import torch

from harness.method import Method, count, freeze_all, head_parameters
from methods._bert import encoder_layers


class SpecialTokenVectors(torch.nn.Module):
    """One trainable vector per layer and special-token slot, added to that token's hidden state."""

    def __init__(self, layers: int, slots: int, width: int, dropout: float):
        super().__init__()
        self.vectors = torch.nn.Parameter(torch.randn(layers, slots, width) * 0.02)
        self.dropout = torch.nn.Dropout(dropout)
        self.slots = None  # (batch, seq) slot index of each position, -1 where no special token; set per forward

    def locate(self, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None) -> None:
        """Slot of each position: 0 for [CLS], the last slot for the final [SEP], 1 for a pair's middle [SEP]."""
        n_slots = self.vectors.shape[1]
        batch, seq = attention_mask.shape
        position = torch.arange(seq, device=attention_mask.device).expand(batch, seq)
        attended = attention_mask.bool()
        rows = torch.arange(batch, device=attention_mask.device)
        slots = torch.full((batch, seq), -1, dtype=torch.long, device=attention_mask.device)
        slots[rows, position.masked_fill(~attended, seq).amin(1)] = 0
        if n_slots == 3:
            if token_type_ids is None:
                raise ValueError("pasta: a sentence-pair task needs token_type_ids to find the middle [SEP]")
            segment_a = attended & (token_type_ids == 0)
            slots[rows, position.masked_fill(~segment_a, -1).amax(1)] = 1
        slots[rows, position.masked_fill(~attended, -1).amax(1)] = n_slots - 1
        self.slots = slots

    def add(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        # row n_slots of the table is zero: positions without a special token get nothing added
        table = torch.cat([self.vectors[layer], self.vectors.new_zeros(1, self.vectors.shape[-1])])
        return hidden + self.dropout(table[self.slots])


class PASTA(Method):
    name = "pasta"
    family = "PETL"
    description = "PASTA: trainable vectors added to special tokens' hidden states before each layer, head trained"
    paper = "Yang et al., Parameter-Efficient Tuning with Special Token Adaptation, EACL 2023"
    trains = "one vector per layer and special token ([CLS]/[SEP]) + head"
    default_lr = 5e-3

    def apply(self, model, task):
        layers = encoder_layers(model, self.name)
        freeze_all(model)
        base = model.base_model
        pasta = SpecialTokenVectors(
            len(layers), special_tokens(task), model.config.hidden_size, model.config.hidden_dropout_prob
        ).to(layers[0].output.dense.weight.dtype)
        base.pasta = pasta  # registered under the backbone, so it moves and saves with the model

        def find_special(module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            shape = ids.shape if ids is not None else kwargs["inputs_embeds"].shape[:2]
            mask = kwargs.get("attention_mask")
            if mask is None:
                mask = torch.ones(shape, dtype=torch.long, device=pasta.vectors.device)
            pasta.locate(mask, kwargs.get("token_type_ids"))

        base.register_forward_pre_hook(find_special, with_kwargs=True)
        base.register_forward_hook(_forget_slots)
        for i, layer in enumerate(layers):
            layer.register_forward_pre_hook(lambda module, args, i=i: (pasta.add(i, args[0]), *args[1:]))
        for p in head_parameters(model).values():
            p.requires_grad_(True)
        return model

    def expected_trainable_params(self, model, task):
        vectors = len(encoder_layers(model, self.name)) * special_tokens(task) * model.config.hidden_size
        return vectors + count(head_parameters(model).values())


def _forget_slots(backbone, args, output):
    # The slot index is saved for backward by every layer's look-up; dropped here, it lives no longer
    # than that backward instead of through the next step.
    backbone.pasta.slots = None


def special_tokens(task) -> int:
    """[CLS] and one [SEP] per text: 2 for a single sentence, 3 for a pair (a task has at most two)."""
    return 1 + len(task.text_columns)
