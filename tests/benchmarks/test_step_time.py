"""Step time of the loop users run (`harness.train.train`), per method and against the loops they would
otherwise write: a bare PyTorch loop and Hugging Face `Trainer`, on the same batches.

    pytest tests/benchmarks/test_step_time.py --benchmark-autosave    # record
    pytest tests/benchmarks/test_step_time.py --benchmark-compare     # against the last saved run

Every loop does the same work per step: forward, backward, gradient clipping, the same AdamW step
(harness.train.make_optimizer; `Trainer` gets `adamw_torch_fused`), a linear warm-up/decay schedule and
zeroing the gradients, in fp32. A step's time is taken around exactly that (data loading and moving the
batch to the device are left out of all three); the median over the steps after `WARMUP` is reported.

MiniLM on real SST-2 sentences, dynamic padding: batch 16 and at most 64 tokens on CPU, batch 32 and 128
tokens on CUDA. pytest-benchmark times the harness's whole run of `STEPS` steps, so a regression in
the loop shows in `pytest-benchmark compare`; the median step times and the paired ratios (see
`paired_ratio`) are in extra_info and printed.
"""

import copy
import dataclasses
import gc
import statistics
import time

import pytest
import torch

from harness import backbone, data
from harness.config import TrainSettings
from harness.meter import Meter
from harness.method import Stack, registry
from harness.tasks import BUILTIN_TASKS
from harness.train import linear_schedule, make_optimizer, train

TASK = BUILTIN_TASKS["sst2"]
STEPS, WARMUP, ROUNDS = 30, 3, 3
LR = 1e-4


@pytest.fixture(scope="module")
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="module")
def settings(device):
    batch_size, length = (32, 128) if device.type == "cuda" else (16, 64)
    return TrainSettings(max_steps=STEPS, batch_size=batch_size, max_seq_length=length, timing_warmup_steps=WARMUP)


@pytest.fixture(scope="module")
def batches(data_dir, settings, device):
    """The same STEPS batches, in the same order, for every loop."""
    tokenizer = backbone.load_tokenizer(None)
    frame = data.load_split(TASK, "train", data_dir).iloc[: STEPS * settings.batch_size]
    loader = torch.utils.data.DataLoader(
        data.Encoded(TASK, frame, tokenizer, settings.max_seq_length),
        batch_size=settings.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
        collate_fn=data.make_collate(TASK, tokenizer, settings.padding, settings.max_seq_length),
    )
    return [{k: v.to(device) for k, v in batch.items()} for batch in loader]


@pytest.fixture(scope="module")
def pretrained():
    torch.manual_seed(0)
    return backbone.load_model(None, TASK)


def prepared(name: str, pretrained, device):
    """A fresh copy of the backbone with the method applied, and its optimizer groups."""
    method = Stack([registry()[name]()])
    model, _ = method.attach(copy.deepcopy(pretrained), TASK)
    return model.to(device), method.param_groups(model, LR)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def harness_loop(model, groups, batches, settings, device) -> list[float]:
    meter = Meter(model, device, settings.timing_warmup_steps)
    with meter.phase("train"):
        train(model, groups, batches, settings, device, meter, progress=False)
    return [seconds for seconds, *_ in meter.steps]


def bare_loop(model, groups, batches, settings, device) -> list[float]:
    optimizer = make_optimizer(groups, settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(STEPS, settings.warmup_ratio))
    trainable = [p for g in groups for p in g["params"]]
    model.train()
    times = []
    for batch in batches:
        sync(device)
        start = time.perf_counter()
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, settings.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def trainer_loop(model, groups, batches, settings, device, out_dir) -> list[float]:
    """`Trainer` as its documentation sets it up, fed the prepared batches one per step, in order."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.times, self.start = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            sync(device)
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync(device)
            self.times.append(time.perf_counter() - self.start)

    timer = StepTimes()
    args = TrainingArguments(
        output_dir=str(out_dir),
        max_steps=STEPS,
        per_device_train_batch_size=1,
        learning_rate=LR,
        warmup_steps=int(settings.warmup_ratio * STEPS),
        lr_scheduler_type="linear",
        weight_decay=settings.weight_decay,
        max_grad_norm=settings.max_grad_norm,
        optim="adamw_torch_fused",
        logging_strategy="no",
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        use_cpu=device.type == "cpu",
        seed=0,
    )
    in_order = InOrder(batches)  # not shuffled, so that step i is the same batch in every loop
    Trainer(
        model=model, args=args, train_dataset=in_order, data_collator=lambda items: items[0], callbacks=[timer]
    ).train()
    return timer.times


class InOrder(torch.utils.data.IterableDataset):
    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


def per_step(runs: list[list[float]]) -> list[float]:
    """Each step's median over the rounds, warm-up steps left out."""
    return [statistics.median(run[i] for run in runs) for i in range(WARMUP, STEPS)]


