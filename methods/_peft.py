"""What the methods that wrap `peft` share: freeze, build the config, wrap.

A subclass says which peft config it wants (`peft_config`) and how many
parameters that config adds, computed from the model's shapes
(`adapter_params`). The task head is always trained in full: peft's
`modules_to_save` keeps a trainable copy of it, and it is counted here.
"""

from harness.method import Method, count, freeze_all, head_parameters


class PeftMethod(Method):
    """Base class, not registered itself (it has no `name`)."""

    def peft_config(self, model, task):
        raise NotImplementedError

    def adapter_params(self, model, task) -> int:
        """Trainable parameters the peft config adds, from the model's config and shapes."""
        raise NotImplementedError

    def apply(self, model, task):
        from peft import get_peft_model

        freeze_all(model)
        return get_peft_model(model, self.peft_config(model, task))

    def expected_trainable_params(self, model, task):
        return self.adapter_params(model, task) + count(head_parameters(model).values())


def head_names(model) -> list[str]:
    """Top-level module names of the head, for peft's modules_to_save."""
    return sorted({name.split(".")[0] for name in head_parameters(model)})


def modules(model, names):
    """name -> module for the given fully qualified names."""
    table = dict(model.named_modules())
    return [table[n] for n in names]
