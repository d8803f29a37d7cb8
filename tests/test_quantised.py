"""Frozen weights quantised by bitsandbytes (QLoRA's NF4, LLM.int8()): the meter counts their bytes as an
independent count of the storage formats gives them, adapters train over them, and they stay unchanged.

The harness runs such cells on CUDA only (preflight refuses them on a CPU: bitsandbytes' CPU kernels are a
reference fallback); these tests call the worker directly, which quantises where it is told, here on the CPU."""

import math

import pytest
import torch

pytest.importorskip("bitsandbytes")

from harness import backbone, worker  # noqa: E402
from harness.config import load_suite  # noqa: E402
from harness.meter import Meter  # noqa: E402

CPU = torch.device("cpu")
# llama-tiny's quantised layers per block: (out, in) of q, k, v, o, gate, up, down
LAYERS = [(64, 32), (32, 32), (32, 32), (32, 64), (64, 32), (64, 32), (32, 64)]
BLOCKS = 2
BF16_REST = 2 * (2 * 30522 * 32 + 5 * 32)  # embeddings, LM head and the five norms, in bf16


def nf4_bytes(out: int, inp: int) -> int:
    """QLoRA's storage of one weight: 4-bit values, one 8-bit absmax per block of 64 (double quantisation) with
    its fp32 absmax per 256 blocks, the 256-entry fp32 code of that second quantisation, the 16-entry fp32 NF4
    code and an fp32 offset."""
    n = out * inp
    blocks = math.ceil(n / 64)
    return n // 2 + blocks + 4 * math.ceil(blocks / 256) + 4 * 256 + 4 * 16 + 4


def int8_bytes(out: int, inp: int) -> int:
    """LLM.int8()'s storage of one weight: 8-bit values and one fp32 scale per output row."""
    return out * inp + 4 * out


def suite(tmp_path, dtype: str, methods: str):
    path = tmp_path / "q.yaml"
    path.write_text(
        f"backbone: {{config: llama-tiny, weights: random, dtype: {dtype}}}\ntasks: [sst2_lm]\n"
        "train: {max_steps: 6, batch_size: 8, max_train_samples: 48, max_seq_length: 48, precision: bf16,"
        " evaluate: false, warmup_ratio: 0.0}\n"
        f"methods: {methods}"
    )
    return load_suite(path)


@pytest.mark.parametrize("dtype,per_layer", [("nf4", nf4_bytes), ("int8", int8_bytes)])
def test_the_meter_counts_quantised_frozen_bytes_exactly(dtype, per_layer, tmp_path):
    cell = suite(tmp_path, dtype, "[{method: lora}]").cells()[0]
    model = worker.build(cell, device=CPU)[0]
    quantised = [p for p in model.parameters() if backbone.is_quantised(p)]
    assert len(quantised) == BLOCKS * len(LAYERS) and not any(p.requires_grad for p in quantised)
    expected = BF16_REST + BLOCKS * sum(per_layer(out, inp) for out, inp in LAYERS)
    assert Meter(model, CPU).figures["frozen_param_bytes"] == expected


@pytest.mark.parametrize("dtype", ["nf4", "int8"])
def test_adapters_train_over_quantised_weights_which_stay_unchanged(dtype, tmp_path, data_dir, monkeypatch):
    lora, lst = suite(tmp_path, dtype, "[{method: lora, lr: 1.0e-2}, {method: lst, lr: 1.0e-2}]").cells()
    kept = {}
    real_build = worker.build

    def build_and_keep(*args, **kwargs):
        built = real_build(*args, **kwargs)
        kept["model"] = built[0]
        kept["before"] = [p.detach().clone() for p in built[0].parameters() if backbone.is_quantised(p)]
        return built

    monkeypatch.setattr(worker, "build", build_and_keep)
    for cell in (lora, lst):
        record = worker.run_cell(cell, data_dir, "cpu", progress=False)
        assert record["status"] == "ok", record.get("error")
        losses = record["train"]["losses"]
        assert losses[-1] < losses[0], (cell.entry.label, losses)
        after = [p for p in kept["model"].parameters() if backbone.is_quantised(p)]
        assert all(torch.equal(a, b) for a, b in zip(after, kept["before"])), "a quantised weight changed"


def test_a_method_that_trains_the_quantised_weights_fails_its_cell_with_the_reason(tmp_path, data_dir):
    record = worker.run_cell(suite(tmp_path, "nf4", "[{method: full}]").cells()[0], data_dir, "cpu", progress=False)
    assert record["status"] == "failed"
    assert "keeps quantised and frozen" in record["error"]["message"]
