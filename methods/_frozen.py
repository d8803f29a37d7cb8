"""Building blocks for methods that keep a pretrained backbone frozen and out of
the autograd graph (side and parallel networks): the backbone's hidden states
computed by its own forward under `torch.no_grad`, the way it calls its blocks
(so chosen blocks can run again on other inputs), a fresh classification head
that reads where the backbone's own head reads, and the task loss exactly as
Hugging Face's sequence-classification models compute it (or, for a causal_lm
task, as its causal LMs do, on next-token logits of every position).

Any family harness.anatomy describes works: the hidden states are the inputs
and outputs of the blocks the anatomy found, caught by hooks while the base
model runs its own forward (its embeddings, masks, rotary or relative
positions, patch embedding), and the forward stops after the last block
needed; nothing of the backbone's layout is spelled out here.

A method built on `FrozenBackboneClassifier` splits its forward in two, and
tests rest on the split: `frozen_features` (no graph, nothing saved for
backward, no gradient) and `trainable_path` (everything back-propagated).
"""

import inspect
from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from harness.anatomy import Anatomy, describe
from harness.backbone import masked_mean

POOLINGS = ("cls", "mean")


@dataclass(frozen=True)
class BlockCall:
    """The arguments a backbone passes to one of its blocks besides the hidden states (masks, rotary position
    embeddings, relative positions...), caught from its own forward."""

    args: tuple
    kwargs: dict

    def run(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """`block` on `hidden`, called as the backbone calls its blocks; its output hidden states."""
        if "hidden_states" in self.kwargs:
            out = block(*self.args, **{**self.kwargs, "hidden_states": hidden})
        else:
            out = block(hidden, *self.args[1:], **self.kwargs)
        return out[0] if isinstance(out, tuple) else out


class _Enough(Exception):
    """Raised inside the backbone's forward once the blocks asked for have run."""


@dataclass
class FrozenStates:
    """hidden: [input of block 0 (the embedding output), output of block 0, ..., output of block n - 1];
    calls: the backbone's call to each block 0..n (to n - 1 when n is all of them)."""

    hidden: list
    calls: list

    @property
    def call(self) -> BlockCall:
        """The call to block n: how the backbone calls the first block not run (the last, when all ran)."""
        return self.calls[-1]


def model_inputs(base: nn.Module, inputs: dict) -> dict:
    """The batch as the base model takes it: no labels, and no cache built (training has no use for one)."""
    inputs = {k: v for k, v in inputs.items() if k != "labels" and v is not None}
    if "use_cache" in inspect.signature(base.forward).parameters:
        inputs["use_cache"] = False
    return inputs


@torch.no_grad()
def frozen_states(anatomy: Anatomy, inputs: dict, num_blocks: int | None = None) -> FrozenStates:
    """The hidden states around the first `num_blocks` blocks (all by default), from the base model's own forward
    under torch.no_grad: the backbone builds no graph and saves nothing for backward, whatever its parameters'
    requires_grad says. The forward stops once they are known; the blocks after them, the final norm, pooler
    and head do not run."""
    blocks = [b.module for b in anatomy.blocks]
    n = len(blocks) if num_blocks is None else num_blocks
    hidden, calls = [], {}

    def before(i):
        def hook(module, args, kwargs):
            calls[i] = BlockCall(args, kwargs)
            if i == 0:
                hidden.append(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])
            if i == n:
                raise _Enough

        return hook

    def after(i):
        def hook(module, args, kwargs, output):
            hidden.append(output[0] if isinstance(output, tuple) else output)
            if i == n - 1 == len(blocks) - 1:
                raise _Enough

        return hook

    handles = [b.register_forward_pre_hook(before(i), with_kwargs=True) for i, b in enumerate(blocks[: n + 1])]
    handles += [b.register_forward_hook(after(i), with_kwargs=True) for i, b in enumerate(blocks[:n])]
    base = anatomy.base.module
    try:
        base(**model_inputs(base, inputs))
    except _Enough:
        pass
    finally:
        for handle in handles:
            handle.remove()
    if len(hidden) != n + 1:
        raise RuntimeError(f"the backbone's forward ran {len(hidden) - 1} of the {n} blocks asked for")
    return FrozenStates(hidden, [calls[i] for i in sorted(calls)])


