"""Houlsby adapters: two bottleneck adapters per layer, after the attention and the FFN projections.

Houlsby, Giurgiu, Jastrzebski, Morrone, de Laroussilhe, Gesmundo, Attariyan &
Gelly, "Parameter-Efficient Transfer Learning for NLP", ICML 2019.
In each layer, after the attention output projection (and its dropout) and
after the FFN output projection (and its dropout), before the residual add and
LayerNorm, h becomes h + up(gelu(down(h))), with a bottleneck of
hidden_size // reduction_factor. Weights start near zero (N(0, 1e-2)
truncated at two standard deviations, biases zero), so each adapter starts
near the identity, as the paper requires.
Trainable: the adapters, every LayerNorm of the backbone (the paper trains the
layer-normalisation parameters per task) and the task head.
Not back-propagated through: nothing is skipped; the gradient reaches the
lower adapters through the frozen layers above them.

Departures from the paper: the paper gives the adapter size m directly
(searching 8, 64, 256 on BERT-large, width 1024); here it is set as a
reduction factor, default 16, which is m = 64 on BERT-large and 24 on MiniLM
(width 384). The paper searched lr in {3e-5, 3e-4, 3e-3}; the default 1e-3 is
a choice for this small encoder. The GELU follows the authors' code (the
paper does not name the nonlinearity).
"""

import torch

from harness.method import Method, count, freeze_all, head_parameters
from methods._adapters import Bottleneck, bottleneck_params, bottleneck_size, check_adapter_hparams
from methods._bert import encoder_layers, layer_norms


class AdapterAfter(torch.nn.Module):
    """Stands in for a sublayer's dropout: dropout first, then h + adapter(h)."""

    def __init__(self, dropout: torch.nn.Module, adapter: Bottleneck):
        super().__init__()
        self.dropout, self.adapter = dropout, adapter

    def forward(self, h):
        h = self.dropout(h)
        return h + self.adapter(h)


class Houlsby(Method):
    name = "houlsby"
    family = "PETL"
    description = (
        "Houlsby adapters: two bottleneck adapters per layer (after attention and FFN), LayerNorms and head trained"
    )
    paper = "Houlsby et al., Parameter-Efficient Transfer Learning for NLP, ICML 2019"
    trains = "2 bottleneck adapters per layer + all LayerNorms + head"
    default_lr = 1e-3
    defaults = {"reduction_factor": 16, "activation": "gelu", "init": "near_zero", "train_layer_norms": True}

    def check_hparams(self):
        check_adapter_hparams(self.hparams)

    def apply(self, model, task):
        layers = encoder_layers(model, self.name)
        freeze_all(model)
        d = model.config.hidden_size
        m = bottleneck_size(d, self.hparams["reduction_factor"])
        for layer in layers:
            for sublayer in (layer.attention.output, layer.output):
                adapter = Bottleneck(d, m, self.hparams["activation"], self.hparams["init"]).to(
                    sublayer.dense.weight.dtype
                )
                sublayer.dropout = AdapterAfter(sublayer.dropout, adapter)
        trained = list(head_parameters(model).values())
        if self.hparams["train_layer_norms"]:
            trained += [p for ln in layer_norms(model).values() for p in ln.parameters()]
        for p in trained:
            p.requires_grad_(True)
        return model

    def expected_trainable_params(self, model, task):
        d = model.config.hidden_size
        adapters = (
            2
            * len(encoder_layers(model, self.name))
            * bottleneck_params(d, bottleneck_size(d, self.hparams["reduction_factor"]))
        )
        norms = (
            count(p for ln in layer_norms(model).values() for p in ln.parameters())
            if self.hparams["train_layer_norms"]
            else 0
        )
        return adapters + norms + count(head_parameters(model).values())
