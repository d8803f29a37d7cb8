"""P-tuning through `peft`: virtual-token embeddings produced by a trainable bi-LSTM + MLP prompt encoder.

Liu, Zheng, Du, Ding, Qian, Yang & Tang, "GPT Understands, Too", AI Open 2023
(arXiv 2021).
Trainable: the prompt encoder, as in the paper: an embedding of
num_virtual_tokens pseudo tokens, a two-layer bidirectional LSTM (hidden size
half the model width, so its output has the model width, as in the authors'
code), and a ReLU MLP of two layers; its output is prepended to the input
embeddings. All of it and the task head are trained and counted (at inference
only the encoder's output would be kept). Not back-propagated through:
nothing is skipped; the gradient reaches the encoder through the whole frozen
network.

Departures from the paper: the paper interleaves prompt tokens with the input
in a task template and predicts label words with the masked-LM head; peft and
this harness prepend all virtual tokens and train a fresh classification head.
The head reads the text, not the prompt (methods/_prompts.py): on an encoder
its [CLS] state (the virtual positions are cut before the head, whose first
position would otherwise be a virtual token the pretrained pooler never saw);
on a decoder the last real token's state, found from the attention mask (given
peft's `inputs_embeds`, Hugging Face's decoder heads cannot find it). Not on image models (ViT): the prompt
is prepended to token embeddings. The model width below is the token
embeddings' (ELECTRA's are narrower than its blocks). num_virtual_tokens 20
(peft's documented example) stands in for the paper's per-task templates. The
learning rate 1e-3 is a documented choice for this encoder (peft's P-tuning
sequence-classification example uses it).
"""

from methods._peft import PeftMethod, head_names, peft_task_type
from methods._prompts import check_room, no_token_embeddings, prompt_shape, read_text_states, token_width


class PTuning(PeftMethod):
    name = "p_tuning"
    family = "PETL"
    description = "P-tuning (peft): prompt embeddings from a trainable bi-LSTM+MLP encoder, head trained"
    paper = "Liu et al., GPT Understands, Too, AI Open 2023"
    trains = "prompt encoder (embedding, bi-LSTM, MLP) + head"
    default_lr = 1e-3
    # encoder_hidden_size 0 means half the model width, the authors' choice
    defaults = {"num_virtual_tokens": 20, "encoder": "lstm", "encoder_hidden_size": 0, "encoder_num_layers": 2}

    def check_hparams(self):
        if self.hparams["num_virtual_tokens"] < 1 or self.hparams["encoder_num_layers"] < 1:
            raise ValueError("num_virtual_tokens and encoder_num_layers must be at least 1")
        if self.hparams["encoder"] not in ("lstm", "mlp"):
            raise ValueError("encoder must be 'lstm' or 'mlp'")
        if self.hparams["encoder_hidden_size"] < 0:
            raise ValueError("encoder_hidden_size must be positive (or 0 for half the model width)")

    def unsupported(self, anatomy):
        return no_token_embeddings(anatomy)

    def unplannable(self):
        if self.hparams["encoder"] == "lstm":
            # measured: 4 workspaces of 344,064 bytes on MiniLM at batch 8, each planned as 0 bytes
            return "the CPU LSTM kernel saves a workspace for backward that torch's fake kernel leaves out"
        return None

    def _hidden(self, model):
        return self.hparams["encoder_hidden_size"] or token_width(model) // 2

    def peft_config(self, model, task):
        from peft import PromptEncoderConfig, PromptEncoderReparameterizationType

        check_room(model, self.hparams["num_virtual_tokens"], self.name)
        kind = (
            PromptEncoderReparameterizationType.LSTM
            if self.hparams["encoder"] == "lstm"
            else PromptEncoderReparameterizationType.MLP
        )
        return PromptEncoderConfig(
            task_type=peft_task_type(task),
            num_virtual_tokens=self.hparams["num_virtual_tokens"],
            encoder_reparameterization_type=kind,
            encoder_hidden_size=self._hidden(model),
            encoder_num_layers=self.hparams["encoder_num_layers"],
            **prompt_shape(model),
            modules_to_save=head_names(model),
        )

    def apply(self, model, task):
        read_text_states(model, self.hparams["num_virtual_tokens"])
        return super().apply(model, task)

    def adapter_params(self, model, task):
        d, h, n = token_width(model), self._hidden(model), self.hparams["num_virtual_tokens"]
        total = n * d  # the pseudo-token embedding
        if self.hparams["encoder"] == "mlp":  # d -> h -> h -> d, with biases
            return total + (d * h + h) + (h * h + h) + (h * d + d)
        width = d
        for _ in range(
            self.hparams["encoder_num_layers"]
        ):  # per direction: 4 gates, input and recurrent weights, two biases
            total += 2 * (4 * h * (width + h) + 8 * h)
            width = 2 * h
        return total + (2 * h * 2 * h + 2 * h) + (2 * h * d + d)  # MLP head: 2h -> 2h -> d
