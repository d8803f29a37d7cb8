"""The meter's exact figures agree with counts worked out by hand."""

import numpy as np
import pytest
import torch

from harness.config import TrainSettings
from harness.meter import Meter, SavedTensorCounter
from harness.train import train
from tests.conftest import tiny_bert, toy_batch, toy_task

F32 = 4


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def test_saved_activations_by_hand():
    model, x = mlp(), torch.randn(5, 4)
    with SavedTensorCounter(model) as counter:
        model(x).pow(2).sum().backward()
    # Linear 1 saves its input x (5x4) for its weight gradient; ReLU saves its output (5x8),
    # which Linear 2 also saves as its input (one storage, counted once); pow saves its
    # input (5x3). Weights are parameters and are left out; sum saves no tensor.
    assert counter.last == (5 * 4 + 5 * 8 + 5 * 3) * F32


def test_frozen_prefix_saves_nothing():
    model, x = mlp(), torch.randn(5, 4)
    model[0].requires_grad_(False)
    with SavedTensorCounter(model) as counter:
        model(x).pow(2).sum().backward()
    # Nothing before Linear 2 needs a gradient, so only its input (5x8) and pow's input (5x3) are kept.
    assert counter.last == (5 * 8 + 5 * 3) * F32


def test_peak_is_the_maximum_over_steps():
    model = mlp()
    counter = SavedTensorCounter(model)
    for rows in (5, 9, 2):
        with counter:
            model(torch.randn(rows, 4)).pow(2).sum().backward()
    assert counter.peak == 9 * (4 + 8 + 3) * F32 and counter.last == 2 * (4 + 8 + 3) * F32


def train_tiny(seed: int, trainable_layers=None):
    task = toy_task()
    model = tiny_bert(task, seed)
    if trainable_layers is not None:
        for name, p in model.named_parameters():
            p.requires_grad_(any(name.startswith(prefix) for prefix in trainable_layers))
    batch = toy_batch(task)
    loader = [batch] * 3
    meter = Meter(model, torch.device("cpu"), timing_warmup_steps=1)
    groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": 1e-3}]
    with meter.phase("train"):
        train(model, groups, loader, TrainSettings(max_steps=3), torch.device("cpu"), meter, progress=False)
    return model, meter.summary()


