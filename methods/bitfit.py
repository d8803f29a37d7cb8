"""BitFit: train only the bias terms of the backbone, plus the task head.

Ben Zaken, Ravfogel & Goldberg, "BitFit: Simple Parameter-efficient
Fine-tuning for Transformer-based Masked Language-models", ACL 2022.
All biases of the backbone are trained (attention q/k/v/output, both
feed-forward layers, every norm; GPT-2's Conv1D layers and ViT's patch
convolution included), as in the paper's main setting; the paper's
sub-variant that trains only the query and second-MLP biases is not offered.

Departures from the paper: it considered BERT encoders, where every layer has
biases. Decoders differ: Qwen2 keeps biases on q, k and v only, so BitFit
trains just those there; Llama and Mistral have none at all (bias-free
projections, RMSNorm), where BitFit would silently become a linear probe, so
the method refuses them.
"""

from harness.anatomy import describe
from harness.method import Method, count, freeze_all, head_parameters


class BitFit(Method):
    name = "bitfit"
    family = "PETL"
    description = "BitFit: only bias terms (and the head) are trained"
    paper = "Ben Zaken et al., BitFit, ACL 2022"
    trains = "all biases + head"
    default_lr = 1e-3

    def unsupported(self, anatomy):
        if anatomy.bias_count() == 0:
            return f"{anatomy.family} has no bias terms (bias-free projections and norms): only the head would train"
        return None

    def apply(self, model, task):
        freeze_all(model)
        prefix = model.base_model_prefix + "."
        for name, p in model.named_parameters():
            if name.startswith(prefix) and name.endswith(".bias"):
                p.requires_grad_(True)
        for p in head_parameters(model).values():
            p.requires_grad_(True)
        return model

    def expected_trainable_params(self, model, task):
        return describe(model).bias_count() + count(head_parameters(model).values())
