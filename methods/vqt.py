"""Visual Query Tuning (VQT), applied to text: learnable queries read each frozen layer's keys and values.

Tu, Mai & Chao, "Visual Query Tuning: Towards Effective Usage of Intermediate
Representations for Parameter and Memory Efficient Transfer Learning", CVPR 2023.

Every layer l gets num_queries (default 1) learnable query tokens. They pass
through layer l with its frozen weights, but only as queries: their query
vectors attend to the keys and values the layer computes from the original
tokens, then go through the layer's output projection, LayerNorm and
feed-forward block. Nothing is appended to the keys or values, so the
original tokens' computation is exactly the backbone's; the queries' outputs
Z_l summarise layer l. Queries are fresh at every layer (Z_l is not fed to
layer l+1). The head is a linear classifier on the concatenation of the last
layer's [CLS] state and every Z_l, as in the paper's default. Before the head,
each of those 1 + L feature groups is L2-normalised on its own
(`normalize_features`, default true, the authors' NORMALIZE_FEATS=True): the
[CLS] vector, and per layer the num_queries x width values of Z_l flattened
into one vector (one norm per layer, not per query token), so the head reads
1 + L unit vectors. This follows the authors' code (github.com/andytu28/VQT,
src/models/vit_backbones/h2t_vit.py: `F.normalize` of `x[:, 0]` and of each
layer's `q.view(B, -1)` before `torch.cat`; src/configs/config.py:
MODEL.H2T.NORMALIZE_FEATS = True, not overridden by scripts/VQT/*.sh).

Trainable: the query tokens and the linear head.
Not back-propagated through: the original tokens' path. It runs under
torch.no_grad and in inference mode (no dropout, as in the authors' code), so
it saves nothing. The query path keeps activations of size
batch x queries x width per layer, the attention probabilities
(batch x heads x queries x length), and the keys and values it reads
(batch x length x width per layer, needed for the queries' gradient): saved
bytes grow linearly with the number of queries and linearly (never
quadratically) with the sequence length.

Any backbone whose blocks methods/_attention.py can rebuild from their roles
works: post-norm encoders (BERT, RoBERTa, DistilBERT), pre-norm ViTs and
decoders (GPT-2, Llama with grouped-query attention and rotary positions).

Departures from the paper:
- Classification of text as well as images, on any such backbone; the paper
  uses ViTs. The query path follows the block's own order (pre-norm:
  norm, attention, residual, norm, FFN, residual; post-norm: attention,
  residual + norm, FFN, residual + norm).
- On a pre-norm backbone the head reads the last block's output at [CLS]
  after the final norm, as the backbone's own head would.
- On decoders the queries read every real token (no causal mask: they sit at
  no position) and carry no rotary embedding; the keys carry theirs.
- The summary token is where the backbone's head reads: [CLS], or a
  decoder's last real token.
- Query tokens are initialised uniformly in +-sqrt(6 / (2 * hidden)) (the
  paper's Xavier-style bound uses the image patch size, which text has not).
- Keys and values for the queries are recomputed from each layer's input with
  the layer's own frozen projections (a second pass through two linear maps)
  rather than captured from inside the backbone's attention.
- The paper's optional feature selection to shrink the head is not offered.
"""

import math

import torch
from torch import nn
from torch.nn import functional as F

from harness.anatomy import describe
from harness.method import Method, freeze_all
from methods import _attention
from methods._attention import QueryRows, rows_mask
from methods._frozen import ClassifierHead, FrozenBackboneClassifier, classifier_only, frozen_states, token_mask


class QueryTuning(FrozenBackboneClassifier):
    def __init__(self, model, num_queries: int, dropout: float, normalize_features: bool = True):
        super().__init__(model)
        self.normalize_features = normalize_features
        self.blocks = [QueryRows(self.anatomy, block) for block in self.anatomy.blocks]
        layers, hidden = len(self.blocks), self.anatomy.hidden_size
        bound = math.sqrt(6.0 / (2 * hidden))
        self.queries = nn.Parameter(torch.empty(layers, num_queries, hidden).uniform_(-bound, bound))
        self.query_dropout = nn.Dropout(dropout)
        self.head = ClassifierHead(hidden * (1 + layers * num_queries), model.config)

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.eval()  # the frozen backbone always runs as at inference, as in the authors' code
        return self

    @torch.no_grad()
    def frozen_features(self, inputs):
        """The last block's state where the head reads, and every block's keys and values of the original tokens."""
        frozen = frozen_states(self.anatomy, inputs)
        last = frozen.hidden[-1]
        if self.anatomy.final_norm is not None:  # pre-norm: the backbone's head reads after its final norm
            last = self.anatomy.final_norm.module(last)
        mask = token_mask(inputs.get("attention_mask"), last)
        keys_values = [
            block.keys_values(h, call.kwargs.get("position_embeddings"))
            for block, h, call in zip(self.blocks, frozen.hidden[:-1], frozen.calls)
        ]
        return self.pool(last, mask, "cls"), keys_values

    def trainable_path(self, features, attention_mask):
        summary, keys_values = features
        batch = summary.shape[0]
        attention_mask = token_mask(attention_mask, keys_values[0][0][:, 0])
        summaries = [summary]
        for block, queries, (keys, values) in zip(self.blocks, self.queries, keys_values):
            queries = self.query_dropout(queries.expand(batch, -1, -1))
            mask = rows_mask(attention_mask, queries.shape[1])
            summaries.append(block(queries, keys, values, mask).flatten(1))
        if self.normalize_features:  # one L2 norm per group: the summary token, then each layer's queries together
            summaries = [F.normalize(group, dim=-1) for group in summaries]
        return self.head(torch.cat(summaries, dim=-1))


class VisualQueryTuning(Method):
    name = "vqt"
    family = "METL"
    description = "VQT: learnable per-layer queries read frozen keys/values; original tokens run without a graph"
    paper = "Tu, Mai & Chao, Visual Query Tuning, CVPR 2023"
    trains = "query tokens + linear head"
    # the paper tunes it per dataset. On sst2/MiniLM (1 epoch of 2000, batch 16), with normalised features:
    # 3e-3 .765, 1e-2 .782, 3e-2 .799, 1e-1 .772, 3e-1 .770 (without: 3e-3 .775, as before them)
    default_lr = 3e-2
    defaults = {"num_queries": 1, "dropout": 0.1, "normalize_features": True}

    def check_hparams(self):
        if self.hparams["num_queries"] < 1:
            raise ValueError("num_queries must be at least 1")
        if not 0 <= self.hparams["dropout"] < 1:
            raise ValueError("dropout must be in [0, 1)")

    def unsupported(self, anatomy):
        return classifier_only(anatomy) or _attention.unsupported(anatomy)

    def apply(self, model, task):
        freeze_all(model)
        h = self.hparams
        return QueryTuning(model, h["num_queries"], h["dropout"], h["normalize_features"])

    def expected_trainable_params(self, model, task):
        anatomy, t = describe(model), self.hparams["num_queries"]
        hidden, layers = anatomy.hidden_size, len(anatomy.blocks)
        return layers * t * hidden + ClassifierHead.size(hidden * (1 + layers * t), task.num_labels)
