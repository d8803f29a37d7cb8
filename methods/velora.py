"""VeLoRA through `peft`: LoRA whose down-projection saves rank-1 sub-token projections.

Miles, Reddy, Elezi & Deng, "VeLoRA: Memory Efficient Training using Rank-1
Sub-Token Projections", NeurIPS 2024.

peft 0.21 ships VeLoRA as a LoRA variant (`LoraConfig(velora_config=...)`),
so this wraps it rather than re-implementing it. In the forward pass each
input token of a LoRA down-projection A is cut into `num_groups` sub-tokens,
and each sub-token is projected onto one fixed unit vector v; backward
reconstructs the input as the coefficients times v (times `scale`) for A's
weight gradient. Saved for A: num_groups numbers per token instead of the
token's hidden size.

Trainable: exactly LoRA's (rank-r A and B on the target modules, head in full).
Not back-propagated through: nothing more than LoRA (the frozen weights get
no gradient; the input gradient is exact).

Defaults are LoRA's here (rank 8 on query/value, alpha 16, dropout 0.1), so
the two compare directly. `init_type: batch_average_once` is the paper's
choice: v is the normalised mean sub-token of the first training batch, then
fixed. `num_groups: 64` and `scale: 1.0` are peft's defaults; the paper's
sub-token size for this model size is not used (it tuned the size for much
larger models).

Departure: LoRA's input dropout (0.1) still stores its mask at full size; the
saving is on A's input only (stack activation compression after it to store
the mask as bits).
"""

from methods.lora import LoRA


class VeLoRA(LoRA):
    name = "velora"
    family = "METL"
    description = (
        "VeLoRA (peft): LoRA with the down-projection's saved input compressed to rank-1 sub-token projections"
    )
    paper = "Miles et al., VeLoRA: Memory Efficient Training using Rank-1 Sub-Token Projections, NeurIPS 2024"
    trains = "low-rank A,B on query/value + head"
    default_lr = 5e-4
    defaults = {**LoRA.defaults, "num_groups": 64, "scale": 1.0, "init_type": "batch_average_once"}

    def check_hparams(self):
        super().check_hparams()
        if self.hparams["num_groups"] < 1 or self.hparams["scale"] <= 0:
            raise ValueError("num_groups must be at least 1 and scale positive")
        if self.hparams["init_type"] not in ("batch_average_once", "batch_average", "random"):
            raise ValueError("init_type must be one of batch_average_once, batch_average, random")

    def peft_config(self, model, task):
        import dataclasses

        from peft import VeloraConfig

        velora = VeloraConfig(
            num_groups=self.hparams["num_groups"], scale=self.hparams["scale"], init_type=self.hparams["init_type"]
        )
        return dataclasses.replace(super().peft_config(model, task), velora_config=velora)  # re-validated by peft
