"""Parallel adapter (scaled, at the FFN) of He et al.'s unified view of PETL.

He, Zhou, Ma, Berg-Kirkpatrick & Neubig, "Towards a Unified View of
Parameter-Efficient Transfer Learning", ICLR 2022.
A bottleneck runs beside each layer's FFN on the FFN's input x, and its
output, times a fixed scale s, is added to the FFN's output:
h = FFN(x) + s * up(relu(down(x))), before the residual add and LayerNorm.
Defaults: the FFN position and s = 4 (the paper's "scaled PA", its best
variant), bottleneck 16 (the authors' GLUE script for RoBERTa-base), down
initialised as nn.Linear's default and up as zero (the paper's LoRA-style
init), so the model is exactly unchanged at step 0.
Trainable: the adapters and the task head.
Not back-propagated through: nothing is skipped; the gradient reaches the
lower adapters through the frozen layers above them.

Implemented as a forward pre-hook on the FFN output sublayer that adds the
branch to its residual input (methods/_bert.py describes the layout).

Departures from the paper: the authors' GLUE script (which adds prefixes to
attention as well, their "MAM adapter") uses s = 2 and lr 1e-4 for 10
epochs; here s is the paper's 4 and the default lr 1e-3 is a choice for this
small encoder and short runs.
"""

import torch

from harness.method import Method, count, freeze_all, head_parameters
from methods._adapters import ACTIVATIONS, Bottleneck, bottleneck_params
from methods._bert import encoder_layers


def add_parallel_branch(output: torch.nn.Module, adapter: Bottleneck, scale: float) -> None:
    """Attach the adapter to the FFN output sublayer and add s * adapter(x) to its residual input.

    The sublayer computes LayerNorm(dropout(dense(hidden_states)) + input_tensor),
    so adding the branch to input_tensor adds it beside the FFN, before the
    residual and LayerNorm. A pre-hook (rather than a wrapper module) keeps the
    sublayer where BERT-family code and other methods expect it.
    """
    output.parallel_adapter = adapter

    def add_branch(module, args):
        hidden_states, input_tensor = args[0], args[1]
        return (hidden_states, input_tensor + scale * module.parallel_adapter(input_tensor), *args[2:])

    output.register_forward_pre_hook(add_branch)


class ParallelAdapter(Method):
    name = "parallel_adapter"
    family = "PETL"
    description = "parallel adapter (He et al.): scaled bottleneck beside each FFN, head trained"
    paper = "He et al., Towards a Unified View of Parameter-Efficient Transfer Learning, ICLR 2022"
    trains = "1 parallel bottleneck per layer (at the FFN) + head"
    default_lr = 1e-3
    defaults = {"bottleneck": 16, "scale": 4.0, "activation": "relu"}

    def check_hparams(self):
        if self.hparams["bottleneck"] < 1:
            raise ValueError("bottleneck must be at least 1")
        if self.hparams["activation"] not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}")

    def apply(self, model, task):
        layers = encoder_layers(model, self.name)
        freeze_all(model)
        d = model.config.hidden_size
        for layer in layers:
            adapter = Bottleneck(d, self.hparams["bottleneck"], self.hparams["activation"], "lora").to(
                layer.output.dense.weight.dtype
            )
            add_parallel_branch(layer.output, adapter, self.hparams["scale"])
        for p in head_parameters(model).values():
            p.requires_grad_(True)
        return model

    def expected_trainable_params(self, model, task):
        d = model.config.hidden_size
        return len(encoder_layers(model, self.name)) * bottleneck_params(d, self.hparams["bottleneck"]) + count(
            head_parameters(model).values()
        )
