"""SHERL: early layers consolidated without a graph, then only the last layer(s) back-propagated.

Diao, Wan, Jia, Zhuge, Zhang, Lu & Chen, "SHERL: Synthesizing High Accuracy and
Efficient Memory for Resource-Limited Transfer Learning", ECCV 2024.

The backbone's N layers are split: the first N - late_layers (early route)
run under torch.no_grad, so they build no graph, save nothing and get no
gradient. The embedding output and their outputs, h_0..h_K, are consolidated by
the Multi-Tiered Sensing Adapter (MTSA):
- each h_l is projected to width m = hidden / downsample_factor (linear +
  LayerNorm): x_l;
- anti-redundancy aggregation, per token: the deepest early output x_K guides
  the shallower ones x_0..x_{K-1}. A shallow layer's redundancy is the sum of
  its positive cosine similarities to all shallow ones (itself included),
  r_l = sum_j relu(cos(x_l, x_j)); its weight is relu(a(x_l * x_K)) / r_l with
  `a` a learned linear score, L1-normalised over layers, so features that
  many layers repeat count less. g = mlp(sum_l w_l x_l) + x_K, with mlp:
  linear m->hidden, ReLU, linear hidden->m, LayerNorm;
- back to the backbone's width: LayerNorm(linear(relu(g))) + tanh(beta / T) h_K,
  beta learnable from 0 (T = 0.1), so the late layers start from the adapter's
  output alone and learn how much of the plain early output to let through.
The late route: the last late_layers (default 1) pretrained layers run on that
with a graph, each called with the arguments the backbone's own forward gave
its first late block (attention mask, rotary or relative positions), so any
family harness.anatomy describes works (methods/_frozen.py); the classifier
reads their output where the backbone's own head reads ([CLS]; a decoder's
last real token) or the mean over tokens (`pooling: mean`).

Trainable: the MTSA and the classification head; with train_late_layers the
late layers' weights as well.
Back-propagated through: the MTSA, the head and the late layers (their
activations are saved; frozen unless train_late_layers). Not through: the
embeddings and the early layers.

Which of the authors' variants this follows. Their code
(github.com/Paranioar/SHERL) builds the MTSA differently per backbone:
- VSE-infty (image-text retrieval; BERT-base text encoder),
  VSE-infty/lib/adapter_for_transformer.py and lib/encoders.py: the embedding
  output and the outputs of layers 1..11 are consolidated (per output: linear
  + LayerNorm to embed_size / downsample_factor = 1024 / 2 = 512); the
  aggregation has no MLP (g = sum_l w_l x_l + x_K); out = Dropout(0.1)(
  LayerNorm(linear(relu(g)))) + tanh(beta / 0.1) h_K; the frozen 12th BERT
  layer runs on that with a graph. All of BERT is frozen.
- MDETR (RoBERTa + DETR transformer), MDETR/models/transformer.py: the same
  block with an MLP after the aggregation (linear m->d, ReLU, linear d->m,
  LayerNorm) and out = LayerNorm(linear(relu(g))) without dropout, over a
  chosen subset of layers (encoder layers [0, 1, 3, 5], consolidated beside
  the encoder with no late layer; decoder layers [0, 2, 3, 4], then the last
  decoder layer runs on the result).
- T5 (the NLP experiments, GLUE), Ladder-Side-Tuning/seq2seq/third_party/
  models/t5/modeling_side_t5.py (MTSAdapter): each output goes through a gated
  adapter (relu(fc1 x), then (fc2(.) + .) * sigmoid(fc3(.))) to width
  d_model / task_reduction_factor, no MLP after the aggregation, out =
  linear(relu(g)) without LayerNorm; in the encoder the result replaces the
  encoder's output (no late layer), in the decoder the last layer runs on it.
This implementation follows the VSE-infty BERT text encoder, the authors'
only BERT-style one: embedding output plus every early layer's output, the
last pretrained layer(s) frozen and back-propagated through. It differs from
it in:
- The aggregation's MLP and the output without dropout come from the MDETR
  variant (VSE-infty has no MLP, and dropout 0.1 after the output LayerNorm).
- Width m = hidden / downsample_factor (384 / 2 on MiniLM); VSE-infty divides
  its joint embedding size (1024) instead, giving 512 on a 768-wide BERT.
- Normalisations: cosine similarities via F.normalize (x / max(||x||, 1e-6))
  and weights / (sum + 1e-6); theirs use x / (||x|| + 1e-8) and + 1e-8.
- The head: a fresh linear classifier on the last layer's state where the
  backbone's head reads (or the mean, `pooling: mean`); VSE-infty pools with GPO into a retrieval
  embedding, and the paper's language-only runs use T5 generating the label.
- `late_layers` (default 1, theirs: 1) may be larger, and
  `train_late_layers: true` fine-tunes the late layers in full (no PETL module
  inside them is offered), at the learning rate times `late_lr_ratio` (0.1),
  since pretrained weights want a smaller step than a fresh adapter. Neither
  is in the authors' code, where only the adapter is trained.
- Every early output is consolidated (the MDETR variant picks a subset).
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
    token_mask,
)


class AntiRedundancyAggregation(nn.Module):
    """Per token: shallow layers weighted by guidance from the deepest one, discounted by their redundancy."""

    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.score = nn.Linear(width, 1)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, width), nn.LayerNorm(width))

    def forward(self, shallow: torch.Tensor, deep: torch.Tensor) -> torch.Tensor:
        """shallow: (tokens, layers, width); deep: (tokens, 1, width) -> (tokens, width)."""
        unit = nn.functional.normalize(shallow, dim=-1, eps=1e-6)
        redundancy = torch.relu(unit @ unit.transpose(1, 2)).sum(-1, keepdim=True)  # (tokens, layers, 1), >= 1
        weights = torch.relu(self.score(shallow * deep)) / redundancy
        weights = weights / (weights.sum(1, keepdim=True) + 1e-6)
        return (self.mlp((weights * shallow).sum(1, keepdim=True)) + deep).squeeze(1)


class SHERLNetwork(FrozenBackboneClassifier):
    def __init__(self, model, late_layers: int, downsample_factor: int, gate_temperature: float, pooling: str):
        super().__init__(model)
        hidden, width = self.anatomy.hidden_size, self.anatomy.hidden_size // downsample_factor
        self.early = len(self.anatomy.blocks) - late_layers
        self.project = nn.ModuleList(
            nn.Sequential(nn.Linear(hidden, width), nn.LayerNorm(width)) for _ in range(self.early + 1)
        )
        self.aggregate = AntiRedundancyAggregation(hidden, width)
        self.out = nn.Linear(width, hidden)
        self.out_norm = nn.LayerNorm(hidden)
        self.gate = nn.Parameter(torch.zeros(1))  # beta; tanh(beta / T) weighs the plain early output
        self.head = ClassifierHead(hidden, model.config)
        self.temperature, self.pooling = gate_temperature, pooling

    def late(self) -> nn.ModuleList:
        return nn.ModuleList(b.module for b in self.anatomy.blocks[self.early :])

    def frozen_features(self, inputs):
        """The embedding output and the early blocks' outputs, and how the backbone calls its first late block."""
        frozen = frozen_states(self.anatomy, inputs, num_blocks=self.early)
        return frozen.hidden, frozen.call

    def trainable_path(self, features, attention_mask):
        hidden_states, call = features
        attention_mask = token_mask(attention_mask, hidden_states[0])
        x = [project(h) for project, h in zip(self.project, hidden_states)]  # embedding + early layers' outputs
        batch, length, width = x[0].shape
        shallow = torch.stack(x[:-1], dim=2).reshape(batch * length, len(x) - 1, width)
        guided = self.aggregate(shallow, x[-1].reshape(batch * length, 1, width)).reshape(batch, length, width)
        hidden = self.out_norm(self.out(torch.relu(guided)))
        hidden = hidden + torch.tanh(self.gate / self.temperature) * hidden_states[-1]
        for block in self.late():  # called as the backbone calls them: its masks, positions, ...
            hidden = call.run(block, hidden)
        return self.head(self.pool(hidden, attention_mask, self.pooling))


