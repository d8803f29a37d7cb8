"""Full fine-tuning: every parameter of backbone and head is trained.

The reference point for accuracy and the upper end for memory.
"""

from harness.method import Method, count


class FullFineTune(Method):
    name = "full"
    family = "baseline"
    description = "full fine-tuning: every weight of backbone and head is trained"
    paper = "Devlin et al., BERT, NAACL 2019"
    trains = "all weights"
    default_lr = 5e-5

    def apply(self, model, task):
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def expected_trainable_params(self, model, task):
        return count(model.parameters())
