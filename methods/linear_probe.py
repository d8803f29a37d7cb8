"""Linear probe: the backbone is frozen and only the task head is trained.

The lower end for memory and, usually, for accuracy. The head is the model's
classifier on the pooled [CLS] state; the backbone's pooler stays frozen.
"""

from harness.method import Method, freeze_all, head_parameters


class LinearProbe(Method):
    name = "linear_probe"
    family = "baseline"
    description = "linear probe: frozen backbone, only the classification head is trained"
    paper = "Alain & Bengio, Understanding intermediate layers using linear classifier probes, 2016"
    trains = "task head"
    default_lr = 1e-3

    def apply(self, model, task):
        freeze_all(model)
        for p in head_parameters(model).values():
            p.requires_grad_(True)
        return model

    def expected_trainable_params(self, model, task):
        hidden = model.config.hidden_size
        return hidden * task.num_labels + task.num_labels
