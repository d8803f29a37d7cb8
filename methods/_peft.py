"""What the methods that wrap `peft` share: freeze, build the config, wrap.

A subclass says which peft config it wants (`peft_config`) and how many
parameters that config adds, computed from the model's shapes
(`adapter_params`). The task head is always trained in full: peft's
`modules_to_save` keeps a trainable copy of it, and it is counted here. A
causal LM has no task head (harness.method.head_parameters): its pretrained
head stays frozen, and peft's task type follows the task.
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


def peft_task_type(task):
    """peft's task type follows the task: a causal LM's (its wrapper then generates, and prompts its labels), else
    sequence classification."""
    from peft import TaskType

    return TaskType.CAUSAL_LM if task.is_causal_lm else TaskType.SEQ_CLS


def head_names(model) -> list[str] | None:
    """Top-level module names of the head, for peft's modules_to_save; None when there is no task head to train
    (a causal LM's)."""
    return sorted({name.split(".")[0] for name in head_parameters(model)}) or None


def modules(model, names):
    """name -> module for the given fully qualified names."""
    table = dict(model.named_modules())
    return [table[n] for n in names]
