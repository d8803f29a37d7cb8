"""S2A-style 4-bit storage of the activations of non-parametric operations.

Jin, Du, Wang, Xu & Luo, "S2A: A Unified Framework for Parameter and Memory
Efficient Transfer Learning", arXiv:2503.08154, 2025 (later titled
"Structure-Activation Synergy: A Dual Efficiency Framework for
Parameter-Memory Optimized Transfer Learning").

S2A has two parts: activation-light module designs (bias, prompt and side
modules) and 4-bit quantisation, guided by the derivatives, of the activations
that non-parametric operations save. This method is the second part only, as a
stackable compression; the first part is what the other methods of this
harness provide (stack after bitfit, lora, ...).

What is compressed (see methods/_activation_compression.py):
- GELU (any elementwise activation): its derivative f'(x), computed in the
  forward pass and stored at 4 bits, is all backward needs (g * f'(x)); it lies
  in a narrow range ([-0.17, 1.13] for GELU), which is what makes 4 bits enough.
- softmax in attention: not stored at all. Its output is recomputed in
  backward from the (exact) Q and K, and the attention-dropout mask is redrawn
  from a saved seed, as fused attention kernels do (see below).
- hidden dropout masks as bits (lossless).
- a gated FFN's product act(g) * u (SwiGLU: Llama and its relatives), also a
  non-parametric op: its two partial derivatives, u * act'(g) and act(g), at
  4 bits, all its backward needs.
Left exact: the inputs of parametric operations (Linear, Conv1D, LayerNorm,
RMSNorm), the attention's Q, K, V matmul operands (grouped-query attention
keeps K and V at their own heads), the embedding ids.

Trainable: nothing is added or frozen; alone it is full fine-tuning with these
activations compressed; in a stack it must come last (it compresses the modules
that exist when applied). Everything is back-propagated through.

Departures from the paper (its quantiser is only summarised as
"derivative-based"; this is our reading):
- Uniform min-max 4-bit codes per group of `group_size` consecutive values,
  round to nearest, error at most half a step; ranges are per group and per
  step, not calibrated or learned.
- Attention: S2A quantises the softmax output to 4 bits. A length x length
  map at 4 bits is still more than the fused kernels of the uncompressed model
  keep (FlashAttention and memory-efficient SDPA keep no probabilities), so
  here the attention matmuls, softmax and dropout are one op that recomputes
  the probabilities in backward instead: S2A then saves less than full
  fine-tuning on every SDPA backend.
- Gated FFNs (our reading; the paper describes no gated product): the
  product's partial derivatives are stored as S2A stores an activation's
  derivative; u * act'(g) has no narrow range of its own, so its 4 bits rest
  on the per-group range.
- DeBERTa's disentangled attention does not go through transformers'
  attention interface: its softmax stays as autograd keeps it.
"""

from harness.method import Method, count_trainable
from methods._activation_compression import Policy, check_bits, install


class S2A(Method):
    name = "s2a"
    family = "METL"
    description = (
        "S2A-style 4-bit saved activations of non-parametric ops (GELU derivative), softmax recomputed, dropout as "
        "bits; stackable"
    )
    paper = (
        "Jin et al., S2A: A Unified Framework for Parameter and Memory Efficient Transfer Learning, "
        "arXiv:2503.08154, 2025"
    )
    trains = "whatever is trainable when applied (alone: all weights)"
    default_lr = 5e-5  # alone it is full fine-tuning
    defaults = {"bits": 4, "group_size": 64}

    def policy(self) -> Policy:
        bits = self.hparams["bits"]
        return Policy(
            linear_bits=None,
            norm_bits=None,
            act_bits=bits,
            act_store="derivative",
            qkv_bits=None,
            pack_dropout=True,
            group_size=self.hparams["group_size"],
        )

    def check_hparams(self):
        check_bits(self.hparams["bits"], self.hparams["group_size"])

    def apply(self, model, task):
        counts = install(model, self.policy())
        if not counts["activation"] and not counts["attention"]:
            raise ValueError("s2a found no activation or attention to compress")
        return model

    def expected_trainable_params(self, model, task):
        return count_trainable(model)  # adds and freezes nothing: alone, every weight trains
