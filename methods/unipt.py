"""UniPT: a lightweight parallel network over every layer's hidden states of a frozen backbone.

Diao, Wan, Zhang, Jia, Lu & Chen, "UniPT: Universal Parallel Tuning for Transfer
Learning with Efficient Parameter and Memory", CVPR 2024.

Trainable: per hidden state (embedding output and every layer's output) a
down-projection to width m = hidden / downsample_factor (default 2) with a
LayerNorm; the confidence gate (a linear map to one score); the projection
(linear + LayerNorm) of the merged features; the up-projection (ReLU, linear)
back to the backbone's width; the classification head.
Not back-propagated through: the backbone, run under torch.no_grad (no graph,
no saved activation, no gradient).

The parallel network, with every hidden state h_l down-projected to x_l:
- Parallel interaction: the last layer's x_N is the anchor. For every lower
  l, token i of the anchor gathers from layer l with weights
  w_ij = relu(<x_N,i, x_l,j>) over non-padding tokens j, L1-normalised over j,
  plus the identity (each token keeps its own layer-l feature):
  merged_l = (W + I) x_l.
- Confidence aggregation: c_l = gate(mean(x_N) * mean(x_l)) (masked means
  over tokens), softmax over layers; merged = sum_l c_l merged_l.
- Output: up(relu(x_N + proj(merged))), pooled where the backbone's own head
  reads ([CLS]; a decoder's last real token) or the mean over tokens
  (`pooling: mean`), into the classifier.
The hidden states are the backbone's blocks' inputs and outputs from its own
forward (methods/_frozen.py), so any family harness.anatomy describes works:
encoders, decoders (their causal attention, rotary positions) and ViTs.

Departures from the paper:
- Classification with a fresh head; the paper's text-side experiments pool
  the output for retrieval. The classifier here reads the parallel network's
  output at the position the backbone's head reads. On a decoder the
  interaction still lets every token gather from every other one (the
  parallel network is not causal; only the frozen backbone is).
- downsample_factor 2 follows the authors' public configuration for BERT text
  encoders; the paper reports other factors as well. Their code
  (github.com/Paranioar/UniPT, VSE-infty/lib/adapter_for_transformer.py)
  divides, and up-projects to, the retrieval embedding size (1024) rather
  than the backbone's width; here m = hidden / downsample_factor and the
  up-projection returns to hidden. The interaction, its padding mask, the
  identity and the confidence aggregation follow that file, except that the
  gate has no bias: softmax(s + b) = softmax(s), so a bias gets no gradient.
"""

import torch
from torch import nn

from harness.anatomy import describe
from harness.method import Method, freeze_all
from methods._frozen import (
    POOLINGS,
    ClassifierHead,
    FrozenBackboneClassifier,
    classifier_only,
    frozen_states,
    pool,
    token_mask,
)


class UniPTNetwork(FrozenBackboneClassifier):
    def __init__(self, model, downsample_factor: int, pooling: str):
        super().__init__(model)
        hidden, width = self.anatomy.hidden_size, self.anatomy.hidden_size // downsample_factor
        self.down = nn.ModuleList(
            nn.Sequential(nn.Linear(hidden, width), nn.LayerNorm(width)) for _ in range(len(self.anatomy.blocks) + 1)
        )
        # No bias: one offset shared by every layer's score cancels in the softmax, and would train nothing.
        self.gate = nn.Linear(width, 1, bias=False)
        self.proj = nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width))
        self.up = nn.Sequential(nn.ReLU(), nn.Linear(width, hidden))
        self.head = ClassifierHead(hidden, model.config)
        self.pooling = pooling

    def frozen_features(self, inputs):
        return frozen_states(self.anatomy, inputs).hidden

    @staticmethod
    def interaction_weights(anchor: torch.Tensor, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """W (batch, length, length): token i of the anchor gathers from token j of x with weight
        relu(<anchor_i, x_j>), zero for padding j, L1-normalised over j (before the identity is added)."""
        keys = attention_mask.unsqueeze(1).to(x.dtype)  # (batch, 1, length): padding never attended
        weights = torch.relu(anchor @ x.transpose(1, 2)) * keys
        return weights / (weights.sum(-1, keepdim=True) + 1e-6)

    def layer_confidences(self, anchor: torch.Tensor, lower: list[torch.Tensor], attention_mask) -> torch.Tensor:
        """(batch, layers): softmax over the lower layers l of gate(mean(x_N) * mean(x_l)), means over real tokens."""
        anchor_mean = pool(anchor, attention_mask, "mean")
        scores = [self.gate(anchor_mean * pool(x, attention_mask, "mean")) for x in lower]
        return torch.softmax(torch.cat(scores, dim=1), dim=1)

    def trainable_path(self, hidden_states, attention_mask):
        attention_mask = token_mask(attention_mask, hidden_states[0])
        anchor = self.down[-1](hidden_states[-1])
        lower = [down(hidden) for down, hidden in zip(self.down[:-1], hidden_states[:-1])]
        identity = torch.eye(anchor.shape[1], dtype=anchor.dtype, device=anchor.device)  # each token keeps its own
        merged = torch.stack([(self.interaction_weights(anchor, x, attention_mask) + identity) @ x for x in lower], 1)
        confidence = self.layer_confidences(anchor, lower, attention_mask)  # (batch, layers)
        merged = (merged * confidence[:, :, None, None]).sum(1)
        out = self.up(anchor + self.proj(merged))
        return self.head(self.pool(out, attention_mask, self.pooling))


class UniPT(Method):
    name = "unipt"
    family = "METL"
    description = (
        "UniPT: parallel network over all layers' hidden states (cross-layer interaction, confidence aggregation)"
    )
    paper = (
        "Diao et al., UniPT: Universal Parallel Tuning for Transfer Learning with Efficient Parameter and Memory, "
        "CVPR 2024"
    )
    trains = "down-projections + interaction/aggregation layers + up-projection + head"
    default_lr = 1e-3  # no text-classification setting in the paper; on sst2/MiniLM: 3e-4 .78, 1e-3 .79, 3e-3 .78
    defaults = {"downsample_factor": 2, "pooling": "cls"}

    def check_hparams(self):
        if self.hparams["downsample_factor"] < 1:
            raise ValueError("downsample_factor must be at least 1")
        if self.hparams["pooling"] not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.hparams['pooling']!r}")

    def unsupported(self, anatomy):
        return classifier_only(anatomy)

    def apply(self, model, task):
        freeze_all(model)
        return UniPTNetwork(model, self.hparams["downsample_factor"], self.hparams["pooling"])

    def expected_trainable_params(self, model, task):
        anatomy = describe(model)
        hidden, layers = anatomy.hidden_size, len(anatomy.blocks)
        width = hidden // self.hparams["downsample_factor"]
        down = (layers + 1) * (hidden * width + width + 2 * width)
        gate, proj, up = width, width * width + width + 2 * width, width * hidden + hidden
        return down + gate + proj + up + ClassifierHead.size(hidden, task.num_labels)
