"""DoRA through `peft`: weight-decomposed LoRA, a trainable magnitude and a low-rank update of the direction.

Liu, Wang, Yin, Molchanov, Wang, Cheng & Chen, "DoRA: Weight-Decomposed
Low-Rank Adaptation", ICML 2024.
Each target W0 becomes m * (W0 + B A) / ||W0 + B A||_c with a trainable
magnitude vector m (one per output, initialised to ||W0||_c) and a LoRA pair
B A (B initialised to 0, so the model is unchanged at step 0). Defaults are
the paper's commonsense-reasoning setting (alpha = 2r, dropout 0.05, on the
query, key and value projections and both FFN projections) at rank 8, one of
the ranks of the paper's rank study (4 to 64). The task head is trained in
full.
Not back-propagated through: the column norm ||W0 + B A||_c, treated as a
constant in the backward pass as the paper proposes to save memory (peft does
the same).

Departures from the paper: its main runs use rank 32 on 4096-wide LLaMA
layers (0.84% of LLaMA-7B); rank 32 on this 384-wide encoder would train
5% of it, rank 8 trains about 1.4%, the paper's order of magnitude (and the
same rank as LoRA here). The paper's targets (Q, K, V, Up, Down of LLaMA) map
to query, key, value, intermediate.dense and output.dense; its learning rate
for LLaMA-7B is 2e-4, used here unchanged. The paper evaluates on LLMs, not
on GLUE.

Targets are roles of the backbone's anatomy (methods/_targets.py): BERT's
short names stand for them, so they land on the same projections of any
backbone; a fused layer (GPT-2's c_attn computes q, k and v) is adapted
whole, a departure the paper, written for unfused layers, did not meet.
"""

from harness.anatomy import in_out_features
from methods._peft import PeftMethod, head_names, modules, peft_task_type
from methods._targets import check_targets, linear_names


class DoRA(PeftMethod):
    name = "dora"
    family = "PETL"
    description = "DoRA (peft): trainable magnitude + low-rank direction update on attention and FFN, head trained"
    paper = "Liu et al., DoRA: Weight-Decomposed Low-Rank Adaptation, ICML 2024"
    trains = "low-rank A,B + magnitude vectors on q,k,v,FFN + head"
    default_lr = 2e-4
    defaults = {
        "r": 8,
        "alpha": 16,
        "dropout": 0.05,
        "target_modules": ["query", "key", "value", "intermediate", "output"],
    }

    def check_hparams(self):
        if self.hparams["r"] < 1:
            raise ValueError("r must be at least 1")
        check_targets(self.hparams["target_modules"])

    def peft_config(self, model, task):
        from peft import LoraConfig

        return LoraConfig(
            task_type=peft_task_type(task),
            use_dora=True,
            r=self.hparams["r"],
            lora_alpha=self.hparams["alpha"],
            lora_dropout=self.hparams["dropout"],
            target_modules=linear_names(model, self.hparams["target_modules"], self.name),
            modules_to_save=head_names(model),
        )

    def adapter_params(self, model, task):
        names = linear_names(model, self.hparams["target_modules"], self.name)
        return sum(self.hparams["r"] * (i + o) + o for i, o in map(in_out_features, modules(model, names)))