def token_mask(attention_mask: torch.Tensor | None, hidden: torch.Tensor) -> torch.Tensor:
    """The (batch, length) 0/1 mask of real tokens; every position is real when there is none (image patches)."""
    if attention_mask is None:
        return torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
    return attention_mask


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, how: str, reads: str = "first") -> torch.Tensor:
    """(batch, length, width) -> (batch, width). 'cls': the token the backbone's own head reads (`reads`: a
    decoder's last real token), else the first, [CLS], also under a head that pools every position (the
    harness's mean-pooling MiniLM: methods with their own head keep the [CLS] they have always read there);
    'mean': the mean over real tokens."""
    if how == "mean":
        return masked_mean(hidden, attention_mask)
    if reads == "last":  # the rightmost real token, whichever side the padding is on
        positions = torch.arange(hidden.shape[1], device=hidden.device)
        last = (attention_mask.to(torch.long) * (positions + 1)).argmax(1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return hidden[:, 0]


# Where configs keep the dropout before their classifier, in the order transformers' heads read them.
_HEAD_DROPOUT = (
    "classifier_dropout",
    "hidden_dropout_prob",
    "seq_classif_dropout",
    "summary_first_dropout",
    "hidden_dropout",
    "dropout",
)


def head_dropout(config) -> float:
    """The dropout probability the family's own classifier uses (0 for families without one, Llama's)."""
    for name in _HEAD_DROPOUT:
        value = getattr(config, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return 0.0


class ClassifierHead(nn.Module):
    """Dropout then a linear map to the labels, initialised as Hugging Face initialises its classifiers."""

    def __init__(self, in_features: int, config):
        super().__init__()
        self.dropout = nn.Dropout(head_dropout(config))
        self.linear = nn.Linear(in_features, config.num_labels)
        nn.init.normal_(self.linear.weight, std=getattr(config, "initializer_range", 0.02))
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(self.dropout(features))

    @staticmethod
    def size(in_features: int, num_labels: int) -> int:
        return in_features * num_labels + num_labels


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, config) -> torch.Tensor:
    """The loss BertForSequenceClassification computes: MSE for regression, cross-entropy for single-label,
    BCE-with-logits for multi-label classification; the problem type inferred the same way when unset."""
    num_labels = config.num_labels
    problem = config.problem_type
    if problem is None:
        if num_labels == 1:
            problem = "regression"
        elif labels.dtype in (torch.long, torch.int):
            problem = "single_label_classification"
        else:
            problem = "multi_label_classification"
    if problem == "regression":
        if num_labels == 1:
            return nn.functional.mse_loss(logits.squeeze(), labels.squeeze().to(logits.dtype))
        return nn.functional.mse_loss(logits, labels.to(logits.dtype))
    if problem == "single_label_classification":
        return nn.functional.cross_entropy(logits.view(-1, num_labels), labels.view(-1))
    return nn.functional.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss Hugging Face's causal LMs compute: position i predicts label i + 1, labels of -100 left out, the mean
    in fp32."""
    return nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device), ignore_index=-100
    )


def classifier_only(anatomy: Anatomy) -> str | None:
    """For `unsupported`: a method whose output is a fresh classifier's logits serves no language-model head."""
    if anatomy.head.reads == "every":
        return (
            "its output is a classifier on pooled features; a causal_lm task needs next-token logits at every position"
        )
    return None


class FrozenBackboneClassifier(nn.Module):
    """forward(**batch) = trainable_path(frozen_features(batch), mask) -> SequenceClassifierOutput(loss, logits).

    `self.model` is the Hugging Face model the method was applied to; its weights stay where they are
    (so the meter counts them as frozen) and its own head goes unused. `self.anatomy` is its layout.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config
        self.anatomy = describe(model)

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor, how: str) -> torch.Tensor:
        return pool(hidden, attention_mask, how, self.anatomy.head.reads)

    def frozen_features(self, inputs: dict):
        """Everything computed from the frozen backbone, without a graph; `inputs` is the batch."""
        raise NotImplementedError

    def trainable_path(self, features, attention_mask) -> torch.Tensor:
        """Logits from the frozen features (`attention_mask` None: every position is real); the only part that
        is back-propagated."""
        raise NotImplementedError

    @property
    def language_model(self) -> bool:
        """Whether the model's head is a language model's (a causal_lm task): the method's output is then the
        next-token logits of every position, and the loss Hugging Face's causal LMs compute."""
        return self.anatomy.head.reads == "every"

    def forward(self, labels=None, **inputs):
        features = self.frozen_features(inputs)
        logits = self.trainable_path(features, inputs.get("attention_mask"))
        if labels is None:
            loss = None
        elif self.language_model:
            loss = next_token_loss(logits, labels)
        else:
            loss = classification_loss(logits, labels, self.config)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def init_fresh(module: nn.Module, std: float) -> None:
    """Linear weights ~ N(0, std) with zero biases, norms at identity: how transformers initialises new layers."""
    from harness.anatomy import is_linear, norm_kind

    for m in module.modules():
        if is_linear(m) or norm_kind(m) is not None:
            weight, bias = getattr(m, "weight", None), getattr(m, "bias", None)
            if isinstance(weight, torch.Tensor):
                nn.init.normal_(weight, std=std) if is_linear(m) else nn.init.ones_(weight)
            if isinstance(bias, torch.Tensor):
                nn.init.zeros_(bias)
