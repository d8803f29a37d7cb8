"""The bottleneck module the adapter methods share, how it is sized and initialised, and where it is attached.

A bottleneck maps h (width d) to up(act(down(h))) with down: d -> m and
up: m -> d; it returns only that change, and each method adds it where its
paper says. m = d // reduction_factor (at least 1).

Where: each method finds the place by role through harness.anatomy (a block's
o, ffn_in and ffn_out projections, its norms), never by one architecture's
module names, and adds the adapter with forward hooks, so the backbone's
modules keep their classes and paths and a method stacked after it still
finds them. The adapter itself is registered as a child of a projection of its
block: harness.anatomy does not look inside linear layers, so the adapter's own
two layers are never taken for the block's projections. The hooks are bound
methods of the adapter, so a deep copy of the model copies them with it.
"""

import math

import torch

from harness.anatomy import Projection, norm_kind

ACTIVATIONS = {"gelu": torch.nn.GELU, "relu": torch.nn.ReLU, "swish": torch.nn.SiLU}
INITS = ("near_zero", "bert", "lora")


class Bottleneck(torch.nn.Module):
    def __init__(self, width: int, bottleneck: int, activation: str, init: str):
        super().__init__()
        self.down = torch.nn.Linear(width, bottleneck)
        self.act = ACTIVATIONS[activation]()
        self.up = torch.nn.Linear(bottleneck, width)
        with torch.no_grad():
            for layer in (self.down, self.up):
                layer.bias.zero_()
                if init == "near_zero":  # Houlsby et al.: N(0, 1e-2) truncated at two standard deviations
                    torch.nn.init.trunc_normal_(layer.weight, std=1e-2, a=-2e-2, b=2e-2)
                elif init == "bert":  # BERT's own initialiser, N(0, 0.02)
                    torch.nn.init.normal_(layer.weight, std=0.02)
            if init == "lora":  # down as nn.Linear's default, up zero: the change is exactly 0 at step 0
                torch.nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
                self.up.weight.zero_()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(h)))

    def add_to_output(self, module, args, output):
        """As a forward hook: the hooked module's output h becomes h + adapter(h)."""
        return output + self(output)


def sublayer_output(model: torch.nn.Module, projection: Projection) -> torch.nn.Module:
    """The module whose output is the sublayer's result before its residual add, for the sublayer that ends in
    `projection` (a block's o or ffn_out).

    A BERT-style output sublayer (BERT, RoBERTa, ELECTRA, DeBERTa) is a module holding only the projection, one
    dropout and a norm, and computes norm(dropout(dense(h)) + x): its dropout acts on the projection's output, so
    the dropout is the place. Elsewhere it is the projection itself: its output before whatever dropout the
    surrounding code applies next (GPT-2's resid_dropout, DistilBERT's FFN dropout, ViT's block dropout)."""
    parent = model.get_submodule(projection.path.rpartition(".")[0])
    children = list(parent.children())
    dropouts = [c for c in children if isinstance(c, torch.nn.Dropout)]
    others = [c for c in children if c is not projection.module and not isinstance(c, torch.nn.Dropout)]
    if len(dropouts) == 1 and all(norm_kind(c) is not None for c in others):
        return dropouts[0]
    return projection.module


def holds_residual(model: torch.nn.Module, projection: Projection) -> bool:
    """Whether the sublayer that ends in `projection` adds its residual itself: a BERT-style output sublayer,
    whose module holds the norm of that sum and so receives the residual as an argument."""
    parent = model.get_submodule(projection.path.rpartition(".")[0])
    return sublayer_output(model, projection) is not projection.module and any(
        norm_kind(c) is not None for c in parent.children()
    )


def attach(projection: Projection, name: str, adapter: torch.nn.Module) -> torch.nn.Module:
    """Register `adapter` under the projection's module (see the module docstring), in the projection's dtype."""
    module = projection.module
    if hasattr(module, name):
        raise ValueError(f"{projection.path} already has a '{name}': apply the method once")
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), None)
    adapter = adapter.to(dtype) if dtype is not None else adapter
    module.add_module(name, adapter)
    return adapter


def bottleneck_size(width: int, reduction_factor: int) -> int:
    return max(1, width // reduction_factor)


def bottleneck_params(width: int, bottleneck: int) -> int:
    return 2 * width * bottleneck + bottleneck + width


def check_adapter_hparams(hparams: dict) -> None:
    if hparams["reduction_factor"] < 1:
        raise ValueError("reduction_factor must be at least 1")
    if hparams["activation"] not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}")
    if hparams["init"] not in INITS:
        raise ValueError(f"init must be one of {INITS}")