class SHERL(Method):
    name = "sherl"
    family = "METL"
    description = (
        "SHERL: anti-redundancy consolidation of no-grad early layers, back-propagation through the last layer(s) only"
    )
    paper = (
        "Diao et al., SHERL: Synthesizing High Accuracy and Efficient Memory for Resource-Limited Transfer "
        "Learning, ECCV 2024"
    )
    trains = "consolidation adapter (MTSA) + head (+ late layers with train_late_layers)"
    default_lr = 1e-3  # no text-classification setting in the paper; on sst2/MiniLM: 1e-3 .79, 3e-3 .77
    defaults = {
        "late_layers": 1,
        "train_late_layers": False,
        "late_lr_ratio": 0.1,
        "downsample_factor": 2,
        "gate_temperature": 0.1,
        "pooling": "cls",
    }

    def check_hparams(self):
        h = self.hparams
        if h["late_layers"] < 1:
            raise ValueError("late_layers must be at least 1")
        if h["downsample_factor"] < 1:
            raise ValueError("downsample_factor must be at least 1")
        if h["gate_temperature"] <= 0:
            raise ValueError("gate_temperature must be positive")
        if h["late_lr_ratio"] <= 0:
            raise ValueError("late_lr_ratio must be positive")
        if h["pooling"] not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {h['pooling']!r}")

    def _check_depth(self, model):
        layers = len(describe(model).blocks)
        if self.hparams["late_layers"] >= layers:
            raise ValueError(
                f"late_layers {self.hparams['late_layers']} leaves none of the backbone's {layers} "
                "layers in the early route; use fewer"
            )

    def unsupported(self, anatomy):
        return classifier_only(anatomy)

    def apply(self, model, task):
        self._check_depth(model)
        freeze_all(model)
        h = self.hparams
        wrapped = SHERLNetwork(model, h["late_layers"], h["downsample_factor"], h["gate_temperature"], h["pooling"])
        if h["train_late_layers"]:
            for p in wrapped.late().parameters():
                p.requires_grad_(True)
        return wrapped

    def param_groups(self, model, lr):
        late = {id(p) for p in model.late().parameters()}
        trained = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in trained if id(p) not in late], "lr": lr}]
        if self.hparams["train_late_layers"]:
            groups.append({"params": [p for p in trained if id(p) in late], "lr": lr * self.hparams["late_lr_ratio"]})
        return groups

    def expected_trainable_params(self, model, task):
        self._check_depth(model)
        anatomy, h = describe(model), self.hparams
        hidden, late = anatomy.hidden_size, h["late_layers"]
        width = hidden // h["downsample_factor"]
        project = (len(anatomy.blocks) - late + 1) * (hidden * width + width + 2 * width)
        aggregate = (width + 1) + (width * hidden + hidden) + (hidden * width + width) + 2 * width
        out = width * hidden + hidden + 2 * hidden + 1  # linear, LayerNorm, gate
        late_blocks = anatomy.blocks[len(anatomy.blocks) - late :]
        tuned = sum(p.numel() for b in late_blocks for p in b.module.parameters()) if h["train_late_layers"] else 0
        return project + aggregate + out + tuned + ClassifierHead.size(hidden, task.num_labels)
