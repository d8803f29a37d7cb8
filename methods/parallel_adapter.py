"""Parallel adapter (scaled, at the FFN) of He et al.'s unified view of PETL.

He, Zhou, Ma, Berg-Kirkpatrick & Neubig, "Towards a Unified View of
Parameter-Efficient Transfer Learning", ICLR 2022.
A bottleneck runs beside each layer's FFN on the FFN's input x, and its
output, times a fixed scale s, is added to the FFN's output:
h = FFN(x) + s * up(relu(down(x))), before the residual add and LayerNorm.
Defaults: the FFN position and s = 4 (the paper's "scaled PA", its best
variant), bottleneck 16 (the authors' GLUE script for RoBERTa-base), down
initialised as nn.Linear's default and up as zero (the paper's LoRA-style
init), so the model is exactly unchanged at step 0.
Trainable: the adapters and the task head.
Not back-propagated through: nothing is skipped; the gradient reaches the
lower adapters through the frozen layers above them.

Implemented with hooks found by role (harness.anatomy): a pre-hook on the
block's ffn_in projection reads x (what ffn_in, and ffn_gate in a gated FFN,
read), and s * A(x) joins the FFN's output where the sublayer ends. A
BERT-style output sublayer, norm(dropout(dense(h)) + x), adds the residual
itself and receives x as an argument: the branch is added to that argument,
beside the FFN and before the residual sum and its norm. Elsewhere it is added
to the output of the sublayer's last step (methods/_adapters.py:
`sublayer_output`).

Departures from the paper: the authors' GLUE script (which adds prefixes to
attention as well, their "MAM adapter") uses s = 2 and lr 1e-4 for 10
epochs; here s is the paper's 4 and the default lr 1e-3 is a choice for this
small encoder and short runs.

Beyond the post-norm encoders of the paper:
- Pre-norm blocks (GPT-2, Llama, ViT): x is the normalised input the FFN
  reads, not the residual stream, and s * A(x) is added to the FFN's output
  before the residual add, as the paper's FFN(x) + s * A(x).
- Gated FFNs (SwiGLU): the branch reads the input shared by the gate and up
  projections and is added after the down projection.
- Where the FFN's dropout is applied after its down projection by the
  surrounding code (GPT-2, DistilBERT, ViT), the branch joins before it, so
  the dropout acts on FFN(x) + s * A(x).
"""

from harness.anatomy import describe
from harness.method import Method, count, freeze_all, head_parameters
from methods._adapters import ACTIVATIONS, Bottleneck, attach, bottleneck_params, holds_residual, sublayer_output


class ParallelBranch(Bottleneck):
    """s * A(x) beside one FFN. x is held from the FFN's input until the branch is added, then let go."""

    def __init__(self, width: int, bottleneck: int, activation: str, scale: float):
        super().__init__(width, bottleneck, activation, "lora")
        self.scale = scale
        self.ffn_input = None

    def read_input(self, module, args):
        """Forward pre-hook on the FFN's up projection."""
        self.ffn_input = args[0]

    def add_to_residual(self, module, args):
        """Forward pre-hook on a BERT-style output sublayer: its argument that is the FFN's input x becomes
        x + s * A(x). When none is (the residual is not what the FFN read), `add_to_output` adds the branch."""
        x = self.ffn_input
        for i, arg in enumerate(args):
            if arg is x:
                self.ffn_input = None
                return (*args[:i], x + self.scale * self(x), *args[i + 1 :])
        return None

    def add_to_output(self, module, args, output):
        """Forward hook where the sublayer's output is complete: output + s * A(x), unless already added."""
        x, self.ffn_input = self.ffn_input, None
        return output if x is None else output + self.scale * self(x)


class ParallelAdapter(Method):
    name = "parallel_adapter"
    family = "PETL"
    description = "parallel adapter (He et al.): scaled bottleneck beside each FFN, head trained"
    paper = "He et al., Towards a Unified View of Parameter-Efficient Transfer Learning, ICLR 2022"
    trains = "1 parallel bottleneck per layer (at the FFN) + head"
    default_lr = 1e-3
    defaults = {"bottleneck": 16, "scale": 4.0, "activation": "relu"}

    def check_hparams(self):
        if self.hparams["bottleneck"] < 1:
            raise ValueError("bottleneck must be at least 1")
        if self.hparams["activation"] not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}")

    def apply(self, model, task):
        anatomy = describe(model)
        freeze_all(model)
        for block in anatomy.blocks:
            ffn_in, ffn_out = block.projections["ffn_in"], block.projections["ffn_out"]
            branch = ParallelBranch(
                ffn_in.in_features, self.hparams["bottleneck"], self.hparams["activation"], self.hparams["scale"]
            )
            branch = attach(ffn_out, "parallel_adapter", branch)
            ffn_in.module.register_forward_pre_hook(branch.read_input)
            if holds_residual(model, ffn_out):
                parent = model.get_submodule(ffn_out.path.rpartition(".")[0])
                parent.register_forward_pre_hook(branch.add_to_residual)
            sublayer_output(model, ffn_out).register_forward_hook(branch.add_to_output)
        for p in head_parameters(model).values():
            p.requires_grad_(True)
        return model

    def expected_trainable_params(self, model, task):
        anatomy = describe(model)
        return sum(
            bottleneck_params(block.projections["ffn_in"].in_features, self.hparams["bottleneck"])
            for block in anatomy.blocks
        ) + count(head_parameters(model).values())
