"""Step time per method on the MiniLM backbone, with memory figures in extra_info.

    pytest tests/benchmarks --benchmark-autosave          # record
    pytest tests/benchmarks --benchmark-compare           # compare with the last saved run

One training step = forward + backward + AdamW step on the same batch of 32
real SST-2 sentences (dynamic padding), on CUDA when available.
"""

import statistics
import time

import pytest
import torch

from harness import backbone, data
from harness.meter import Meter
from harness.method import registry
from harness.tasks import BUILTIN_TASKS

TASK = BUILTIN_TASKS["sst2"]
BATCH_SIZE = 32


@pytest.fixture(scope="module")
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="module")
def batch(data_dir, device):
    tokenizer = backbone.load_tokenizer(None)
    frame = data.load_split(TASK, "validation", data_dir).iloc[:BATCH_SIZE]
    encoded = data.Encoded(TASK, frame, tokenizer, 128)
    collate = data.make_collate(tokenizer, "dynamic", 128)
    return {k: v.to(device) for k, v in collate([encoded[i] for i in range(len(encoded))]).items()}


def prepared(name, device):
    torch.manual_seed(0)
    model = registry()[name]().apply(backbone.load_model(None, TASK), TASK).to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    model.train()
    return model, optimizer


def one_step(model, optimizer, batch, meter):
    with meter.step(batch):
        with meter.saved_tensors(batch):
            model(**batch).loss.backward()
        optimizer.step()
        if not optimizer.state.get("_recorded"):
            meter.record_states(model, optimizer)
        optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", sorted(registry()))
def test_train_step(benchmark, name, batch, device):
    model, optimizer = prepared(name, device)
    meter = Meter(model, device, timing_warmup_steps=1)
    with meter.phase("train"):
        benchmark.pedantic(one_step, args=(model, optimizer, batch, meter), rounds=5, warmup_rounds=1)
    figures = meter.summary()
    benchmark.extra_info.update({k: v for k, v in figures.items() if not isinstance(v, (list, dict))})
    benchmark.extra_info["tokens_per_step"] = int(batch["attention_mask"].sum())


def test_meter_overhead(benchmark, batch, device):
    """The meter's own cost: the same steps with the meter on and off, interleaved in one run."""
    model, optimizer = prepared("full", device)
    on = Meter(model, device, timing_warmup_steps=0, enabled=True)
    off = Meter(model, device, timing_warmup_steps=0, enabled=False)
    times = {"on": [], "off": []}

    def paired_rounds():
        with on.phase("train"), off.phase("train"):
            for _ in range(5):  # interleaved pairs: drift in clocks or load hits both sides
                for label, meter in (("off", off), ("on", on)):
                    start = time.perf_counter()
                    one_step(model, optimizer, batch, meter)
                    times[label].append(time.perf_counter() - start)

    one_step(model, optimizer, batch, off)  # warm-up
    benchmark.pedantic(paired_rounds, rounds=3, warmup_rounds=0)
    ratio = statistics.median(times["on"]) / statistics.median(times["off"])
    benchmark.extra_info.update(median_on_s=statistics.median(times["on"]), median_off_s=statistics.median(times["off"]),
                                overhead_ratio=ratio, nvml_samples=on.figures.get("nvml_samples"))
    print(f"\nmeter overhead: on {statistics.median(times['on']):.4f}s / off {statistics.median(times['off']):.4f}s = {ratio:.3f}")
