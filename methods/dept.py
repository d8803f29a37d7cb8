"""DePT: a shorter soft prompt plus a low-rank update of the input embeddings, with two learning rates.

Shi & Lipani, "DePT: Decomposed Prompt Tuning for Parameter-Efficient
Fine-tuning", ICLR 2024.
The input's token embeddings E (one row per position, up to max_length) get a
position-wise update A B, with A (max_length x r) and B (r x hidden_size);
then a soft prompt of num_virtual_tokens vectors is prepended. The paper's
T5-base setting keeps the budget of a 100-token prompt: 60 prompt tokens,
r = 30, max_length 256. A starts as nn.Linear's default (Kaiming-uniform) and
B at zero, so the embeddings are unchanged at step 0 (as in the authors'
code); the prompt starts from the embeddings of randomly sampled vocabulary
tokens. The prompt trains at the cell's lr, A and B at `lowrank_lr`
(param_groups). Trainable: prompt, A, B and the task head.
Not back-propagated through: nothing is skipped; the gradient reaches prompt
and embedding update through the whole frozen network.

Departures from the paper: T5 generates the label's words; here a freshly
initialised head classifies the text and trains at the low-rank rate, the
paper having no head. The head reads the text, not the prompt
(methods/_prompts.py): an encoder's head its [CLS] state (the virtual
positions are cut before it), a decoder's (GPT-2, Llama: not in the paper) the
last real token's, found from the attention mask, as the model is given
`inputs_embeds`. Not on image models (ViT): the prompt and the update are of
token embeddings. The authors' code scales A B by alpha / sqrt(r); here the
scale is 1 (with Adam this only changes B's effective step size). The paper
uses lr 3e-1 (prompt) with T5 and searches 1e-4 to 5e-3 for A, B; on this
small post-LayerNorm encoder with AdamW the defaults are 3e-2 (as for
prompt_tuning) and 5e-4.
"""

import torch

from harness.method import Method, count, freeze_all, head_parameters
from methods._prompts import check_room, no_token_embeddings, read_text_states, token_width


class DePTModel(torch.nn.Module):
    """Wraps a sequence classifier: updates the token embeddings, prepends the prompt, calls the model."""

    def __init__(self, model, prompt: torch.Tensor, rank: int, max_length: int):
        super().__init__()
        self.model = model
        width = prompt.shape[1]
        self.prompt = torch.nn.Parameter(prompt)
        self.lora_a = torch.nn.Parameter(torch.empty(max_length, rank, dtype=prompt.dtype))
        self.lora_b = torch.nn.Parameter(torch.zeros(rank, width, dtype=prompt.dtype))
        torch.nn.init.kaiming_uniform_(self.lora_a, a=5**0.5)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, **kwargs):
        batch, length = input_ids.shape
        if length > self.lora_a.shape[0]:
            raise ValueError(
                f"dept: input of {length} tokens is longer than max_length {self.lora_a.shape[0]}; "
                "raise the method's max_length or lower the suite's max_seq_length"
            )
        virtual = self.prompt.shape[0]
        positions = getattr(self.model.config, "max_position_embeddings", None)
        if positions is not None and virtual + length > positions:
            raise ValueError(
                f"dept: {virtual} prompt + {length} input tokens exceed the model's {positions} positions; "
                "lower num_virtual_tokens or the suite's max_seq_length"
            )
        embeds = self.model.get_input_embeddings()(input_ids) + self.lora_a[:length] @ self.lora_b
        embeds = torch.cat([self.prompt.expand(batch, -1, -1), embeds], dim=1)
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask.new_ones(batch, virtual), attention_mask], dim=1)
        if token_type_ids is not None:  # passed on only when given: decoders such as Llama take none
            kwargs["token_type_ids"] = torch.cat([token_type_ids.new_zeros(batch, virtual), token_type_ids], dim=1)
        labels = kwargs.get("labels")
        if labels is not None and labels.dim() == 2:  # a causal LM's labels of every position: the prompt predicts none
            kwargs["labels"] = torch.cat([labels.new_full((batch, virtual), -100), labels], dim=1)
        positions = kwargs.get("position_ids")
        if positions is not None:  # the prompt takes the first positions, the text follows
            prompt_positions = torch.arange(virtual, device=positions.device).expand(batch, -1)
            kwargs["position_ids"] = torch.cat([prompt_positions, positions + virtual], dim=1)
        return self.model(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)


class DePT(Method):
    name = "dept"
    family = "PETL"
    description = "DePT: shorter soft prompt + low-rank update of input embeddings, two learning rates, head trained"
    paper = "Shi & Lipani, DePT: Decomposed Prompt Tuning for Parameter-Efficient Fine-tuning, ICLR 2024"
    trains = "soft prompt + low-rank embedding update A,B + head"
    default_lr = 3e-2  # the prompt's; A, B and the head use lowrank_lr
    defaults = {"num_virtual_tokens": 60, "r": 30, "max_length": 256, "lowrank_lr": 5e-4}

    def check_hparams(self):
        for key in ("num_virtual_tokens", "r", "max_length"):
            if self.hparams[key] < 1:
                raise ValueError(f"{key} must be at least 1")
        if self.hparams["lowrank_lr"] <= 0:
            raise ValueError("lowrank_lr must be positive")

    def unsupported(self, anatomy):
        return no_token_embeddings(anatomy)

    def apply(self, model, task):
        n = self.hparams["num_virtual_tokens"]
        check_room(model, n, self.name)
        freeze_all(model)
        vocab = model.get_input_embeddings().weight
        rows = torch.randint(0, vocab.shape[0], (n,))
        wrapped = DePTModel(model, vocab[rows].detach().clone(), self.hparams["r"], self.hparams["max_length"])
        read_text_states(model, n)
        for p in head_parameters(model).values():
            p.requires_grad_(True)
        return wrapped

    def expected_trainable_params(self, model, task):
        d, h = token_width(model), self.hparams
        return (
            h["num_virtual_tokens"] * d + h["max_length"] * h["r"] + h["r"] * d + count(head_parameters(model).values())
        )

    def param_groups(self, model, lr):
        slow = [p for name, p in model.named_parameters() if p.requires_grad and name != "prompt"]
        return [{"params": [model.prompt], "lr": lr}, {"params": slow, "lr": self.hparams["lowrank_lr"]}]
