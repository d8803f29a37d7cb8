"""VeRA through `peft`: frozen shared random low-rank matrices, scaled by trainable vectors.

Kopiczko, Blankevoort & Asano, "VeRA: Vector-based Random Matrix
Adaptation", ICLR 2024.
Each target W gets the update diag(b) B diag(d) A x, where A (r x in) and
B (out x r) are random, frozen and shared by all layers (buffers, not
parameters), and only the vectors d (r, initialised to 0.1) and b (out,
initialised to 0, so the model is unchanged at step 0) are trained. Defaults
are the paper's GLUE setting for RoBERTa-base: rank 1024 on the query and
value projections. The task head is trained in full, as in the paper.
Not back-propagated through: nothing is skipped; gradients flow through the
whole frozen network to reach the vectors.

Departures from the paper: the paper trains the head with its own learning
rate; the harness uses one rate for both (default 4e-3, of the order of the
rates the paper lists for RoBERTa-base on GLUE).

Targets are roles of the backbone's anatomy (methods/_targets.py): BERT's
short names stand for them, so they land on the same projections of any
backbone; a fused layer (GPT-2's c_attn computes q, k and v) is adapted
whole, a departure the paper, written for unfused layers, did not meet.
"""

from harness.anatomy import in_out_features
from methods._peft import PeftMethod, head_names, modules, peft_task_type
from methods._targets import check_targets, linear_names


class VeRA(PeftMethod):
    name = "vera"
    family = "PETL"
    description = "VeRA (peft): frozen shared random low-rank matrices scaled by trainable vectors, head trained"
    paper = "Kopiczko et al., VeRA: Vector-based Random Matrix Adaptation, ICLR 2024"
    trains = "scaling vectors d (r) and b (out) on query/value + head"
    default_lr = 4e-3
    defaults = {"r": 1024, "d_initial": 0.1, "dropout": 0.0, "target_modules": ["query", "value"], "seed": 0}

    def check_hparams(self):
        if self.hparams["r"] < 1:
            raise ValueError("r must be at least 1")
        check_targets(self.hparams["target_modules"])

    def peft_config(self, model, task):
        from peft import VeraConfig

        return VeraConfig(
            task_type=peft_task_type(task),
            r=self.hparams["r"],
            d_initial=self.hparams["d_initial"],
            vera_dropout=self.hparams["dropout"],
            projection_prng_key=self.hparams["seed"],
            target_modules=linear_names(model, self.hparams["target_modules"], self.name),
            modules_to_save=head_names(model),
        )

    def adapter_params(self, model, task):
        names = linear_names(model, self.hparams["target_modules"], self.name)
        return sum(self.hparams["r"] + in_out_features(m)[1] for m in modules(model, names))
