"""Mesa-style 8-bit activation storage: exact forward, saved activations de-quantised in backward.

Pan, Chen, He, Liu, Cai & Zhuang, "Mesa: A Memory-saving Training Framework
for Transformers", arXiv:2111.11124, 2021.

What is compressed (see methods/_activation_compression.py): the inputs of
every Linear (and GPT-2's Conv1D) with a trainable weight, of every LayerNorm
and RMSNorm and of the GELU (any elementwise activation), the two operands of
a gated FFN's product, and the attention's Q, K and V, all at 8 bits; hidden
dropout masks as bits.
Left exact: integer token ids saved by the embedding look-ups, the pooler's
tanh output and the loss's inputs (a few hundred bytes per example); on ViT
also the image its patch embedding (a Conv2d) reads.

Trainable: nothing is added or frozen. Alone, every weight is trained (full
fine-tuning with compressed activations); stacked after another method
(`stack: [{method: lora}, {method: mesa}]`), whatever that method left
trainable is trained and its activations are compressed. It must come last in
a stack: it compresses the modules that exist when it is applied, so modules a
later method adds (LoRA's A and B) would keep full-precision activations.
Everything is back-propagated through, as in full fine-tuning.

Departures from the paper:
- Quantisation ranges: Mesa keeps a running estimate (EMA) of each head's or
  channel group's range and may clip outliers; here each group of
  `group_size` consecutive elements uses its own current min and max, so no
  value is clipped and the error is at most half a step. Costs 8 bytes of
  range per group (3% at the default 256).
- Rounding is to nearest (Mesa's kernel can round stochastically).
- Attention: Mesa stores the softmax output at 8 bits. Here the two matmuls,
  softmax and dropout are one op that, like fused attention kernels
  (FlashAttention, memory-efficient SDPA), recomputes the probabilities in
  backward (from the de-quantised Q and K) and redraws the attention-dropout
  mask from a saved seed. Storing length x length maps at any width would
  keep more than the fused kernel of the uncompressed model keeps; this way
  Mesa saves less than full fine-tuning on every SDPA backend.
- Hidden dropout masks stored as bits are an addition (lossless); Mesa leaves
  them to the framework.
- No custom CUDA kernels: quantisation is plain PyTorch, slower than Mesa's.

Beyond the vision transformers (DeiT, Swin) the paper compressed:
- RMSNorm (Llama and its relatives): its input at 8 bits, 1/rms exact, as
  Mesa treats LayerNorm; only a norm that is weight * x / rms(x) (checked at
  install) is swapped.
- Gated FFNs (SwiGLU): act(g) * u is one op keeping g and u at 8 bits (act and
  its derivative recomputed from g); Mesa's models had a plain GELU FFN.
- Grouped-query attention: K and V are kept at their own (fewer) heads.
- DeBERTa's disentangled attention does not go through transformers'
  attention interface: there Q, K, V and the probabilities stay exact (its
  Linear layers, norms, GELU and dropout are compressed).
"""

from harness.method import Method, count_trainable
from methods._activation_compression import Policy, check_bits, install


class Mesa(Method):
    name = "mesa"
    family = "METL"
    description = "Mesa-style 8-bit saved activations (Linear, LayerNorm, GELU, attention), exact forward; stackable"
    paper = "Pan et al., Mesa: A Memory-saving Training Framework for Transformers, arXiv:2111.11124, 2021"
    trains = "whatever is trainable when applied (alone: all weights)"
    default_lr = 5e-5  # alone it is full fine-tuning
    defaults = {"bits": 8, "group_size": 256}

    def policy(self) -> Policy:
        bits = self.hparams["bits"]
        return Policy(
            linear_bits=bits,
            norm_bits=bits,
            act_bits=bits,
            act_store="input",
            qkv_bits=bits,
            pack_dropout=True,
            group_size=self.hparams["group_size"],
        )

    def check_hparams(self):
        check_bits(self.hparams["bits"], self.hparams["group_size"])

    def apply(self, model, task):
        counts = install(model, self.policy())
        if not any(counts[kind] for kind in ("linear", "conv1d", "layernorm", "rmsnorm")):
            raise ValueError("mesa found no Linear, Conv1D, LayerNorm or RMSNorm module to compress")
        return model

    def expected_trainable_params(self, model, task):
        return count_trainable(model)  # adds and freezes nothing: alone, every weight trains
