"""Causal-LM tasks: from a row's columns to prompt and target tokens, and from a model's outputs to answers.

A causal_lm task (harness.tasks) writes each example as a prompt and a target, from `str.format` templates
over its columns, after its verbalizer has turned column values into words (SST-2's label 1 into
"positive"). Training feeds prompt + target and the loss covers the target's tokens alone: the prompt's
labels are -100, the index Hugging Face's losses ignore. The tokenizer's end token (end-of-sequence, else
the separator) follows the target, so that generation learns where the answer stops. A sequence longer than
max_seq_length loses prompt tokens from the left, after a leading special token (BOS) which stays; target
tokens are never cut, except those of a target longer than max_seq_length by itself.

Evaluation, per eval example:
- exact_match: greedy generation from the prompt alone, the batch padded on the left, for at most the
  split's longest target (end token included), stopped at the end token, decoded and normalised (`answer`)
  as the target is;
- perplexity: the target's summed negative log-likelihood under teacher forcing, and its token count.
Generation is the harness's own loop, one whole forward per new token and no key-value cache: any method's
module that maps input ids to the logits of every input position generates so, whatever it wraps around the
model (a method that prepends virtual tokens returns their logits first: the input's are the last). The cost
grows with the square of the generated length, which for short answers is small.
"""

import re
import string
import warnings

import torch

from harness.tasks import TaskSpec

IGNORE = -100  # the label Hugging Face's cross-entropy leaves out


def render(task: TaskSpec, frame) -> tuple[list[str], list[str]]:
    """Each row's prompt and target text."""
    words = task.verbalizer or {}

    def value(column: str, v):
        return words[column][str(v.item() if hasattr(v, "item") else v)] if column in words else v

    rows = frame[list(task.text_columns)].to_dict("records")
    rows = [{c: value(c, v) for c, v in row.items()} for row in rows]
    return [task.prompt.format(**row) for row in rows], [task.target.format(**row) for row in rows]


def unverbalized(task: TaskSpec, frame) -> tuple[str, list] | None:
    """(column, values) of a verbalized column's values that have no word, or None when all have one."""
    for column, words in (task.verbalizer or {}).items():
        missing = sorted({str(v.item() if hasattr(v, "item") else v) for v in frame[column]} - set(words))
        if missing:
            return column, missing
    return None


def answer(text: str, pattern: str | None = None) -> str:
    """What exact_match compares: the pattern's last match (its group, if it has one) when the task gives one,
    lower-cased, whitespace collapsed, punctuation stripped from both ends."""
    if pattern is not None:
        matches = re.findall(pattern, text)
        text = matches[-1] if matches else ""
    return " ".join(text.lower().split()).strip(string.punctuation + " ")


def end_token_id(tokenizer) -> int | None:
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id


def fit_prompt(ids: list[int], room: int, specials) -> list[int]:
    """The prompt's last `room` tokens, keeping a leading special token (BOS, [CLS]) in front."""
    if len(ids) <= room:
        return ids
    if room <= 0:
        return []
    keep = ids[:1] if ids[0] in specials and room > 1 else []
    return keep + ids[len(ids) - (room - len(keep)) :]


class Examples(torch.utils.data.Dataset):
    """A causal_lm split as token ids: each example's prompt and target (end token included), unpadded, and
    the normalised answers of its targets."""

    def __init__(self, task: TaskSpec, frame, tokenizer, max_length: int):
        prompts, targets = render(task, frame)
        self.answers = [answer(t, task.answer_pattern) for t in targets]
        end = end_token_id(tokenizer)
        prompt_ids = tokenizer(prompts)["input_ids"]
        target_ids = tokenizer(targets, add_special_tokens=False)["input_ids"]
        specials = set(tokenizer.all_special_ids)
        self.items = []
        for p, t in zip(prompt_ids, target_ids):
            t = (t + ([end] if end is not None else []))[:max_length]
            self.items.append({"prompt": fit_prompt(p, max_length - len(t), specials), "target": t})
        self.longest_target = max(len(it["target"]) for it in self.items)

    def __len__(self):
        return len(self.items)

    def lengths(self) -> list[int]:
        return [len(it["prompt"]) + len(it["target"]) for it in self.items]

    def __getitem__(self, i):
        return self.items[i]


def _pad(rows: list[list[int]], width: int, value: int, left: bool = False) -> torch.Tensor:
    """(rows, width) ids: each row at the start and `value` after it, or with `left` at the end and `value` before."""
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            out[i, slice(width - len(row), width) if left else slice(0, len(row))] = torch.tensor(row)
    return out


def make_collate(pad_id: int, padding: str, max_length: int, evaluation: bool = False):
    """Training batches: prompt + target padded on the right (to the batch's longest, or max_length), with
    labels -100 on the prompt and the padding. Evaluation batches add the prompts alone, padded on the left,
    for generation (`prompt_ids`, `prompt_mask`)."""

    def collate(items):
        sequences = [it["prompt"] + it["target"] for it in items]
        width = max_length if padding == "max_length" else max(map(len, sequences))
        batch = {
            "input_ids": _pad(sequences, width, pad_id),
            "attention_mask": _pad([[1] * len(s) for s in sequences], width, 0),
            "labels": _pad([[IGNORE] * len(it["prompt"]) + it["target"] for it in items], width, IGNORE),
        }
        if evaluation:
            prompts = [it["prompt"] for it in items]
            longest = max(1, *map(len, prompts))  # a prompt cut away entirely still gives generation a position
            batch["prompt_ids"] = _pad(prompts, longest, pad_id, left=True)
            batch["prompt_mask"] = _pad([[1] * len(p) for p in prompts], longest, 0, left=True)
        return batch

    return collate


def target_tokens(labels: torch.Tensor) -> int:
    """Tokens the loss covers: labels other than -100 after the one-position shift of next-token prediction."""
    return int((labels[:, 1:] != IGNORE).sum())


def target_likelihood(model, input_ids, attention_mask, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's summed negative log-likelihood of its target tokens, and their number."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -input_ids.shape[1] :].float()
    shifted = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), shifted, ignore_index=IGNORE, reduction="none"
    )
    return nll.sum(1), (shifted != IGNORE).sum(1)


def greedy(model, ids: torch.Tensor, mask: torch.Tensor, max_new: int, end: int | None) -> torch.Tensor:
    """(batch, new tokens): greedy continuations of left-padded prompts. Positions count real tokens only, so a
        padded row sees the positions it would see alone (except under peft's prompt methods, which ignore position
    ids); a row that has ended repeats the end token."""
    done = torch.zeros(len(ids), dtype=torch.bool, device=ids.device)
    new = []
    for _ in range(max_new):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with warnings.catch_warnings():  # peft's prompt methods drop position ids, and say so at every call
            warnings.filterwarnings("ignore", message="Position ids are not supported")
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
        token = logits.argmax(-1)
        if end is not None:
            token = torch.where(done, torch.full_like(token, end), token)
            done |= token == end
        new.append(token)
        ids = torch.cat([ids, token[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        if done.all():
            break
    return torch.stack(new, 1)


def until_end(rows: torch.Tensor, end: int | None) -> list[list[int]]:
    """Each generated row up to (not including) its first end token."""
    out = []
    for row in rows.tolist():
        out.append(row[: row.index(end)] if end is not None and end in row else row)
    return out