def paired_ratio(ours: list[float], theirs: list[float]) -> float:
    """Median over steps of the ratio of two loops' times for the same batch: batches of different lengths
    take very different times, and pairing them cancels that spread out of the comparison."""
    return statistics.median(a / b for a, b in zip(ours, theirs))


@pytest.mark.parametrize("name", ["full", "lora"])
def test_harness_loop_against_bare_loop_and_trainer(benchmark, name, pretrained, batches, settings, device, tmp_path):
    """Rounds of the three loops, interleaved: before each timed harness run, the bare loop and `Trainer`
    run once each, in alternating order, each on a fresh copy of the model after garbage collection, so
    that drift in load or clocks, and what an earlier run left behind, reach all three alike."""
    runs = {"harness": [], "bare": [], "trainer": []}

    def fresh():
        gc.collect()
        return prepared(name, pretrained, device)

    def others_then_harness_args():
        order = ("bare", "trainer") if len(runs["harness"]) % 2 == 0 else ("trainer", "bare")
        for loop in order:
            model, groups = fresh()
            runs[loop].append(
                bare_loop(model, groups, batches, settings, device)
                if loop == "bare"
                else trainer_loop(model, groups, batches, settings, device, tmp_path / "trainer")
            )
        return fresh(), {}  # pedantic's (args, kwargs) for the timed harness run

    def harness_run(model, groups):
        runs["harness"].append(harness_loop(model, groups, batches, settings, device))

    benchmark.pedantic(harness_run, setup=others_then_harness_args, rounds=ROUNDS, warmup_rounds=0)
    steps = {loop: per_step(values) for loop, values in runs.items()}
    medians = {loop: statistics.median(values) for loop, values in steps.items()}
    ratios = {
        "harness_over_trainer": paired_ratio(steps["harness"], steps["trainer"]),
        "harness_over_bare": paired_ratio(steps["harness"], steps["bare"]),
    }
    benchmark.extra_info.update(
        device=str(device),
        batch_size=settings.batch_size,
        max_seq_length=settings.max_seq_length,
        steps=STEPS,
        rounds=ROUNDS,
        **{f"median_step_s_{loop}": value for loop, value in medians.items()},
        **ratios,
    )
    print(
        f"\n{name} on {device}: median step harness {medians['harness']:.4f} s, bare {medians['bare']:.4f} s, "
        f"Trainer {medians['trainer']:.4f} s; paired ratios harness/Trainer {ratios['harness_over_trainer']:.3f}, "
        f"harness/bare {ratios['harness_over_bare']:.3f}"
    )


@pytest.mark.parametrize("name", sorted(registry()))
def test_train_step(benchmark, name, pretrained, batches, settings, device):
    """Each method's run of the harness's loop; memory figures in extra_info."""
    figures, short = {}, dataclasses.replace(settings, max_steps=8)

    def run(model, groups):
        meter = Meter(model, device, short.timing_warmup_steps)
        with meter.phase("train"):
            train(model, groups, batches[: short.max_steps], short, device, meter, progress=False)
        figures.update(meter.summary())

    benchmark.pedantic(run, setup=lambda: (prepared(name, pretrained, device), {}), rounds=2, warmup_rounds=0)
    benchmark.extra_info.update({k: v for k, v in figures.items() if not isinstance(v, (list, dict))})


def test_meter_overhead(benchmark, pretrained, batches, settings, device):
    """The meter's own cost: the harness's loop with the meter on and off, interleaved."""
    times, short = {"on": [], "off": []}, dataclasses.replace(settings, max_steps=12)

    def paired_round():
        for label in ("off", "on") if len(times["on"]) % 2 == 0 else ("on", "off"):
            model, groups = prepared("full", pretrained, device)
            meter = Meter(model, device, short.timing_warmup_steps, enabled=label == "on")
            with meter.phase("train"):
                train(model, groups, batches[: short.max_steps], short, device, meter, progress=False)
            times[label].append(statistics.median(s for s, *_ in meter.steps[WARMUP:]))

    benchmark.pedantic(paired_round, rounds=2, warmup_rounds=0)
    on, off = statistics.median(times["on"]), statistics.median(times["off"])
    benchmark.extra_info.update(median_on_s=on, median_off_s=off, overhead_ratio=on / off)
    print(f"\nmeter overhead: on {on:.4f}s / off {off:.4f}s = {on / off:.3f}")
