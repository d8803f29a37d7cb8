"""What the methods that add virtual tokens share: room for them, a model that can take them, and what the head reads.

The prompt takes positions in the model's position table, so it must leave
room for the text. It is prepended to token embeddings, so a model whose input
is no token embedding (ViT's patch embedding of `pixel_values`) cannot take
one. And the head must still read the text, which `read_text_states` arranges
from the backbone's anatomy (harness.anatomy: where the head reads):
- an encoder's head reads the first position: after prepending, that is a
  virtual token the pretrained pooler never saw, so the virtual positions are
  cut from the last block's output, and the head (and a pooler inside the
  backbone, BERT's) reads [CLS] as it does for every other method, while the
  virtual tokens still act on the text in every layer below. The last block,
  not the encoder's output, because some models read their blocks' states
  rather than the encoder's output (DeBERTa's classifier pools its encoder's
  last collected state);
- a decoder's head reads the last real token, which Hugging Face's decoder
  heads find from `input_ids` and the pad token: given `inputs_embeds` (peft's
  prompts) they read the last position, a pad in a right-padded row. So the
  last real token is found from the attention mask and its state is given to
  every position of the last block's output: whichever position the head pools,
  it reads that token. With a prefix (no virtual positions in the sequence) the
  same holds, and a pad that shares the eos id is never mistaken for text;
- a head that pools every position (no one position, anatomy's 'pooler') pools
  the prompt with the text: nothing is cut.
"""

import torch

from harness.anatomy import describe
from harness.errors import UserError


def check_room(model, virtual_tokens: int, method: str) -> None:
    """Virtual tokens take positions; a prompt that leaves no room for the text is a user error."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and virtual_tokens >= limit:
        raise UserError(
            f"method '{method}'",
            f"{virtual_tokens} virtual tokens leave no room in the model's {limit} positions",
            "use fewer num_virtual_tokens (prompt + text must fit in max_position_embeddings)",
        )


def no_token_embeddings(anatomy) -> str | None:
    """For `unsupported`: why virtual tokens cannot be prepended to this backbone's input, or None."""
    embedding = anatomy.embeddings.input.module
    if isinstance(embedding, torch.nn.Embedding):
        return None
    return (
        f"{anatomy.family}'s input goes through {type(embedding).__name__}, not a token embedding: "
        "virtual tokens are prepended to token embeddings"
    )


def token_width(model) -> int:
    """The width of the token embeddings, which is the width of a virtual token (ELECTRA's is below the model's)."""
    return int(model.get_input_embeddings().weight.shape[1])


def prompt_shape(model) -> dict:
    """The shape fields of peft's prompt configs, from the model itself: peft would look them up by config names
    some models lack (DistilBERT's `n_heads`), and take config.hidden_size as the token width."""
    anatomy = describe(model)
    return {
        "token_dim": token_width(model),
        "num_layers": len(anatomy.blocks),
        "num_attention_heads": anatomy.num_heads,
    }


def read_text_states(model, virtual_tokens: int) -> list:
    """Make the head read the text (module docstring); `virtual_tokens` are prepended to the sequence (0 for a
    prefix, which adds keys and values but no positions). Returns the hook handles."""
    anatomy = describe(model)
    last_block = anatomy.blocks[-1].module
    if anatomy.head.reads == "first" and virtual_tokens:

        def drop_virtual(module, args, output):
            return _map_hidden(output, lambda hidden: hidden[:, virtual_tokens:])

        return [last_block.register_forward_hook(drop_virtual)]
    if anatomy.head.reads != "last":
        return []
    seen = {}  # the attention mask the backbone was called with, for the last block's hook

    def remember_mask(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        seen["mask"] = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def forget_mask(module, args, output):
        seen.clear()

    def last_real_everywhere(module, args, output):
        return _map_hidden(output, lambda hidden: _last_real_state(hidden, seen.get("mask")).expand_as(hidden))

    base = anatomy.base.module
    return [
        base.register_forward_pre_hook(remember_mask, with_kwargs=True),
        base.register_forward_hook(forget_mask),
        last_block.register_forward_hook(last_real_everywhere),
    ]


def _last_real_state(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(batch, 1, width): each row's state at its last attended position (the text is the mask's last columns:
    a prefix's or prompt's mask is prepended); the last position when there is no mask."""
    batch, length = hidden.shape[:2]
    positions = torch.arange(length, device=hidden.device)
    if mask is None:
        last = positions[-1].expand(batch)
    else:
        last = (positions * mask[:, -length:].to(hidden.device).bool()).argmax(-1)  # rightmost real: any padding side
    return hidden[torch.arange(batch, device=hidden.device), last][:, None]


def _map_hidden(output, change):
    """A block's output with its hidden states changed: blocks return the tensor, or a tuple that starts with it."""
    if isinstance(output, torch.Tensor):
        return change(output)
    return (change(output[0]), *output[1:])
