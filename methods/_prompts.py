"""What the methods that prepend virtual tokens to the input share.

The prompt takes positions in the model's position table, so it must leave
room for the text. And the head must still read the text: a BERT-style head
pools the first position, which after prepending is a virtual token that the
pretrained pooler never saw. `read_text_states` drops the virtual positions
from the encoder's output, so the head reads [CLS] as it does for every other
method, while the virtual tokens still act on the text in every layer.
"""

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


def read_text_states(model, virtual_tokens: int, method: str):
    """Drop the first `virtual_tokens` positions from the encoder's output; returns the hook handle."""
    encoder = getattr(model.base_model, "encoder", None)
    if encoder is None:
        raise UserError(
            f"method '{method}'",
            f"{type(model).__name__} has no base_model.encoder whose output the head reads",
            "use a BERT-style encoder backbone",
        )

    def drop_virtual(module, args, output):
        output.last_hidden_state = output.last_hidden_state[:, virtual_tokens:]
        return output

    return encoder.register_forward_hook(drop_virtual)
