"""The bottleneck module the adapter methods share, and how it is sized and initialised.

A bottleneck maps h (width d) to up(act(down(h))) with down: d -> m and
up: m -> d; it returns only that change, and each method adds it where its
paper says. m = d // reduction_factor (at least 1).
"""

import math

import torch

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
