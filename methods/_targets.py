"""Which linear layers a method that adapts chosen projections (LoRA, DoRA, VeRA, AdaLoRA, (IA)^3, VeLoRA)
adapts, found by role through harness.anatomy on any backbone it can describe.

A target is a role (q, k, v, o, ffn_in, ffn_gate, ffn_out) or one of BERT's short names, which stand for roles
(`query` is q, `output` is ffn_out), so the same suite entry adapts BERT's `attention.self.query`, Llama's
`q_proj` and ViT's `attention.attention.query`.

A role held in a fused projection (GPT-2's `c_attn` computes q, k and v; Phi-3's `gate_up_proj` the gate and
the up projection) cannot be adapted alone through peft, which wraps whole layers: the fused layer is adapted
once, for every role it computes (peft's own choice for GPT-2, whose default LoRA target is `c_attn`). So on
GPT-2 LoRA's default q and v reach k as well. The LoRA paper's own GPT-2 code adapted only the q and v slices
of c_attn; methods name this departure in their docstrings.
"""

import torch

from harness.anatomy import ALIASES, ROLES, alias_to_role, describe
from harness.errors import UserError

# BERT's short names (the hyperparameter values suites already use), as harness.anatomy maps them to roles.
SHORT_NAMES = tuple(name for name in ALIASES if "." not in name)
TARGETS = (*ROLES, *SHORT_NAMES)


def check_targets(targets) -> None:
    """For check_hparams: a non-empty list of roles, or of the short names that stand for them."""
    if not targets:
        raise ValueError("target_modules must name at least one module")
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        raise ValueError(f"unknown target_modules entry '{unknown[0]}'; known: {', '.join(TARGETS)}")


def linear_names(model: torch.nn.Module, targets, method: str) -> list[str]:
    """Fully qualified names of the layers computing `targets` in every block, block by block in the order
    given; a fused layer once, where its first target role comes. A block without a target role is refused."""
    check_targets(targets)
    try:
        blocks = describe(model).blocks
    except ValueError as exc:
        raise UserError(f"method '{method}'", f"cannot find the layers of {type(model).__name__}: {exc}") from None
    names = []
    for block in blocks:
        for target in targets:
            projection = block.projection(target)
            if projection is None:
                raise UserError(
                    f"method '{method}'",
                    f"cannot target '{target}' in {type(model).__name__}: block {block.index} ({block.path}) "
                    f"has no {alias_to_role(target)} projection",
                )
            if projection.path not in names:
                names.append(projection.path)
    return names
