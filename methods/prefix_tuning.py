"""Prefix tuning through `peft`: trainable key/value prefixes in every attention layer.

Li & Liang, "Prefix-Tuning: Optimizing Continuous Prompts for Generation",
ACL 2021.
Trainable: a prefix of num_virtual_tokens (default 10, the paper's
table-to-text setting) keys and values for every layer, initialised, as the
paper recommends, with the frozen model's own keys and values for real words
(`init: words`: random vocabulary tokens, since a classification task has no
task word to start from); the task head is trained too. Not back-propagated
through: nothing is skipped; the gradient reaches the prefixes through the
frozen attention of every layer above.

Departures from the paper:
- The paper trains the prefixes through a reparametrisation P = MLP(P') for
  stable optimisation. On this encoder it is the unstable choice: with it
  (`projection: true`, peft's random init, a 512-unit tanh MLP as in the
  authors' code) MiniLM stayed at SST-2's majority class in 6 of 7 runs (lr
  2e-3 to 3e-2, a head lr of 5e-2, 150 and 450 steps, CPU and GPU; the
  seventh reached 0.789), while the prefixes trained directly from real
  words' activations reached 0.79-0.81 at every lr from 3e-3 to 3e-2. So
  the default is `projection: false`, as in P-tuning v2 (Liu et al., ACL 2022),
  which applies the same deep prefixes to BERT-style encoders for NLU.
  `projection: true` (with `init: random`) gives the paper's MLP.
- The paper generates text with GPT-2/BART; here the backbone feeds a freshly
  initialised classification head. Its lr 5e-5 (batch 5) was for generation;
  the default here is P-tuning v2's 1e-2. `head_lr` optionally gives the head
  its own learning rate.
- On a decoder the head reads the last real token, found from the attention
  mask (methods/_prompts.py), not the last token that is not the pad id.
- Grouped-query attention (Llama): a prefix has as many key and value heads as
  the layer's k and v projections write (kv heads x head dim wide, peft's
  layout). Rotary models (Llama) rotate keys before caching them, and peft's
  prefixes are cache entries that are not rotated again: `init: words` copies
  the words' keys as the k projection writes them, before their rotation.
- Only models whose attention takes a key/value cache can take prefixes
  (peft hands them over as the cache): DeBERTa and DistilBERT take none and
  are refused.
"""

import inspect
import types

import torch

from harness.anatomy import describe
from methods._peft import PeftMethod, head_names, peft_task_type
from methods._prompts import read_text_states


class PrefixTuning(PeftMethod):
    name = "prefix_tuning"
    family = "PETL"
    description = (
        "prefix tuning (peft): trainable key/value prefixes in every layer, from real words' activations, head trained"
    )
    paper = "Li & Liang, Prefix-Tuning: Optimizing Continuous Prompts for Generation, ACL 2021"
    trains = "key/value prefixes of every layer (+ the MLP with projection) + head"
    default_lr = 1e-2
    defaults = {
        "num_virtual_tokens": 10,
        "projection": False,
        "projection_hidden": 512,
        "init": "words",
        "head_lr": None,
    }

    def check_hparams(self):
        if self.hparams["num_virtual_tokens"] < 1 or self.hparams["projection_hidden"] < 1:
            raise ValueError("num_virtual_tokens and projection_hidden must be at least 1")
        if self.hparams["init"] not in ("random", "words"):
            raise ValueError("init must be 'random' or 'words'")
        if self.hparams["init"] == "words" and self.hparams["projection"]:
            raise ValueError(
                "init 'words' sets the prefixes themselves and needs projection: false; "
                "with projection: true use init: 'random'"
            )
        if self.hparams["head_lr"] is not None and not (
            isinstance(self.hparams["head_lr"], (int, float)) and self.hparams["head_lr"] > 0
        ):
            raise ValueError("head_lr must be positive")

    def unsupported(self, anatomy):
        if _cache_argument(anatomy.base.module) is None:
            return (
                f"{type(anatomy.base.module).__name__}.forward takes neither past_key_values nor cache, "
                "so prefixes cannot be prepended to its keys and values"
            )
        return None

    def apply(self, model, task):
        offer_past_key_values(model, self.name)
        read_text_states(model, 0)  # a prefix adds keys and values, no positions
        wrapped = super().apply(model, task)
        if self.hparams["init"] == "words":
            prefix = wrapped.prompt_encoder[wrapped.active_adapter].embedding.weight
            with torch.no_grad():
                prefix.copy_(word_keys_values(wrapped.base_model, self.hparams["num_virtual_tokens"]))
        return wrapped

    def param_groups(self, model, lr):
        if self.hparams["head_lr"] is None:
            return super().param_groups(model, lr)
        prefix = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("prompt_encoder.")]
        head = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("prompt_encoder.")]
        return [{"params": prefix, "lr": lr}, {"params": head, "lr": self.hparams["head_lr"]}]

    def peft_config(self, model, task):
        from peft import PrefixTuningConfig

        return PrefixTuningConfig(
            task_type=peft_task_type(task),
            num_virtual_tokens=self.hparams["num_virtual_tokens"],
            prefix_projection=self.hparams["projection"],
            encoder_hidden_size=self.hparams["projection_hidden"],
            modules_to_save=head_names(model),
        )

    def adapter_params(self, model, task):
        blocks = describe(model).blocks
        n, width = self.hparams["num_virtual_tokens"], blocks[0].projection("k").out_features  # kv heads x head dim
        prefix = len(blocks) * 2 * width  # a key and a value vector per layer, for each virtual token
        if not self.hparams["projection"]:
            return n * prefix
        h = self.hparams["projection_hidden"]  # peft's MLP reads a virtual token as wide as one key
        return n * width + (width * h + h) + (h * prefix + prefix)


