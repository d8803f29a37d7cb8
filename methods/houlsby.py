"""Houlsby adapters: two bottleneck adapters per layer, after the attention and the FFN projections.

Houlsby, Giurgiu, Jastrzebski, Morrone, de Laroussilhe, Gesmundo, Attariyan &
Gelly, "Parameter-Efficient Transfer Learning for NLP", ICML 2019.
In each layer, after the attention output projection (and its dropout) and
after the FFN output projection (and its dropout), before the residual add and
LayerNorm, h becomes h + up(gelu(down(h))), with a bottleneck of
hidden_size // reduction_factor. Weights start near zero (N(0, 1e-2)
truncated at two standard deviations, biases zero), so each adapter starts
near the identity, as the paper requires.
Trainable: the adapters, every norm of the backbone (the paper trains the
layer-normalisation parameters per task) and the task head.
Not back-propagated through: nothing is skipped; the gradient reaches the
lower adapters through the frozen layers above them.

The places are found by role (harness.anatomy): the output of each block's o
and ffn_out projections (methods/_adapters.py: `sublayer_output`).

Departures from the paper: the paper gives the adapter size m directly
(searching 8, 64, 256 on BERT-large, width 1024); here it is set as a
reduction factor, default 16, which is m = 64 on BERT-large and 24 on MiniLM
(width 384). The paper searched lr in {3e-5, 3e-4, 3e-3}; the default 1e-3 is
a choice for this small encoder. The GELU follows the authors' code (the
paper does not name the nonlinearity).

Beyond the post-norm BERT the paper adapted:
- Pre-norm blocks (GPT-2, Llama, ViT): the adapter still acts on the
  sublayer's output before the residual add, h + A(h) joining x + ..., so the
  residual stream itself is never adapted; no norm follows the sum in the
  block, as none did in the backbone.
- Where a sublayer's dropout is applied by code around the projection rather
  than by a BERT-style output module (GPT-2's resid_dropout, DistilBERT's FFN
  dropout, ViT's block dropout), the adapter reads the projection's output
  before that dropout, and the dropout acts on h + A(h).
- RMSNorm (Llama, Mistral): the norms trained are the backbone's RMSNorms, a
  scale and no bias each, and the final norm of a pre-norm stack with them.
- Gated FFNs (SwiGLU): the FFN adapter follows the down projection, whatever
  the gating before it.
"""

from harness.anatomy import describe
from harness.method import Method, count, freeze_all, head_parameters
from methods._adapters import (
    Bottleneck,
    attach,
    bottleneck_params,
    bottleneck_size,
    check_adapter_hparams,
    sublayer_output,
)

ADAPTED = ("o", "ffn_out")  # the projections whose sublayer output each block's two adapters follow


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
        anatomy = describe(model)
        freeze_all(model)
        for block in anatomy.blocks:
            for role in ADAPTED:
                projection = block.projections[role]
                width = projection.out_features
                adapter = Bottleneck(
                    width,
                    bottleneck_size(width, self.hparams["reduction_factor"]),
                    self.hparams["activation"],
                    self.hparams["init"],
                )
                adapter = attach(projection, "houlsby", adapter)
                sublayer_output(model, projection).register_forward_hook(adapter.add_to_output)
        trained = list(head_parameters(model).values())
        if self.hparams["train_layer_norms"]:
            trained += [p for norm in anatomy.norms() for p in norm.module.parameters()]
        for p in trained:
            p.requires_grad_(True)
        return model

    def expected_trainable_params(self, model, task):
        anatomy = describe(model)
        adapters = sum(
            bottleneck_params(width, bottleneck_size(width, self.hparams["reduction_factor"]))
            for block in anatomy.blocks
            for width in (block.projections[role].out_features for role in ADAPTED)
        )
        norms = (
            count(p for norm in anatomy.norms() for p in norm.module.parameters())
            if self.hparams["train_layer_norms"]
            else 0
        )
        return adapters + norms + count(head_parameters(model).values())
