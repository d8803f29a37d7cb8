"""WTA-CRS: unbiased weight gradients of Linear layers from a sample of the input's real-token rows.

Liu, Wang, Zhong, Xu, Zha, Tang, Jiang, Zhou, Chaudhary, Xu & Hu,
"Winner-Take-All Column Row Sampling for Memory Efficient Adaptation of
Language Model", NeurIPS 2023.

A Linear's weight gradient is a sum over tokens, dW = sum_i g_i^T x_i (x_i the
input row, g_i the output-gradient row). WTA-CRS keeps only k of the rows of x
for backward: the "winners" C, the rows of highest sampling probability p_i
(deterministic), and k - |C| rows drawn with replacement from the rest with
probability p_j / (1 - P_C), each scaled by (1 - P_C) / ((k - |C|) p_j). The
estimate is unbiased; |C| is the c in 0..k-1 that minimises the variance
factor (1 - P_C) / (k - c), as in the paper. The forward is exact, and so is
the input gradient (it needs only the weight); the bias gradient is exact too.
Saved for backward: k rows (scaled) and their indices (int64), instead of all
rows.

Only real tokens are sampled. The rows of padding tokens (attention mask 0)
get an output gradient of exactly zero (no real token attends to them and the
head never reads them), so they add nothing to dW: they are never kept, and
k = max(1, int(ratio * n)) with n the batch's number of real-token rows (int
rounds down). The estimate stays unbiased. The mask reaches the sampled layers
through a forward pre-hook on the model (and on the Hugging Face model inside
it) that stores the batch's `attention_mask` on each sampled Linear, found
through the module the hook fires on, so a deep copy fills its own layers.
A Linear whose input is not (batch, length, features) of the mask's shape, or
a forward without a mask, samples among all its rows (still unbiased). How many
rows are kept now depends on the mask's values, not only on the batch's shape,
so `activations_depend_on_values` is set and the meter counts every step.

Trainable: nothing is added or frozen. Alone it is full fine-tuning whose
sampled layers get WTA-CRS weight gradients; stacked, it samples whichever
targeted Linear layers are trainable when it is applied, so it must come after
the method that sets what is trainable. Everything is back-propagated through.

Which layers: every trainable linear layer of the backbone (nn.Linear, or
GPT-2's Conv1D, whose weight is stored transposed) that sees token-level (3-D)
inputs, except the projections of the roles named in `skip` and any layer
inside them (default q/k/v, as the authors' released GLUE configurations
sample the attention output and both feed-forward layers but not the
query/key/value projections). Roles are found through harness.anatomy, so the
same `skip` means the same layers on any backbone; a fused layer (GPT-2's
c_attn) is skipped when any role it computes is. 2-D inputs (pooler,
classifier) stay exact. After LoRA, whose trainable layers sit inside the q
and v projections, set `skip: []`.

What the authors' code does (github.com/zirui-ray-liu/WTACRS,
seq2seq/approxlinear/{functional,scheme,trainer,config}.py and the GLUE
configs under seq2seq/configs/approx_linear/), and where this one departs:
- Probabilities. Theirs are proportional to ||x_i|| * ||g_i||, with g_i's norm
  taken from a buffer indexed by training example and token position: every
  backward writes each example's per-position output-gradient norms there, and
  the next forward on the same example reads them, so the norms are those of
  the previous epoch (the buffer needs fixed-length padding, and their GLUE
  configs pad to 128). In the first epoch the buffer is still zero and they
  fall back to ||x_i|| alone. Here p_i is proportional to ||x_i|| always: no
  per-example buffer, which dynamic padding and the harness's data order do
  not support.
- Padding. Their rows include every padded position; from the second epoch
  the zero gradient norms stored for padding make those rows (almost) never
  drawn, but in the first epoch padding competes for samples like real
  tokens. Here padding is excluded from the start, and k counts real tokens
  (theirs: k = ratio * all rows).
- minimal_k. They keep at least minimal_k = 10 rows, k = min(max(int(ratio N),
  10), N); here k = max(1, int(ratio n)), which differs only for batches of
  fewer than 10 / ratio real tokens.
- Their scaling. When no winners are chosen their GLUE configs
  (mix_replacement: true) draw the k rows without replacement and keep them
  unscaled, and in the first epoch (zero gradient buffer) they scale drawn
  rows by (1 - P_C) without the 1 / (s p_j) factor; both are biased. Here the
  unbiased with-replacement estimator of the paper is used in every case.
- The authors also sample inside the attention matmuls ("score"/"attout");
  here only Linear layers are sampled.
- Stacked with activation compression, the sampled rows are kept in full
  precision (the sampled Linear replaces the compressed one).
- Stacked with a method that reorders a sequence's tokens while keeping the
  (batch, length) shape before a sampled Linear, the rows would no longer line
  up with the mask; none in methods/ does (TokenTune's selected block is
  shorter than the sequence unless its fraction is close to 1).
"""

