"""LoRA through `peft`: low-rank updates B·A added to frozen weight matrices.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022.
Defaults follow the paper's GLUE setting for RoBERTa-base: rank 8 on the
query and value projections, alpha 16 (scale alpha/r = 2), dropout 0.1.
The task head is trained in full, as in the paper.
"""

from methods._peft import PeftMethod, head_names


class LoRA(PeftMethod):
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

    def peft_config(self, model, task):
        from peft import LoraConfig, TaskType

        return LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=self.hparams["r"],
            lora_alpha=self.hparams["alpha"],
            lora_dropout=self.hparams["dropout"],
            target_modules=list(self.hparams["target_modules"]),
            modules_to_save=head_names(model),
        )

    def adapter_params(self, model, task):
        targets = tuple(self.hparams["target_modules"])
        return sum(
            self.hparams["r"] * (m.in_features + m.out_features)
            for name, m in model.named_modules()
            if name.split(".")[-1] in targets and hasattr(m, "in_features")
        )
