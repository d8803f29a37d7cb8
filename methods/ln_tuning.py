"""LayerNorm tuning through `peft`: only the LayerNorm gains and biases (and the head) are trained.

Zhao, Wang, Chen, Fan, Li & Zhang, "Tuning LayerNorm in Attention: Towards
Efficient Multi-Modal LLM Finetuning", ICLR 2024.
Trainable: a copy of every norm (LayerNorm or RMSNorm) of the backbone (peft's LN tuning keeps
the pretrained LayerNorm frozen and trains a copy that replaces it in the
forward pass, so gain and bias of each LayerNorm), plus the task head.
Not back-propagated through: nothing is skipped; gradients flow through the
whole frozen network to reach the LayerNorms.

Departures from the paper: the paper tunes the LayerNorms of a multi-modal
LLM's attention blocks (and its vision-language connector); on a BERT encoder
the counterparts are the LayerNorms after each attention and FFN sublayer, and
the embedding LayerNorm, all of which are tuned here; on pre-norm decoders
and ViTs, every block's two norms and the final one. RMSNorm (Llama, Mistral)
has a gain and no bias, so there only gains train. The paper's learning
rates are for 7B-13B LLMs; 1e-3 is a choice for this small encoder, the same
as BitFit's, which also trains only vectors.
"""

import warnings

from harness.anatomy import describe
from methods._peft import PeftMethod, head_names, peft_task_type


class LayerNormTuning(PeftMethod):
    name = "ln_tuning"
    family = "PETL"
    description = "LayerNorm tuning (peft): only LayerNorm gains and biases are trained, head trained"
    paper = "Zhao et al., Tuning LayerNorm in Attention: Towards Efficient Multi-Modal LLM Finetuning, ICLR 2024"
    trains = "all LayerNorm gains and biases + head"
    default_lr = 1e-3

    def peft_config(self, model, task):
        from peft import LNTuningConfig

        return LNTuningConfig(
            task_type=peft_task_type(task),
            target_modules=sorted(n.path for n in describe(model).norms()),
            modules_to_save=head_names(model),
        )

    def apply(self, model, task):
        with warnings.catch_warnings():  # peft probes every wrapped layer for in/out features; a LayerNorm has none
            warnings.filterwarnings("ignore", message="Unsupported layer type")
            return super().apply(model, task)

    def adapter_params(self, model, task):
        return sum(p.numel() for norm in describe(model).norms() for p in norm.module.parameters())