@torch.no_grad()
def word_keys_values(model, n: int) -> torch.Tensor:
    """The frozen model's keys and values for n random vocabulary tokens, in every
    layer, laid out as peft's flat prefix (n x layers*2*kv width: layer 0's key, its
    value, layer 1's key, ...): the paper's initialisation from real words. Each is
    what the layer's k or v projection writes (its part of a fused one, GPT-2's c_attn)."""
    parts = [block.projection(role) for block in describe(model).blocks for role in ("k", "v")]
    captured = {}
    layers = {id(p.module): p.module for p in parts}.values()  # a fused layer computes k and v at once
    hooks = [m.register_forward_hook(lambda m, i, out: captured.__setitem__(m, out[0])) for m in layers]
    was_training = model.training
    try:
        words = torch.randint(0, model.get_input_embeddings().weight.shape[0], (1, n), device=model.device)
        model.eval()  # no dropout in the activations we copy
        model.base_model(input_ids=words, attention_mask=torch.ones_like(words))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return torch.cat([_own_part(captured[p.module], p) for p in parts], dim=-1)


def _own_part(output: torch.Tensor, projection) -> torch.Tensor:
    return output if projection.indices is None else output[..., projection.indices]


def offer_past_key_values(model, method: str) -> None:
    """Let peft hand its prefix cache to a model whose forward names it `cache`.

    peft (0.21) feeds the prefixes as `past_key_values` and refuses a model whose
    forward does not name that argument; transformers 5.2x renamed it `cache` in
    its encoders (keeping the old name only as a deprecated alias). Where the
    backbone takes `cache`, the model's forward is given a `past_key_values`
    argument that passes the prefixes on as `cache`: the same keys and values,
    prepended in every layer. Bound to the instance (not a closure), so a deep copy
    calls its own forward."""
    found = _cache_argument(model.base_model)
    if found is None:  # unsupported() says so before a cell starts
        raise ValueError(
            f"{method}: {type(model.base_model).__name__}.forward takes neither past_key_values nor "
            "cache, so prefixes cannot be prepended to its keys and values"
        )
    if found == "past_key_values" or "past_key_values" in inspect.signature(model.forward).parameters:
        return

    def forward(self, *args, past_key_values=None, **kwargs):
        return type(self).forward(self, *args, cache=past_key_values, **kwargs)

    model.forward = types.MethodType(forward, model)


def _cache_argument(backbone) -> str | None:
    """The name under which the backbone's forward takes a key/value cache: past_key_values, cache, or None."""
    parameters = inspect.signature(backbone.forward).parameters
    return next((name for name in ("past_key_values", "cache") if name in parameters), None)
