"""(IA)^3 through `peft`: learned vectors that rescale keys, values and the FFN's inner activations.

Liu, Tam, Muqeeth, Mohta, Huang, Bansal & Raffel, "Few-Shot Parameter-Efficient
Fine-Tuning is Better and Cheaper than In-Context Learning", NeurIPS 2022.
Trainable: one vector per layer for the keys (l_k), one for the values (l_v),
both of width hidden_size, and one for the FFN's inner activation (l_ff,
width intermediate_size, applied to the input of the FFN's output projection);
all start at 1, so the model is unchanged at step 0. Plus the task head.
Not back-propagated through: nothing is skipped; gradients flow through the
whole frozen network to reach the vectors.

Departures from the paper: the paper scores answer choices with T0's language
model head (rank classification, plus unlikelihood and length-normalised
losses); here a freshly initialised classification head is trained with
cross-entropy (or MSE for regression). The paper's learning rate 3e-3 was
used with Adafactor; here it is used with the harness's AdamW. peft's own
BERT default would also rescale the attention output projection (its suffix
"output.dense" matches both); this file targets exactly the paper's three.

Targets are roles of the backbone's anatomy (methods/_targets.py): BERT's
short names stand for them, so they land on the same projections of any
backbone. On GPT-2, whose c_attn computes q, k and v in one layer, the
vector rescales all of c_attn's output (queries too), since peft wraps
whole layers: a departure the paper, on T0's unfused layers, did not meet.
"""

from harness.anatomy import in_out_features
from methods._peft import PeftMethod, head_names, modules, peft_task_type
from methods._targets import check_targets, linear_names


class IA3(PeftMethod):
    name = "ia3"
    family = "PETL"
    description = "(IA)^3 (peft): vectors rescale keys, values and FFN activations; head trained"
    paper = (
        "Liu et al., Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning "
        "(T-Few), NeurIPS 2022"
    )
    trains = "scaling vectors on key, value, FFN inner activation + head"
    default_lr = 3e-3
    # BERT short names for roles (methods/_targets.py); "output" is the FFN output projection, its *input* rescaled
    defaults = {"target_modules": ["key", "value", "output"], "feedforward_modules": ["output"]}

    def check_hparams(self):
        check_targets(self.hparams["target_modules"])
        if not set(self.hparams["feedforward_modules"]) <= set(self.hparams["target_modules"]):
            raise ValueError("feedforward_modules must be a subset of target_modules")

    def _targets(self, model):
        names = linear_names(model, self.hparams["target_modules"], self.name)
        ff = set(linear_names(model, self.hparams["feedforward_modules"], self.name))
        return names, ff

    def peft_config(self, model, task):
        from peft import IA3Config

        names, ff = self._targets(model)
        return IA3Config(
            task_type=peft_task_type(task),
            target_modules=names,
            feedforward_modules=sorted(ff),
            modules_to_save=head_names(model),
        )

    def adapter_params(self, model, task):
        names, ff = self._targets(model)
        # a feed-forward target rescales its input features, any other target its output features
        return sum(in_out_features(m)[0 if n in ff else 1] for n, m in zip(names, modules(model, names)))
