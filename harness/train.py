"""The training and evaluation loop: AdamW (fused where torch has it), linear warm-up and decay, autocast,
gradient accumulation, all under the meter. It knows a model with trainable
parameters, not which method made it.
"""

import contextlib
import math

import numpy as np
import torch
from tqdm.auto import tqdm

from harness import causal_lm
from harness.config import TrainSettings
from harness.meter import Meter


class Diverged(RuntimeError):
    """The loss became NaN or infinite; the cell stops early."""


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def total_steps(settings: TrainSettings, batches_per_epoch: int) -> int:
    if settings.max_steps:
        return settings.max_steps
    return max(1, math.ceil((settings.epochs or 1.0) * batches_per_epoch))


def weight(batch: dict) -> int:
    """What a (micro-)batch's mean loss averages over: its examples, or for a causal LM its target tokens, so
    that accumulated micro-batches weigh as one batch of the same data would."""
    labels = batch["labels"]
    return causal_lm.target_tokens(labels) if labels.dim() == 2 else len(labels)


def micro_batches(batch: dict, size: int | None):
    n = len(batch["labels"])
    size = size or n
    for start in range(0, n, size):
        yield {k: v[start : start + size] for k, v in batch.items()}


def make_optimizer(param_groups, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with the fastest step torch has for these parameters: fused (one kernel for all tensors, on
    CPU as on CUDA) where it supports their device and dtype, else its default. The update is AdamW's
    either way, and the state the same tensors; the meter records which step ran."""
    try:
        return torch.optim.AdamW(param_groups, weight_decay=weight_decay, fused=True)
    except RuntimeError:  # a device or dtype without the fused kernel
        return torch.optim.AdamW(param_groups, weight_decay=weight_decay)


def linear_schedule(steps: int, warmup_ratio: float):
    """The lr factor of step s: linear warm-up over the first warmup_ratio of the steps, then linear decay to 0."""
    warmup = int(warmup_ratio * steps)
    return lambda s: (s + 1) / warmup if s < warmup else max(0.0, (steps - s) / max(1, steps - warmup))


def _stream(progress):
    """Where a step bar goes: `progress` is True (stderr), a stream, or False (no bar)."""
    return None if isinstance(progress, bool) else progress


def train(model, param_groups, loader, settings: TrainSettings, device, meter: Meter, progress=True) -> list[float]:
    """Train for the configured steps; returns the loss of every step."""
    optimizer = make_optimizer(param_groups, settings.weight_decay)
    steps = total_steps(settings, len(loader))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(steps, settings.warmup_ratio))
    scaler = torch.amp.GradScaler(device.type, enabled=settings.precision == "fp16")
    losses: list[float] = []
    model.train()
    bar = tqdm(total=steps, desc="train", disable=not progress, mininterval=2, leave=False, file=_stream(progress))
    while len(losses) < steps:
        for batch in loader:
            batch = to_device(batch, device)
            with meter.step(batch):
                micro_losses = step(
                    model, optimizer, scheduler, scaler, batch, settings, device, meter, first=not losses
                )
                step_loss = sum(loss.item() for loss in micro_losses)
            if not math.isfinite(step_loss):
                raise Diverged(f"loss is {step_loss} at step {len(losses)}")
            losses.append(step_loss)
            bar.update()
            bar.set_postfix(loss=f"{step_loss:.4f}", refresh=False)
            if len(losses) >= steps:
                break
    bar.close()
    return losses


def step(model, optimizer, scheduler, scaler, batch, settings: TrainSettings, device, meter: Meter, first: bool):
    """One optimizer step over `batch`; returns its micro-batches' losses (as tensors: reading a value waits
    for the device, and a plan's tensors have none). The first step's FLOPs, attention kernel, gradients and
    optimizer state go to the meter."""
    with meter.count_flops() if first else contextlib.nullcontext():
        losses = accumulate(model, scaler, batch, settings, device, meter, first)
        if settings.max_grad_norm:
            scaler.unscale_(optimizer)
            trainable = [p for group in optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(trainable, settings.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
    if first:
        meter.record_states(model, optimizer)
    optimizer.zero_grad(set_to_none=True)
    return losses


def accumulate(model, scaler, batch, settings: TrainSettings, device, meter: Meter, first: bool = False):
    """Forward and backward of each micro-batch of `batch`, under the meter's saved-tensor count, their
    gradients accumulated; returns their losses, weighted as shares of the batch's."""
    losses, whole = [], weight(batch)
    for micro in micro_batches(batch, settings.micro_batch_size):
        with meter.saved_tensors(micro):
            with autocast(device, settings.precision):
                loss = model(**micro).loss * (weight(micro) / max(1, whole))
            if first and not losses:
                meter.read_graph(loss)
            scaler.scale(loss).backward()
        losses.append(loss.detach())
    return losses


@torch.no_grad()
def predict(model, loader, task, device, precision: str, progress=True, tokenizer=None, scale=None) -> tuple[dict, int]:
    """What each of the task's metrics reads (harness.metrics.READS -> (predictions, references)) over the
    whole loader, and the number of examples. A causal_lm task's need the tokenizer (to decode generations); a
    regression task's predictions are mapped back by the scale its training targets were standardised by."""
    model.eval()
    if task.is_causal_lm:
        return _predict_causal_lm(model, loader, task, device, precision, progress, tokenizer)
    predictions, references = [], []
    for batch in tqdm(loader, desc="eval", disable=not progress, mininterval=2, leave=False, file=_stream(progress)):
        batch = to_device(batch, device)
        labels = batch.pop("labels")
        with autocast(device, precision):
            logits = model(**batch).logits.float()
        if task.is_regression:
            predictions.append(logits.squeeze(-1) if scale is None else scale.restore(logits.squeeze(-1)))
        else:
            predictions.append(logits.argmax(-1))
        references.append(labels)
    predictions = torch.cat(predictions).cpu().numpy()
    return {"predictions": (predictions, torch.cat(references).cpu().numpy())}, len(predictions)


def _predict_causal_lm(model, loader, task, device, precision, progress, tokenizer) -> tuple[dict, int]:
    """Greedy answers against the targets', and the targets' likelihood (harness.causal_lm)."""
    end = causal_lm.end_token_id(tokenizer)
    answers, nll, tokens = [], [], []
    for batch in tqdm(loader, desc="eval", disable=not progress, mininterval=2, leave=False, file=_stream(progress)):
        batch = to_device(batch, device)
        with autocast(device, precision):
            row_nll, row_tokens = causal_lm.target_likelihood(
                model, batch["input_ids"], batch["attention_mask"], batch["labels"]
            )
            generated = causal_lm.greedy(
                model, batch["prompt_ids"], batch["prompt_mask"], loader.dataset.longest_target, end
            )
        texts = tokenizer.batch_decode(causal_lm.until_end(generated, end), skip_special_tokens=True)
        answers += [causal_lm.answer(text, task.answer_pattern) for text in texts]
        nll.append(row_nll.cpu())
        tokens.append(row_tokens.cpu())
    outputs = {
        "predictions": (np.array(answers, dtype=object), np.array(loader.dataset.answers, dtype=object)),
        "likelihood": (torch.cat(nll).numpy(), torch.cat(tokens).numpy()),
    }
    return outputs, len(answers)
