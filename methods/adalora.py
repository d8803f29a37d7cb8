"""AdaLoRA through `peft`: SVD-form low-rank updates whose rank budget is pruned by importance during training.

Zhang, Chen, Bukharin, Karampatziakis, He, Cheng, Chen & Zhao, "AdaLoRA:
Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning", ICLR 2023.
Each target W gets the update P diag(E) Q with P (out x r), Q (r x in) and
singular values E (r, initialised to 0, so the model is unchanged at step 0);
an orthogonality penalty on P and Q is added to the loss. After every
optimizer step, the rank allocator scores each singular triplet by smoothed
sensitivity and masks the least important ones until the average rank falls
from init_r to target_r. Defaults are the paper's GLUE setting for
DeBERTaV3-base: all six weight matrices of each layer (query, key, value,
attention output, both FFN projections), initial rank 12 falling to 8 (the
paper's initial budget is 1.5x the final one), beta1 = beta2 = 0.85,
orthogonality weight 0.1, alpha 16, lr 8e-4 (the authors' SST-2 script).
Trainable and counted: all init_r triplets (masking zeroes singular values,
it does not remove parameters) and the task head.
Not back-propagated through: nothing is skipped.

Tied to the run: the budget schedule needs the number of optimizer steps.
`total_step` defaults to null: the run's own step count, which the harness
passes in before apply (`Method.set_run`), so a cell of 50 steps prunes over
50 and one of 150 over 150; a number given overrides it. Applied outside a
harness run (a test, a notebook) with no `total_step`, the schedule assumes
FALLBACK_STEPS and warns. `tinit` and
`tfinal`, the steps of warm-up before pruning starts and of training with the
final budget, are given as fractions of it (0.15 and 0.45: the authors' RTE
script uses 600 and 1800 of about 3,900 steps, SST-2 6,000 and 22,000 of
about 50,000). If training stops before `total_step`, the budget never reaches
target_r; if it runs longer, the final budget is kept. The harness's loop
knows nothing of AdaLoRA, so this method calls peft's `update_and_allocate`
from a post-step hook on the optimizer that trains its parameters.

Departures from the paper: mask interval deltaT = 1 (the authors' RTE
script; their SST-2 script uses 100 over a much longer run).

Targets are roles of the backbone's anatomy (methods/_targets.py): BERT's
short names stand for them, so they land on the same projections of any
backbone; a fused layer (GPT-2's c_attn computes q, k and v) is adapted
whole, a departure the paper, written for unfused layers, did not meet. The
default six names cover every weight matrix of a BERT-style layer; a gated FFN
(Llama's gate_proj) has a seventh, left out unless `ffn_gate` is added.
"""

import warnings
import weakref

from torch.optim.optimizer import register_optimizer_step_post_hook

from harness.anatomy import in_out_features
from methods._peft import PeftMethod, head_names, modules, peft_task_type
from methods._targets import SHORT_NAMES, check_targets, linear_names

FALLBACK_STEPS = 1000  # the schedule's length when neither total_step nor a harness run gives one


class AdaLoRA(PeftMethod):
    name = "adalora"
    family = "PETL"
    description = "AdaLoRA (peft): SVD-form low-rank updates, rank budget pruned by importance, head trained"
    paper = "Zhang et al., AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning, ICLR 2023"
    trains = "P, E, Q of SVD-form updates on all weight matrices + head"
    default_lr = 8e-4
    defaults = {
        "init_r": 12,
        "target_r": 8,
        "alpha": 16,
        "dropout": 0.0,
        "orth_reg_weight": 0.1,
        "beta1": 0.85,
        "beta2": 0.85,
        "total_step": None,
        "tinit": 0.15,
        "tfinal": 0.45,
        "delta_t": 1,
        "target_modules": list(SHORT_NAMES),
    }

    def check_hparams(self):
        h = self.hparams
        check_targets(h["target_modules"])
        if not 1 <= h["target_r"] <= h["init_r"]:
            raise ValueError("need 1 <= target_r <= init_r")
        if h["total_step"] is not None and (
            not isinstance(h["total_step"], int) or isinstance(h["total_step"], bool) or h["total_step"] < 1
        ):
            raise ValueError("total_step must be a whole number of steps, at least 1 (or null: the run's steps)")
        if h["delta_t"] < 1:
            raise ValueError("delta_t must be at least 1")
        if not (0 <= h["tinit"] and 0 <= h["tfinal"] and h["tinit"] + h["tfinal"] < 1):
            raise ValueError("tinit and tfinal are fractions of total_step; they must be >= 0 and sum to less than 1")

    def total_step(self) -> int:
        """The steps the budget schedule runs over: the hyperparameter if given, else the run's."""
        if self.hparams["total_step"] is not None:
            return self.hparams["total_step"]
        if self.run is not None:
            return self.run.total_steps
        warnings.warn(
            f"adalora: no total_step and no harness run; the budget schedule assumes {FALLBACK_STEPS} steps",
            stacklevel=3,
        )
        return FALLBACK_STEPS

    def peft_config(self, model, task):
        from peft import AdaLoraConfig

        h = self.hparams
        total_step = self.total_step()
        return AdaLoraConfig(
            task_type=peft_task_type(task),
            init_r=h["init_r"],
            target_r=h["target_r"],
            lora_alpha=h["alpha"],
            lora_dropout=h["dropout"],
            orth_reg_weight=h["orth_reg_weight"],
            beta1=h["beta1"],
            beta2=h["beta2"],
            total_step=total_step,
            tinit=int(h["tinit"] * total_step),
            tfinal=int(h["tfinal"] * total_step),
            deltaT=h["delta_t"],
            target_modules=linear_names(model, h["target_modules"], self.name),
            modules_to_save=head_names(model),
        )

    def apply(self, model, task):
        model = super().apply(model, task)
        _allocate_after_each_step(model)
        return model

    def adapter_params(self, model, task):
        names = linear_names(model, self.hparams["target_modules"], self.name)
        r = self.hparams["init_r"]
        return sum(r * sum(in_out_features(m)) + r for m in modules(model, names))


def _allocate_after_each_step(peft_model) -> None:
    """Call peft's budget allocator after each step of any optimizer that trains this model.

    The hook is global to torch.optim but acts only for an optimizer holding this
    model's parameters, holds the model weakly, and is removed with the model.
    update_and_allocate reads the gradients, so it must run after step() and
    before zero_grad(): exactly where a step post-hook runs.
    """
    model_ref = weakref.ref(peft_model)
    own = {id(p) for p in peft_model.parameters() if p.requires_grad}
    step = [0]

    def after_step(optimizer, args, kwargs):
        model = model_ref()
        if model is None or not any(id(p) in own for g in optimizer.param_groups for p in g["params"]):
            return
        model.base_model.update_and_allocate(step[0])
        step[0] += 1

    handle = register_optimizer_step_post_hook(after_step)
    weakref.finalize(peft_model, handle.remove)
