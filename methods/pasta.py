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

Departures from the paper:
- The authors find special tokens by their ids (101, 102 in BERT's
  vocabulary); the method has no tokenizer, so it finds them by where an
  encoder's tokenizer puts them: [CLS] (RoBERTa's <s>) at the first attended
  position, the final [SEP] at the last attended position and, for pairs, the
  middle [SEP] at the last attended position of segment A (token_type_ids 0);
  where the tokenizer gives no token_type_ids (RoBERTa, DistilBERT), at the
  last earlier position holding the final [SEP]'s id (RoBERTa's pair
  separator </s></s>: its second token).
- Decoders (GPT-2, Llama), which the paper does not consider, have no [CLS]
  and [SEP]: their tokenizers mark at most the start (Llama's BOS) and no
  boundary between a pair's texts. There PASTA's vectors go to the first
  real token (which every later token attends to, as to [CLS]) and the last
  real token (the one the head reads, as BERT's reads [CLS]; both found from
  the attention mask, and the head made to read that token, methods/_prompts.py):
  two per layer, for pairs too.
- Image models (ViT) have one special token, the [CLS] at position 0 that the
  head reads: one vector per layer.
- The dropout on the vectors is the model's hidden dropout: BERT's
  hidden_dropout_prob, else the first dropout of a block outside its attention
  module (GPT-2's resid_pdrop); none where the block has no dropout (Llama).
- The paper trains BERT-large for up to 150 epochs at lr 2.5e-4; the default
  5e-3 is a choice for this small encoder and short runs (like BitFit, only
  vectors are trained).
"""

import torch

from harness.anatomy import describe
from harness.method import Method, count, freeze_all, head_parameters
from methods._prompts import read_text_states

# Where the special tokens are (see the module docstring), by what the backbone reads.
ENCODER, DECODER, IMAGE = "encoder", "decoder", "image"


class SpecialTokenVectors(torch.nn.Module):
    """One trainable vector per layer and special-token slot, added to that token's hidden state."""

    def __init__(self, layers: int, slots: int, width: int, dropout: float, layout: str = ENCODER):
        super().__init__()
        self.vectors = torch.nn.Parameter(torch.randn(layers, slots, width) * 0.02)
        self.dropout = torch.nn.Dropout(dropout)
        self.layout = layout
        self.slots = None  # (batch, seq) slot index of each position, -1 where no special token; set per forward

    def locate(
        self,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None,
        input_ids: torch.Tensor | None = None,
    ) -> None:
        """Slot of each position: 0 for [CLS], the last slot for the final [SEP], 1 for a pair's middle [SEP];
        on a decoder 0 for the first real token and 1 for the last."""
        n_slots = self.vectors.shape[1]
        batch, seq = attention_mask.shape
        position = torch.arange(seq, device=attention_mask.device).expand(batch, seq)
        attended = attention_mask.bool()
        rows = torch.arange(batch, device=attention_mask.device)
        slots = torch.full((batch, seq), -1, dtype=torch.long, device=attention_mask.device)
        slots[rows, position.masked_fill(~attended, seq).amin(1)] = 0
        last = position.masked_fill(~attended, -1).amax(1)
        if n_slots == 3:
            slots[rows, middle_separator(attended, position, last, token_type_ids, input_ids)] = 1
        slots[rows, last] = n_slots - 1
        self.slots = slots

    def locate_first(self, hidden: torch.Tensor) -> None:
        """An image's one special token: the [CLS] at position 0."""
        slots = torch.full(hidden.shape[:2], -1, dtype=torch.long, device=hidden.device)
        slots[:, 0] = 0
        self.slots = slots

    def add(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        if self.layout == IMAGE:  # no mask or ids to find the token from: the layer's input has the length
            self.locate_first(hidden)
        # row n_slots of the table is zero: positions without a special token get nothing added
        table = torch.cat([self.vectors[layer], self.vectors.new_zeros(1, self.vectors.shape[-1])])
        return hidden + self.dropout(table[self.slots])


def middle_separator(attended, position, last, token_type_ids, input_ids) -> torch.Tensor:
    """Each row's position of a pair's middle [SEP]: the end of segment A, or (no token_type_ids) the last
    earlier position holding the same id as the final [SEP]."""
    if token_type_ids is not None:
        segment_a = attended & (token_type_ids == 0)
        return position.masked_fill(~segment_a, -1).amax(1)
    if input_ids is None:
        raise ValueError("pasta: a sentence-pair task needs token_type_ids or input_ids to find the middle [SEP]")
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    same_as_final = attended & (input_ids == input_ids[rows, last][:, None]) & (position < last[:, None])
    return position.masked_fill(~same_as_final, -1).amax(1)


class PASTA(Method):
    name = "pasta"
    family = "PETL"
    description = "PASTA: trainable vectors added to special tokens' hidden states before each layer, head trained"
    paper = "Yang et al., Parameter-Efficient Tuning with Special Token Adaptation, EACL 2023"
    trains = "one vector per layer and special token ([CLS]/[SEP]) + head"
    default_lr = 5e-3

    def apply(self, model, task):
        anatomy = describe(model)
        layers = [block.module for block in anatomy.blocks]
        kind = layout(anatomy)
        freeze_all(model)
        base = anatomy.base.module
        pasta = SpecialTokenVectors(
            len(layers), special_tokens(anatomy, task), anatomy.hidden_size, hidden_dropout(model, anatomy), kind
        ).to(next(layers[0].parameters()).dtype)
        base.pasta = pasta  # registered under the backbone, so it moves and saves with the model

        def find_special(module, args, kwargs):
            if kind == IMAGE:  # found from each layer's input (add)
                return
            ids = kwargs.get("input_ids", args[0] if args else None)
            shape = ids.shape if ids is not None else kwargs["inputs_embeds"].shape[:2]
            mask = kwargs.get("attention_mask")
            if mask is None:
                mask = torch.ones(shape, dtype=torch.long, device=pasta.vectors.device)
            pasta.locate(mask, kwargs.get("token_type_ids"), ids)

        def add_vectors(module, args, kwargs, i):
            if args:
                return (pasta.add(i, args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": pasta.add(i, kwargs["hidden_states"])}

        base.register_forward_pre_hook(find_special, with_kwargs=True)
        base.register_forward_hook(_forget_slots)
        for i, layer in enumerate(layers):
            layer.register_forward_pre_hook(lambda m, a, k, i=i: add_vectors(m, a, k, i), with_kwargs=True)
        read_text_states(model, 0)  # a decoder's head reads the last real token by the mask, as located here
        for p in head_parameters(model).values():
            p.requires_grad_(True)
        return model

    def expected_trainable_params(self, model, task):
        anatomy = describe(model)
        vectors = len(anatomy.blocks) * special_tokens(anatomy, task) * anatomy.hidden_size
        return vectors + count(head_parameters(model).values())


def _forget_slots(backbone, args, output):
    # The slot index is saved for backward by every layer's look-up; dropped here, it lives no longer
    # than that backward instead of through the next step.
    backbone.pasta.slots = None


def layout(anatomy) -> str:
    """Where the backbone's special tokens are: an image model's one [CLS], a decoder's first and last real
    tokens, or an encoder tokenizer's [CLS] and [SEP]s."""
    if not isinstance(anatomy.embeddings.input.module, torch.nn.Embedding):
        return IMAGE
    return DECODER if anatomy.causal else ENCODER


def special_tokens(anatomy, task) -> int:
    """Vectors per layer: [CLS] and one [SEP] per text (2 for a single sentence, 3 for a pair; a task has at
    most two), a decoder's first and last real tokens (2), an image's [CLS] (1)."""
    kind = layout(anatomy)
    if kind == IMAGE:
        return 1
    return 2 if kind == DECODER else 1 + len(task.text_columns)


def hidden_dropout(model, anatomy) -> float:
    """The block's hidden dropout: the config's `hidden_dropout_prob` where it declares one (BERT-style configs;
    read first so that a BERT keeps the rate its PASTA always had), else the probability of the first dropout of
    the first block outside its attention module (GPT-2's resid_pdrop); 0 where the block has none (Llama)."""
    declared = getattr(model.config, "hidden_dropout_prob", None)
    if isinstance(declared, float):
        return declared
    block = anatomy.blocks[0]
    for path, module in block.module.named_modules(prefix=block.path):
        inside_attention = path == block.attention.path or path.startswith(block.attention.path + ".")
        if isinstance(module, torch.nn.Dropout) and not inside_attention:
            return module.p
    return 0.0
