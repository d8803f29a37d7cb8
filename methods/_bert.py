"""Where things are inside a BERT-family encoder, for methods that patch it.

BERT, RoBERTa, ELECTRA, MiniLM, XLM-R and the other encoders that copy BERT's
modelling code share one layout: `base_model.encoder.layer[i]`, each layer with
`attention.self.{query,key,value}`, an attention output sublayer
`attention.output`, `intermediate.dense`, and an FFN output sublayer `output`.
Both output sublayers compute `LayerNorm(dropout(dense(h)) + input_tensor)`
from `forward(hidden_states, input_tensor)`. Methods written here rely on that
layout and nothing more; any other architecture gets one clear error.
"""

import torch

from harness.anatomy import ROLES, alias_to_role, describe
from harness.errors import UserError

# Short names a method's hyperparameters may use -> path inside one encoder layer.
LINEAR_PATHS = {
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
    "attention_output": "attention.output.dense",
    "intermediate": "intermediate.dense",
    "output": "output.dense",
}
_SUBLAYER_PARTS = ("dense", "dropout", "LayerNorm")


def encoder_layers(model: torch.nn.Module, method: str) -> list[torch.nn.Module]:
    """The encoder's layers, after checking every one has the BERT layout; else a UserError."""
    base = getattr(model, "base_model", model)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    problem = None
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        problem = "has no base_model.encoder.layer list"
    else:
        for i, layer in enumerate(layers):
            # a linear layer, or one a peft method has already wrapped (it keeps in_features)
            missing = [p for p in LINEAR_PATHS.values() if not hasattr(_get(layer, p), "in_features")]
            missing += [
                f"{s}.{part}"
                for s in ("attention.output", "output")
                for part in _SUBLAYER_PARTS
                if _get(layer, f"{s}.{part}") is None
            ]
            if missing:
                problem = f"encoder layer {i} lacks {', '.join(missing)}"
                break
    if problem:
        raise UserError(
            f"method '{method}'",
            f"{type(model).__name__} is not a BERT-family encoder: {problem}",
            "use a BERT-style backbone (BERT, RoBERTa, ELECTRA, MiniLM, ...), or a method that supports this model",
        )
    return list(layers)


def linear_names(model: torch.nn.Module, targets, method: str) -> list[str]:
    """Fully qualified module names of the `targets` in every block, block by block in the order given.

    A target is a role of the backbone's anatomy (q, k, v, o, ffn_in, ffn_gate, ffn_out) or one of the
    names above, which stand for roles (`query` is q, `output` is ffn_out), so the same suite finds the
    same layers of any architecture harness.anatomy can describe. A role held in a fused projection
    (GPT-2's c_attn computes q, k and v) cannot be targeted alone: that is refused, not widened."""
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
                problem = f"block {block.index} ({block.path}) has no {alias_to_role(target)} projection"
            elif projection.fused is not None:
                problem = f"{projection.path} computes {', '.join(projection.fused.roles)} in one layer"
            else:
                names.append(projection.path)
                continue
            raise UserError(f"method '{method}'", f"cannot target '{target}' in {type(model).__name__}: {problem}")
    return names


TARGETS = (*ROLES, *LINEAR_PATHS)


def check_targets(targets) -> None:
    """For check_hparams: a non-empty list of roles, or of the short names that stand for them."""
    if not targets:
        raise ValueError("target_modules must name at least one module")
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        raise ValueError(f"unknown target_modules entry '{unknown[0]}'; known: {', '.join(TARGETS)}")


def layer_norms(model: torch.nn.Module) -> dict[str, torch.nn.LayerNorm]:
    """Every LayerNorm of the pretrained backbone (not of the head), by qualified name."""
    prefix = model.base_model_prefix + "."
    return {
        name: m for name, m in model.named_modules() if name.startswith(prefix) and isinstance(m, torch.nn.LayerNorm)
    }


def _get(module, path: str):
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module
