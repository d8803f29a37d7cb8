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

The place is found through harness.anatomy: in a post-norm block, the block's
last norm (the FFN sublayer's), which a forward hook makes compute
norm(z + A(norm(z))) from its input z = h + x; the norm module stays where it
is.

Departures from the paper: the paper's lr is 1e-4 over many epochs with
BERT/RoBERTa-base; the default 1e-3 is a choice for this small encoder and
short runs.

Beyond the post-norm encoders the paper adapted:
- Pre-norm blocks (GPT-2, Llama, ViT) apply no norm to h + x: the block's
  output is z = x + FFN(norm(x)) itself. The adapter is the paper's with the
  norm the block does not have left out, z + A(z), on the block's output (so
  the adapter reads the residual stream, not a normalised state; the next
  block's own pre-norm normalises the sum).
- RMSNorm and gated FFNs change nothing here: the norm is only reused, frozen,
  in post-norm blocks, and the adapter follows the whole FFN.
"""

import torch

from harness.anatomy import describe
from harness.method import Method, count, freeze_all, head_parameters
from methods._adapters import Bottleneck, attach, bottleneck_params, bottleneck_size, check_adapter_hparams


class PfeifferAdapter(Bottleneck):
    def renormalise(self, norm, args, y):
        """Forward hook on the FFN sublayer's norm, whose input is z = h + x and output y = norm(z):
        norm(z + A(y)). `norm.forward` (not `norm(...)`) so this hook does not run again."""
        return norm.forward(args[0] + self(y))

    def add_to_block_output(self, block, args, output):
        """Forward hook on a pre-norm block: its output z (alone, or first of a tuple) becomes z + A(z)."""
        if isinstance(output, torch.Tensor):
            return output + self(output)
        return (output[0] + self(output[0]), *output[1:])


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

    def unsupported(self, anatomy):
        if anatomy.norm_order == "post" and not all(block.norms for block in anatomy.blocks):
            return "post-norm blocks without a norm module: no normalised layer output for the adapter to read"
        return None

    def apply(self, model, task):
        anatomy = describe(model)
        freeze_all(model)
        d = anatomy.hidden_size
        m = bottleneck_size(d, self.hparams["reduction_factor"])
        for block in anatomy.blocks:
            adapter = PfeifferAdapter(d, m, self.hparams["activation"], self.hparams["init"])
            adapter = attach(block.projections["ffn_out"], "pfeiffer", adapter)
            if block.norm_order == "post":
                block.norms[-1].module.register_forward_hook(adapter.renormalise)
            else:
                block.module.register_forward_hook(adapter.add_to_block_output)
        for p in head_parameters(model).values():
            p.requires_grad_(True)
        return model

    def expected_trainable_params(self, model, task):
        anatomy = describe(model)
        adapters = len(anatomy.blocks) * bottleneck_params(
            anatomy.hidden_size, bottleneck_size(anatomy.hidden_size, self.hparams["reduction_factor"])
        )
        return adapters + count(head_parameters(model).values())
