"""WTA-CRS: unbiased weight gradients of Linear layers from a sample of the input's rows.

Liu, Wang, Zhong, Xu, Zha, Tang, Jiang, Zhou, Chaudhary, Xu & Hu,
"Winner-Take-All Column Row Sampling for Memory Efficient Adaptation of
Language Model", NeurIPS 2023.

A Linear's weight gradient is a sum over tokens, dW = sum_i g_i^T x_i (x_i the
input row, g_i the output-gradient row). WTA-CRS keeps only k = ratio * N of
the N rows of x for backward: the "winners" C, the rows of highest sampling
probability p_i (deterministic), and k - |C| rows drawn with replacement from
the rest with probability p_j / (1 - P_C), each scaled by (1 - P_C) /
((k - |C|) p_j). The estimate is unbiased; |C| is the c in 0..k-1 that
minimises the variance factor (1 - P_C) / (k - c), as in the paper. The
forward is exact, and so is the input gradient (it needs only the weight);
the bias gradient is exact too. Saved for backward: k rows (scaled), their
indices (int64), instead of N rows.

Trainable: nothing is added or frozen. Alone it is full fine-tuning whose
sampled layers get WTA-CRS weight gradients; stacked, it samples whichever
targeted Linear layers are trainable when it is applied, so it must come after
the method that sets what is trainable. Everything is back-propagated through.

Which layers: every trainable nn.Linear that sees token-level (3-D) inputs,
except those named in `skip` (default q/k/v, as the authors' released GLUE
configurations sample the attention output and both feed-forward layers but
not the query/key/value projections). 2-D inputs (pooler, classifier) stay exact.
After LoRA, whose trainable Linears sit under `query`/`value`, set `skip: []`.

Departures from the paper:
- Probabilities p_i are proportional to the input row norms ||x_i|| alone.
  The paper's ideal is ||x_i|| * ||g_i||, unknown during the forward pass; the
  authors' code can reuse the previous step's output-gradient norms when shapes
  repeat, which dynamic padding rarely allows.
- The authors also sample inside the attention matmuls ("score"/"attout");
  here only Linear layers are sampled.
- Stacked with activation compression, the sampled rows are kept in full
  precision (the sampled Linear replaces the compressed one).
"""

import types

import torch
import torch.nn.functional as F

from harness.method import Method, count, head_parameters


def sample_rows(x2d: torch.Tensor, k: int):
    """WTA-CRS sample of k rows: (row indices, per-row scale) for an unbiased estimate of sum_i x_i^T g_i."""
    norms = x2d.detach().float().norm(dim=1)
    total = norms.sum()
    if total == 0:  # every row is zero: the gradient is exactly zero whatever is kept
        return torch.arange(k, device=x2d.device), torch.zeros(k, device=x2d.device)
    probs = norms / total
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


class SampledLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, ratio):
        x2d = x.reshape(-1, x.shape[-1])
        k = max(1, int(x2d.shape[0] * ratio))
        ctx.x_dtype = x.dtype
        if k >= x2d.shape[0]:
            rows, index = x2d, None
        else:
            index, scale = sample_rows(x2d, k)
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
        return grad_x, grad_w, grad_b, None


def _sampled_forward(ratio):
    def forward(self, x):
        if torch.is_grad_enabled() and self.weight.requires_grad and x.dim() == 3:
            return SampledLinear.apply(x, self.weight, self.bias, ratio)
        return F.linear(x, self.weight, self.bias)
    return forward


class WTACRS(Method):
    name = "wta_crs"
    family = "METL"
    description = "WTA-CRS: Linear weight gradients from winner-take-all column-row samples of the input; stackable"
    paper = "Liu et al., Winner-Take-All Column Row Sampling for Memory Efficient Adaptation of Language Model, NeurIPS 2023"
    trains = "whatever is trainable when applied (alone: all weights)"
    default_lr = 5e-5  # alone it is full fine-tuning
    defaults = {"ratio": 0.3, "skip": ["query", "key", "value"]}

    def check_hparams(self):
        if not 0 < self.hparams["ratio"] <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {self.hparams['ratio']}")

    def targets(self, model):
        """Trainable Linear layers of the backbone (not the task head), minus those named in `skip`."""
        from transformers import PreTrainedModel
        backbone = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), model)
        head = {id(p) for p in head_parameters(backbone).values()} if hasattr(backbone, "base_model_prefix") else set()
        skip = set(self.hparams["skip"])
        return [m for name, m in model.named_modules()
                if isinstance(m, torch.nn.Linear) and type(m).forward is torch.nn.Linear.forward
                and m.weight.requires_grad and id(m.weight) not in head and not skip & set(name.split("."))]

    def apply(self, model, task):
        targets = self.targets(model)
        if not targets:
            raise ValueError("wta_crs found no trainable Linear layer outside `skip`; after LoRA set skip: []")
        for module in targets:
            module.forward = types.MethodType(_sampled_forward(self.hparams["ratio"]), module)
        return model

    def expected_trainable_params(self, model, task):
        return count(p for p in model.parameters() if p.requires_grad)