def test_state_bytes_follow_from_the_trainable_parameters():
    model, figures = train_tiny(0, trainable_layers=["bert.encoder.layer.1", "classifier"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    trainable_bytes = sum(p.numel() for p in trainable) * F32
    frozen_bytes = sum(p.numel() for p in model.parameters() if not p.requires_grad) * F32
    assert figures["trainable_param_bytes"] == trainable_bytes
    assert figures["frozen_param_bytes"] == frozen_bytes
    assert figures["grad_bytes"] == trainable_bytes  # one fp32 gradient per trainable weight
    # AdamW keeps exp_avg and exp_avg_sq per weight, plus a scalar fp32 step counter per tensor.
    assert figures["optimizer_bytes"] == 2 * trainable_bytes + len(trainable) * F32
    assert figures["modelled_peak_bytes"] == (
        frozen_bytes
        + trainable_bytes
        + figures["buffer_bytes"]
        + figures["grad_bytes"]
        + figures["optimizer_bytes"]
        + figures["activation_bytes"]
    )
    assert figures["timed_steps"] == 2 and figures["train_samples_per_s"] > 0
    assert "peak_gpu_allocated_bytes" not in figures, "no CUDA figure on a CPU run: empty, not zero"
    assert figures["optimizer_step"] == "AdamW (fused)", "the fastest step torch has for CPU float32 weights"


def test_the_fused_step_is_adamws_step():
    """The harness's optimizer against torch's plain for-loop AdamW from the same weights and gradients:
    the same update (to rounding), and the same state, so optimizer_bytes does not depend on the kernel."""
    from harness.train import make_optimizer

    torch.manual_seed(0)
    weights = [torch.randn(33, 7), torch.randn(5)]
    sides = []
    for build in (
        lambda groups: make_optimizer(groups, 0.01),
        lambda groups: torch.optim.AdamW(groups, weight_decay=0.01, foreach=False),
    ):
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        optimizer = build([{"params": params[:1], "lr": 1e-2}, {"params": params[1:], "lr": 3e-3}])
        for step in range(3):
            for p, w in zip(params, weights):
                p.grad = torch.sin(w * (step + 1))
            optimizer.step()
        sides.append((params, optimizer))
    (fused, fused_opt), (plain, plain_opt) = sides
    assert fused_opt.defaults["fused"] and not plain_opt.defaults["fused"]
    for a, b in zip(fused, plain):
        assert not torch.equal(a, weights[0] if a.dim() == 2 else weights[1]), "it moved"
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for a, b in zip(fused, plain):
        assert fused_opt.state[a].keys() == plain_opt.state[b].keys()
        assert [t.nbytes for t in fused_opt.state[a].values()] == [t.nbytes for t in plain_opt.state[b].values()]


def test_freezing_more_saves_fewer_activations():
    _, full = train_tiny(0)
    _, top_only = train_tiny(0, trainable_layers=["bert.encoder.layer.1", "classifier"])
    _, head_only = train_tiny(0, trainable_layers=["classifier"])
    assert full["activation_bytes"] > top_only["activation_bytes"] > head_only["activation_bytes"] > 0


def test_counting_per_shape_gives_the_same_peak_as_every_step():
    model = mlp()
    batches = [{"x": torch.randn(rows, 4)} for rows in (5, 9, 5, 2, 9)]
    peaks = {}
    for mode in ("per_shape", "every_step"):
        meter = Meter(model, torch.device("cpu"), count_activations=mode)
        for batch in batches:
            with meter.saved_tensors(batch):
                model(batch["x"]).pow(2).sum().backward()
        peaks[mode] = meter.saved.peak
    assert peaks["per_shape"] == peaks["every_step"] == 9 * (4 + 8 + 3) * F32


def test_counts_are_identical_across_runs_with_the_same_seed():
    _, a = train_tiny(3)
    _, b = train_tiny(3)
    keys = ["activation_bytes", "grad_bytes", "optimizer_bytes", "modelled_peak_bytes"]
    assert {k: a[k] for k in keys} == {k: b[k] for k in keys}


def test_a_side_graph_dropped_during_the_forward_is_not_counted():
    """Saved tensors whose graph the forward discards are freed before backward: not held, not counted."""
    model, x = mlp(), torch.randn(5, 4)
    with SavedTensorCounter(model) as counter:
        side = model[0](x * 2)  # builds a graph (Linear 1 saves x * 2), then drops it
        side.detach_()
        del side
        model(x).pow(2).sum().backward()
    assert counter.last == (5 * 4 + 5 * 8 + 5 * 3) * F32


def run_meter_on(model, batch):
    meter = Meter(model, torch.device("cpu"), timing_warmup_steps=0)
    groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": 1e-3}]
    with meter.phase("train"):
        train(model, groups, [batch], TrainSettings(max_steps=1), torch.device("cpu"), meter, progress=False)
    return meter.summary()


def test_records_which_attention_ran():
    from harness.method import registry

    task = toy_task()
    batch = toy_batch(task)
    math = tiny_bert(task)  # attention dropout 0.1: SDPA on CPU takes its unfused math path
    assert run_meter_on(math, batch)["attention_backend"] == "math"
    fused = tiny_bert(task)
    fused.config.attention_probs_dropout_prob = 0.0
    for layer in fused.bert.encoder.layer:
        layer.attention.self.dropout.p = 0.0
    figures = run_meter_on(fused, batch)
    assert (figures["attention_implementation"], figures["attention_backend"]) == ("sdpa", "flash_cpu")
    mesa = registry()["mesa"]().apply(tiny_bert(task), task)
    figures = run_meter_on(mesa, batch)
    assert figures["attention_implementation"].startswith("compressed_")
    assert figures["attention_backend"] == "CompressedAttention"
    probe = registry()["linear_probe"]().apply(tiny_bert(task), task)
    assert run_meter_on(probe, batch)["attention_backend"] == "none", "no attention is back-propagated through"


def test_a_method_whose_saved_bytes_follow_the_values_is_counted_every_step(tiny_suite, tmp_path, data_dir):
    """At fixed padding every batch has one shape, yet TokenTune's selected block follows each batch's
    real-token counts: per-shape counting would keep the first batch's figure."""
    import json

    from harness.cli import main

    suite = tiny_suite("""
tasks: [sst2]
methods:
  - {method: full, lr: 1.0e-4}
  - {method: tokentune, lr: 1.0e-4}
train: {max_steps: 4, batch_size: 8, max_train_samples: 64, max_seq_length: 48, padding: max_length, evaluate: false}
""")
    out = tmp_path / "out"
    assert main(["run", str(suite), "--out", str(out), "--data-dir", str(data_dir), "--no-report"]) == 0
    figures = {
        label: json.loads((out / f"sst2__{label}__seed0.json").read_text())["measurements"]
        for label in ("full", "tokentune")
    }
    assert figures["full"]["count_activations"] == "per_shape"
    assert figures["tokentune"]["count_activations"] == "every_step"


def test_reserved_memory_is_read_after_every_step_and_summarised_as_peft_does(monkeypatch):
    """CUDA's reserved memory after each step gives max, mean and p99 (faked here: the readings a device would
    give, in order)."""
    readings = iter([100, 300, 200, 1000])
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: next(readings))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    model = tiny_bert(toy_task())
    meter = Meter(model, torch.device("cpu"), timing_warmup_steps=0)
    meter.cuda = True
    for _ in range(4):
        with meter.step(toy_batch(toy_task())):
            pass
    summary = meter.summary()
    assert summary["reserved_max_bytes"] == 1000 and summary["reserved_mean_bytes"] == 400
    assert summary["reserved_p99_bytes"] == pytest.approx(np.percentile([100, 300, 200, 1000], 99))
    assert "reserved_max_bytes" not in Meter(model, torch.device("cpu")).summary(), "no CUDA, no figure"


def test_flops_of_a_step_by_hand_and_the_rate_only_where_every_step_is_alike():
    """A bias-free Linear (in 6, out 5) on 7 rows whose input needs no gradient: 2*7*6*5 multiply-adds forward,
    as many for the weight's gradient, none for the input's; the optimizer's and the loss's work is elementwise."""

    class Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(6, 5, bias=False)

        def forward(self, input_ids, labels):  # the meter counts tokens as input_ids' elements
            return type("Out", (), {"loss": (self.layer(input_ids) - labels).pow(2).mean()})()

    model = Linear()
    groups = [{"params": list(model.parameters()), "lr": 1e-3}]
    alike = [{"input_ids": torch.randn(7, 6), "labels": torch.randn(7, 5)} for _ in range(3)]
    meter = Meter(model, torch.device("cpu"), timing_warmup_steps=0)
    train(model, groups, alike, TrainSettings(max_steps=3, max_grad_norm=None), torch.device("cpu"), meter, False)
    figures = meter.summary()
    assert figures["train_step_flops"] == 2 * (2 * 7 * 6 * 5)
    assert figures["achieved_flops_per_s"] > 0 and "mfu" not in figures, "no GPU, no peak, no MFU"
    unlike = alike[:2] + [{"input_ids": torch.randn(9, 6), "labels": torch.randn(9, 5)}]
    meter = Meter(model, torch.device("cpu"), timing_warmup_steps=0)
    train(model, groups, unlike, TrainSettings(max_steps=3, max_grad_norm=None), torch.device("cpu"), meter, False)
    figures = meter.summary()
    assert "achieved_flops_per_s" not in figures and any("FLOP/s left empty" in n for n in figures["meter_notes"])
