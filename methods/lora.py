"""LoRA through `peft`: low-rank updates B·A added to frozen weight matrices.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022.
Defaults follow the paper's GLUE setting for RoBERTa-base: rank 8 on the
query and value projections, alpha 16 (scale alpha/r = 2), dropout 0.1.
The task head is trained in full, as in the paper.
"""

from harness.method import Method, freeze_all, head_parameters


class LoRA(Method):
    name = "lora"
    family = "PETL"
    description = "LoRA (peft): rank-r updates on attention query/value, head trained"
    paper = "Hu et al., LoRA, ICLR 2022"
    trains = "low-rank A,B on query/value + head"
    default_lr = 5e-4
    defaults = {"r": 8, "alpha": 16, "dropout": 0.1, "target_modules": ["query", "value"]}

    def check_hparams(self):
        if self.hparams["r"] < 1:
            raise ValueError("r must be at least 1")

    def peft_config(self, model):
        from peft import LoraConfig, TaskType
        return LoraConfig(task_type=TaskType.SEQ_CLS, r=self.hparams["r"], lora_alpha=self.hparams["alpha"],
                          lora_dropout=self.hparams["dropout"], target_modules=list(self.hparams["target_modules"]),
                          modules_to_save=list(head_names(model)))

    def apply(self, model, task):
        from peft import get_peft_model
        freeze_all(model)
        return get_peft_model(model, self.peft_config(model))

    def expected_trainable_params(self, model, task):
        targets = tuple(self.hparams["target_modules"])
        low_rank = sum(self.hparams["r"] * (m.in_features + m.out_features)
                       for name, m in model.named_modules()
                       if name.split(".")[-1] in targets and hasattr(m, "in_features"))
        return low_rank + sum(p.numel() for p in head_parameters(model).values())


def head_names(model):
    """Top-level module names of the head, for peft's modules_to_save."""
    return sorted({name.split(".")[0] for name in head_parameters(model)})
