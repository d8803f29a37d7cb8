"""Linear probe: the backbone is frozen and only the task head is trained.

The lower end for memory and, usually, for accuracy. The head is the model's
own task head, trained in full, wherever it reads (BERT's classifier on the
pooled [CLS] state, with the backbone's pooler frozen; RoBERTa's and
DistilBERT's two-layer heads on the first token; a decoder's bias-free score
layer on the last real token; ViT's classifier on [CLS]).
"""

import torch

from harness.anatomy import describe, in_out_features
from harness.method import Method, freeze_all, head_parameters


class LinearProbe(Method):
    name = "linear_probe"
    family = "baseline"
    description = "linear probe: frozen backbone, only the classification head is trained"
    paper = "Alain & Bengio, Understanding intermediate layers using linear classifier probes, 2016"
    trains = "task head"
    default_lr = 1e-3

    def unsupported(self, anatomy):
        if anatomy.head.reads == "every":
            return "a causal LM's head is its pretrained output embeddings: there is no task head to probe"
        return None

    def apply(self, model, task):
        freeze_all(model)
        for p in head_parameters(model).values():
            p.requires_grad_(True)
        return model

    def expected_trainable_params(self, model, task):
        """Worked out from the head's layers' shapes: weight and bias of each linear layer outside the backbone
        (a norm inside a head, if any, counted by its parameters)."""
        total = 0
        for located in describe(model).head.modules:
            for module in located.module.modules():
                if isinstance(module, torch.nn.Linear):
                    fan_in, fan_out = in_out_features(module)
                    total += fan_in * fan_out + (fan_out if module.bias is not None else 0)
                elif not any(True for _ in module.children()):
                    total += sum(p.numel() for p in module.parameters(recurse=False))
        return total
