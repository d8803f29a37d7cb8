"""Activation compression against full fine-tuning on the same attention backend, on MiniLM.

    pytest tests/benchmarks/test_compression_memory.py -s

SDPA picks its kernel by device and settings: on CPU, attention dropout sends it
to the unfused math path (which saves the length x length probabilities and the
dropout mask), and without dropout to a fused flash kernel (which saves neither);
on CUDA it is fused either way. Each case runs one training step of a batch of
8 SST-2 sentences padded to 128 or 512 tokens, counts the bytes saved for
backward (the meter's count) and names the kernel found in the graph; a
compression method must save less than full fine-tuning on that same kernel.
Figures land in extra_info (and are printed with -s).
"""

import pytest
import torch

from harness import backbone, data
from harness.meter import SavedTensorCounter, attention_backend, attention_implementation
from harness.method import registry
from harness.tasks import BUILTIN_TASKS

TASK = BUILTIN_TASKS["sst2"]
METHODS = ("full", "mesa", "s2a")


@pytest.fixture(scope="module")
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def batch_of(data_dir, device, length: int) -> dict:
    tokenizer = backbone.load_tokenizer(None)
    frame = data.load_split(TASK, "validation", data_dir).iloc[:8]
    encoded = data.Encoded(TASK, frame, tokenizer, length)
    collate = data.make_collate(TASK, tokenizer, "max_length", length)
    return {k: v.to(device) for k, v in collate([encoded[i] for i in range(len(encoded))]).items()}


def model_with(name: str, attention_dropout: float, device):
    torch.manual_seed(0)
    model = backbone.load_model(None, TASK)
    model.config.attention_probs_dropout_prob = attention_dropout
    for module in model.modules():
        if hasattr(module, "attention_head_size"):  # a self-attention block: its dropout is the attention's
            module.dropout.p = attention_dropout
    return registry()[name]().apply(model, TASK).to(device).train()


def saved_bytes(model, batch) -> tuple[int, str]:
    counter = SavedTensorCounter(model)
    with counter:
        loss = model(**batch).loss
        kernel = attention_backend(loss, attention_implementation(model))
        loss.backward()
    return counter.last, kernel


@pytest.mark.parametrize("length", [128, 512])
@pytest.mark.parametrize("attention_dropout", [0.1, 0.0])
def test_compression_saves_less_than_full_finetuning_on_the_same_backend(
    benchmark, data_dir, device, length, attention_dropout
):
    batch = batch_of(data_dir, device, length)
    figures = {name: saved_bytes(model_with(name, attention_dropout, device), batch) for name in METHODS}
    full_bytes, full_kernel = figures["full"]
    benchmark.extra_info.update({f"{name}_saved_bytes": b for name, (b, _) in figures.items()})
    benchmark.extra_info.update({f"{name}_attention": k for name, (_, k) in figures.items()})
    print(
        f"\n{device.type} length {length}, attention dropout {attention_dropout}: full {full_bytes / 2**20:.1f} MiB "
        f"({full_kernel}); "
        + "; ".join(
            f"{n} {b / 2**20:.1f} MiB = {b / full_bytes:.3f} ({k})" for n, (b, k) in figures.items() if n != "full"
        )
    )
    for name in METHODS[1:]:
        assert figures[name][0] < full_bytes, f"{name} saves more than full fine-tuning on {full_kernel}"
    model = model_with("mesa", attention_dropout, device)
    benchmark.pedantic(lambda: model(**batch).loss.backward(), rounds=1, iterations=1)
