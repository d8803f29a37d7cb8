"""Building blocks for methods that keep a pretrained encoder frozen and out of
the autograd graph (side and parallel networks): the encoder's hidden states
computed under `torch.no_grad`, the attention mask its layers take, a fresh
classification head, and the task loss exactly as Hugging Face's
sequence-classification models compute it.

A method built on `FrozenBackboneClassifier` splits its forward in two, and
tests rest on the split: `frozen_features` (no graph, nothing saved for
backward, no gradient) and `trainable_path` (everything back-propagated).
"""

import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from harness.backbone import masked_mean

POOLINGS = ("cls", "mean")


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer layers of a BERT-style encoder (base_model.embeddings + base_model.encoder.layer)."""
    base = model.base_model
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList) or not hasattr(base, "embeddings"):
        raise ValueError(
            f"{type(model).__name__} is not a BERT-style encoder (base_model.embeddings and "
            "base_model.encoder.layer); this method supports BERT-family backbones only"
        )
    return layers


def layer_mask(config, hidden: torch.Tensor, attention_mask: torch.Tensor):
    """The (batch, length) 0/1 padding mask in the form the encoder's layers take for `config`'s attention
    implementation (eager: additive float, sdpa: boolean or None when nothing is padded)."""
    try:
        from transformers.masking_utils import create_bidirectional_mask
    except ImportError:  # transformers 4.x: layers take the additive (batch, 1, 1, length) mask
        return (1.0 - attention_mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
    return create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=attention_mask)


def run_layer(layer: nn.Module, hidden: torch.Tensor, mask) -> torch.Tensor:
    out = layer(hidden, mask)
    return out[0] if isinstance(out, tuple) else out  # transformers 4.x layers return a tuple


@torch.no_grad()
def frozen_hidden_states(model, input_ids, attention_mask, token_type_ids=None, num_layers=None) -> list[torch.Tensor]:
    """[embedding output, output of layer 1, ..., output of layer `num_layers` (all by default)], computed
    under torch.no_grad: the backbone builds no graph and saves nothing for backward, whatever its
    parameters' requires_grad says."""
    base = model.base_model
    hidden = base.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
    mask = layer_mask(model.config, hidden, attention_mask)
    states = [hidden]
    for layer in encoder_layers(model)[:num_layers]:
        hidden = run_layer(layer, hidden, mask)
        states.append(hidden)
    return states


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, how: str) -> torch.Tensor:
    """(batch, length, width) -> (batch, width): the first ([CLS]) token, or the mean over non-padding tokens."""
    if how == "cls":
        return hidden[:, 0]
    return masked_mean(hidden, attention_mask)


class ClassifierHead(nn.Module):
    """Dropout then a linear map to the labels, initialised as Hugging Face initialises its classifiers."""

    def __init__(self, in_features: int, config):
        super().__init__()
        dropout = getattr(config, "classifier_dropout", None)
        self.dropout = nn.Dropout(config.hidden_dropout_prob if dropout is None else dropout)
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


class FrozenBackboneClassifier(nn.Module):
    """forward(**batch) = trainable_path(frozen_features(...)) -> SequenceClassifierOutput(loss, logits).

    `self.model` is the Hugging Face model the method was applied to; its weights stay where they are
    (so the meter counts them as frozen) and its own head goes unused.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config

    def frozen_features(self, input_ids, attention_mask, token_type_ids=None):
        """Everything computed from the frozen backbone, without a graph."""
        raise NotImplementedError

    def trainable_path(self, features, attention_mask) -> torch.Tensor:
        """Logits from the frozen features; the only part that is back-propagated."""
        raise NotImplementedError

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, **unused):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        features = self.frozen_features(input_ids, attention_mask, token_type_ids)
        logits = self.trainable_path(features, attention_mask)
        loss = classification_loss(logits, labels, self.config) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def init_like_bert(module: nn.Module, std: float) -> None:
    """Linear weights ~ N(0, std) with zero biases, LayerNorms at identity: how BERT initialises new layers."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def bert_layer_size(hidden: int, intermediate: int) -> int:
    """Parameters of one BERT layer of this width, from the shapes alone."""
    attention = 4 * (hidden * hidden + hidden) + 2 * hidden  # q, k, v, output dense; LayerNorm
    feed_forward = (hidden * intermediate + intermediate) + (intermediate * hidden + hidden) + 2 * hidden
    return attention + feed_forward