import torch
import torch.nn.functional as F

from harness.anatomy import describe, transformers_model
from harness.method import Method, count_trainable, head_parameters
from methods._targets import check_targets


def sample_rows(x2d: torch.Tensor, k: int, valid: torch.Tensor | None = None):
    """WTA-CRS sample of at most k rows of x2d: (row indices, per-row scale) for an unbiased estimate of
    sum_i x_i^T g_i, provided g_i = 0 for every row outside `valid` ((N,) bool; default: every row).
    Rows outside `valid`, and rows of zero norm, are never kept; when at most k rows are left, all of
    them are kept exactly."""
    norms = x2d.detach().float().norm(dim=1)
    if valid is not None:
        norms = norms * valid.to(norms.dtype)
    candidates = int((norms > 0).sum())
    if candidates <= k:  # nothing to sample: keep every row that can contribute, unscaled (exact)
        index = norms.nonzero().flatten()
        return index, torch.ones(index.numel(), device=x2d.device)
    probs = norms / norms.sum()
    top_p, top_i = probs.topk(k)
    covered = torch.cat([top_p.new_zeros(1), top_p.cumsum(0)[:-1]])  # P_C for |C| = 0..k-1
    score = (1 - covered).clamp(min=0) / torch.arange(k, 0, -1, device=x2d.device)
    c = int(score.argmin())
    winners, rest_mass = top_i[:c], float(1 - covered[c])
    residual = probs.clone()
    residual[winners] = 0
    if residual.sum() <= 0:  # the winners hold all the mass: they are the exact sum
        return winners, torch.ones(c, device=x2d.device)
    s = k - c
    drawn = torch.multinomial(residual, s, replacement=True)  # multinomial normalises: q_j = p_j / (1 - P_C)
    scale = rest_mass / (s * probs[drawn])
    return torch.cat([winners, drawn]), torch.cat([torch.ones(c, device=x2d.device), scale])


def kept_rows(ratio: float, real_rows: int) -> int:
    """k: how many rows a sampled Linear keeps for `real_rows` real-token rows."""
    return max(1, int(ratio * real_rows))


class SampledLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, ratio, valid=None):
        """valid: (batch, length) bool, the real tokens; used when x is (batch, length, features)."""
        x2d = x.reshape(-1, x.shape[-1])
        rows_valid = valid.reshape(-1) if valid is not None and tuple(valid.shape) == tuple(x.shape[:-1]) else None
        real = x2d.shape[0] if rows_valid is None else int(rows_valid.sum())
        ctx.x_dtype = x.dtype
        if rows_valid is None and kept_rows(ratio, real) >= real:
            rows, index = x2d, None
        else:
            index, scale = sample_rows(x2d, kept_rows(ratio, real), rows_valid)
            rows = x2d[index] * scale[:, None].to(x.dtype)
        ctx.save_for_backward(rows, index, weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        rows, index, weight = ctx.saved_tensors
        g2d = g.reshape(-1, g.shape[-1])
        grad_x = (g @ weight.to(g.dtype)).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            picked = g2d if index is None else g2d[index]
            grad_w = (picked.float().t() @ rows.float()).to(weight.dtype)
        grad_b = g2d.sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None


def _sampled_forward(self, x):
    weight = self.weight.t() if self.wta_crs_transposed else self.weight  # Conv1D keeps (in, out)
    if torch.is_grad_enabled() and self.weight.requires_grad and x.dim() == 3:
        return SampledLinear.apply(x, weight, self.bias, self.wta_crs_ratio, self.wta_crs_valid)
    return F.linear(x, weight, self.bias)


def _remember_real_tokens(model, args, kwargs):
    # Reaches the sampled layers through the module the hook fires on, never a closure: a deep
    # copy of the model shares its hooks, and must fill its own layers' masks.
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    valid = mask.detach() != 0 if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
    for module in model.modules():
        if hasattr(module, "wta_crs_ratio"):
            module.wta_crs_valid = valid


def _plain_forwards():
    """nn.Linear's and Conv1D's own forward: a layer with any other (a subclass's) is left alone."""
    from transformers.pytorch_utils import Conv1D

    return (torch.nn.Linear.forward, Conv1D.forward)


_PLAIN_FORWARDS = _plain_forwards()


class WTACRS(Method):
    name = "wta_crs"
    family = "METL"
    description = (
        "WTA-CRS: Linear weight gradients from winner-take-all samples of the real tokens' input rows; stackable"
    )
    paper = (
        "Liu et al., Winner-Take-All Column Row Sampling for Memory Efficient Adaptation of Language Model, "
        "NeurIPS 2023"
    )
    trains = "whatever is trainable when applied (alone: all weights)"
    default_lr = 5e-5  # alone it is full fine-tuning
    defaults = {"ratio": 0.3, "skip": ["query", "key", "value"]}
    activations_depend_on_values = True  # the kept rows follow the attention mask's real-token count

    def unplannable(self):
        return "which rows it keeps, and how many, follow the activations' norms (values a plan does not have)"

    def check_hparams(self):
        if not 0 < self.hparams["ratio"] <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {self.hparams['ratio']}")
        if self.hparams["skip"]:
            check_targets(self.hparams["skip"])

    @staticmethod
    def backbone(model):
        """The Hugging Face model inside `model` (the outermost one), or `model` itself."""
        return transformers_model(model) or model

    def targets(self, model):
        """Trainable linear layers (plain nn.Linear or Conv1D, not a wrapper) of the backbone, not of its task
        head, outside the projections of the roles in `skip`."""
        backbone = self.backbone(model)
        head = {id(p) for p in head_parameters(backbone).values()} if hasattr(backbone, "base_model_prefix") else set()
        skipped = []
        if self.hparams["skip"]:
            anatomy = describe(backbone)
            skipped = [p.path for role in self.hparams["skip"] for p in anatomy.projections(role)]
        return [
            m
            for name, m in backbone.named_modules()
            if type(m).forward in _PLAIN_FORWARDS
            and m.weight.requires_grad
            and id(m.weight) not in head
            and not any(name == path or name.startswith(path + ".") for path in skipped)
        ]

    def apply(self, model, task):
        targets = self.targets(model)
        if not targets:
            raise ValueError("wta_crs found no trainable linear layer outside `skip`; after LoRA set skip: []")
        for module in targets:
            module.wta_crs_ratio, module.wta_crs_valid = self.hparams["ratio"], None
            module.wta_crs_transposed = not isinstance(module, torch.nn.Linear)
            module.forward = _sampled_forward.__get__(module)
        # The outer model sees the batch; the Hugging Face model inside sees the mask as its layers do
        # (lengthened by soft prompts, say). Outer hooks fire first, so the inner one has the last word.
        for hooked in dict.fromkeys([model, self.backbone(model)]):
            hooked.register_forward_pre_hook(_remember_real_tokens, with_kwargs=True)
        return model

    def expected_trainable_params(self, model, task):
        return count_trainable(model)  # adds and freezes nothing: alone, every parameter trains
