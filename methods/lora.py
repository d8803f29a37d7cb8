"""LoRA through `peft`: low-rank updates B·A added to frozen weight matrices.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022.
Defaults follow the paper's GLUE setting for RoBERTa-base: rank 8 on the
query and value projections, alpha 16 (scale alpha/r = 2), dropout 0.1.
The task head is trained in full, as in the paper. `target_modules` names
roles of the backbone's anatomy (`query` and `value` stand for q and v), so
the same entry adapts q_proj and v_proj on a Llama. Departure on fused
projections: GPT-2's c_attn computes q, k and v in one layer, and peft wraps
whole layers, so there the whole c_attn is adapted (its update reaches k too;
methods/_targets.py). The paper's own GPT-2 code adapted only the q and v
slices of c_attn.
"""

from harness.anatomy import in_out_features
from methods._peft import PeftMethod, head_names, modules, peft_task_type
from methods._targets import check_targets, linear_names


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
        check_targets(self.hparams["target_modules"])

    def peft_config(self, model, task):
        from peft import LoraConfig

        return LoraConfig(
            task_type=peft_task_type(task),
            r=self.hparams["r"],
            lora_alpha=self.hparams["alpha"],
            lora_dropout=self.hparams["dropout"],
            target_modules=linear_names(model, self.hparams["target_modules"], self.name),
            modules_to_save=head_names(model),
        )

    def adapter_params(self, model, task):
        names = linear_names(model, self.hparams["target_modules"], self.name)
        return sum(self.hparams["r"] * sum(in_out_features(m)) for m in modules(model, names))
