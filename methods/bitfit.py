"""BitFit: train only the bias terms of the backbone, plus the task head.

Ben Zaken, Ravfogel & Goldberg, "BitFit: Simple Parameter-efficient
Fine-tuning for Transformer-based Masked Language-models", ACL 2022.
All biases are trained (attention q/k/v/output, both feed-forward layers and
every LayerNorm), as in the paper's main setting; the paper's sub-variant that
trains only the query and second-MLP biases is not offered.
"""

import torch

from harness.method import Method, freeze_all, head_parameters


class BitFit(Method):
    name = "bitfit"
    family = "PETL"
    description = "BitFit: only bias terms (and the head) are trained"
    paper = "Ben Zaken et al., BitFit, ACL 2022"
    trains = "all biases + head"
    default_lr = 1e-3

    def apply(self, model, task):
        freeze_all(model)
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.requires_grad_(True)
        for p in head_parameters(model).values():
            p.requires_grad_(True)
        return model

    def expected_trainable_params(self, model, task):
        head = head_parameters(model)
        head_ids = {id(p) for p in head.values()}
        biases = sum(
            m.bias.numel()
            for m in model.modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.LayerNorm))
            and m.bias is not None
            and id(m.bias) not in head_ids
        )
        return biases + sum(p.numel() for p in head.values())
