"""Prompt tuning through `peft`: trainable soft-prompt vectors prepended to the input embeddings.

Lester, Al-Rfou & Constant, "The Power of Scale for Parameter-Efficient
Prompt Tuning", EMNLP 2021.
Trainable: num_virtual_tokens prompt vectors as wide as the token embeddings
(default 100, the paper's main setting), initialised from the embeddings of
randomly sampled vocabulary tokens (the paper's sampled-vocab initialisation),
plus the task head. Not back-propagated through: nothing is skipped; the
gradient reaches the prompt through the whole frozen network, and the sequence
grows by num_virtual_tokens, so time and memory grow with the prompt.

Departures from the paper: the paper classifies with T5's text output (the
label's words) and no new parameters; a BERT encoder has no such output, so a
freshly initialised classification head is trained too (peft's
sequence-classification wrapper). The head reads the text, not the prompt
(methods/_prompts.py): on an encoder its [CLS] state (peft prepends the
prompt, so the position a BERT head pools would be a virtual token the
pretrained pooler never saw; the virtual positions are cut before the head);
on a decoder (GPT-2, Llama), which the paper's T5 is not, the last real
token's state, found from the attention mask, since given peft's
`inputs_embeds` Hugging Face's decoder heads cannot find it. Not on image
models (ViT): the prompt is prepended to token embeddings. The paper samples
from the 5,000 most frequent tokens; peft samples from the whole vocabulary.
The paper uses Adafactor at lr 0.3; with the harness's AdamW on this small
post-LayerNorm encoder the default is 3e-2 (Adam's step does not scale with
the parameter's size as Adafactor's does).
"""

from methods._peft import PeftMethod, head_names, peft_task_type
from methods._prompts import check_room, no_token_embeddings, prompt_shape, read_text_states, token_width


class PromptTuning(PeftMethod):
    name = "prompt_tuning"
    family = "PETL"
    description = "prompt tuning (peft): soft prompt vectors prepended to the input, head trained"
    paper = "Lester et al., The Power of Scale for Parameter-Efficient Prompt Tuning, EMNLP 2021"
    trains = "soft prompt (num_virtual_tokens x hidden) + head"
    default_lr = 3e-2
    defaults = {"num_virtual_tokens": 100, "init": "sample_vocab"}

    def check_hparams(self):
        if self.hparams["num_virtual_tokens"] < 1:
            raise ValueError("num_virtual_tokens must be at least 1")
        if self.hparams["init"] not in ("sample_vocab", "random"):
            raise ValueError("init must be 'sample_vocab' or 'random'")

    def unsupported(self, anatomy):
        return no_token_embeddings(anatomy)

    def peft_config(self, model, task):
        from peft import PromptTuningConfig, PromptTuningInit

        check_room(model, self.hparams["num_virtual_tokens"], self.name)
        init = PromptTuningInit.SAMPLE_VOCAB if self.hparams["init"] == "sample_vocab" else PromptTuningInit.RANDOM
        return PromptTuningConfig(
            task_type=peft_task_type(task),
            num_virtual_tokens=self.hparams["num_virtual_tokens"],
            prompt_tuning_init=init,
            **prompt_shape(model),
            modules_to_save=head_names(model),
        )

    def apply(self, model, task):
        read_text_states(model, self.hparams["num_virtual_tokens"])
        return super().apply(model, task)

    def adapter_params(self, model, task):
        return self.hparams["num_virtual_tokens"] * token_width(model)
