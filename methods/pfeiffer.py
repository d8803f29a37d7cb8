"""Pfeiffer adapters: one bottleneck adapter per layer, after the FFN sublayer's LayerNorm.

Pfeiffer, Kamath, Rücklé, Cho & Gurevych, "AdapterFusion: Non-Destructive
Task Composition for Transfer Learning", EACL 2021 (the single-task adapter
architecture it selects, known as the Pfeiffer adapter).
Only the FFN sublayer is adapted: with h the FFN's projected output and x its
input, the layer's output LayerNorm(h + x) becomes
LayerNorm(h + x + up(relu(down(LayerNorm(h + x))))), the same frozen
LayerNorm applied before and after the adapter (as the reference
implementation, adapter-transformers' PfeifferConfig, does). Bottleneck
hidden_size // 16 (reduction factor 16, the paper's), weights N(0, 0.02),
biases zero, so the layer starts near its pretrained function.
Trainable: the adapters and the task head; the backbone, LayerNorms included,
stays frozen.
Not back-propagated through: nothing is skipped; the gradient reaches the
lower adapters through the frozen layers above them.

Departures from the paper: the paper's lr is 1e-4 over many epochs with
BERT/RoBERTa-base; the default 1e-3 is a choice for this small encoder and
short runs.
"""

import torch

from harness.method import Method, count, freeze_all, head_parameters
from methods._adapters import Bottleneck, bottleneck_params, bottleneck_size, check_adapter_hparams
from methods._bert import encoder_layers


class AdaptedNorm(torch.nn.Module):
    """Stands in for the FFN sublayer's LayerNorm, which receives z = h + x: LN(z + adapter(LN(z)))."""

    def __init__(self, norm: torch.nn.LayerNorm, adapter: Bottleneck):
        super().__init__()
        self.norm, self.adapter = norm, adapter

    def forward(self, z):
        return self.norm(z + self.adapter(self.norm(z)))


class Pfeiffer(Method):
    name = "pfeiffer"
    family = "PETL"
    description = "Pfeiffer adapters: one bottleneck adapter per layer after the FFN, head trained"
    paper = "Pfeiffer et al., AdapterFusion: Non-Destructive Task Composition for Transfer Learning, EACL 2021"
    trains = "1 bottleneck adapter per layer + head"
    default_lr = 1e-3
    defaults = {"reduction_factor": 16, "activation": "relu", "init": "bert"}

    def check_hparams(self):
        check_adapter_hparams(self.hparams)

    def apply(self, model, task):
        layers = encoder_layers(model, self.name)
        freeze_all(model)
        d = model.config.hidden_size
        m = bottleneck_size(d, self.hparams["reduction_factor"])
        for layer in layers:
            norm = layer.output.LayerNorm
            adapter = Bottleneck(d, m, self.hparams["activation"], self.hparams["init"]).to(norm.weight.dtype)
            layer.output.LayerNorm = AdaptedNorm(norm, adapter)
        for p in head_parameters(model).values():
            p.requires_grad_(True)
        return model

    def expected_trainable_params(self, model, task):
        d = model.config.hidden_size
        adapters = len(encoder_layers(model, self.name)) * bottleneck_params(
            d, bottleneck_size(d, self.hparams["reduction_factor"])
        )
        return adapters + count(head_parameters(model).values())
