"""The planner (harness.plan): every method's plan on fake tensors gives, to the byte, the figures a real CPU run
of the same cell measures; on MiniLM at dynamic and fixed padding, and on the tiny decoders and ViT. A method
that cannot be planned says why, and only the ones named here may."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor

from harness import anatomy, backbone, plan, results, runner, worker
from harness.config import load_suite
from harness.formatting import parse_bytes
from harness.meter import EXACT_FIGURES
from harness.method import registry
from tests.conftest import ROOT

METHODS = sorted(registry())
# Each says why in its record (Method.unplannable, or the line of code that reads a value).
UNPLANNABLE = {
    "p_tuning": "LSTM kernel saves a workspace",
    "wta_crs": "activations' norms",
    "velora": "reads a value a plan does not have, at peft/tuners/lora/velora.py",  # the line that reads it
}
EXTRA_ENTRIES = (
    "  - {stack: [{method: lora}, {method: tokentune}], label: lora+tokentune}\n"
    "  - {stack: [{method: lora}, {method: mesa}], label: lora+mesa}\n"
    "  - {method: full, label: full-gc, train: {gradient_checkpointing: true}}\n"
    "  - {method: lora, label: lora-micro, train: {micro_batch_size: 2}}\n"
)
BACKBONES = {
    "minilm": ("minilm-l6", "sst2"),
    "llama-tiny": ("{config: llama-tiny, weights: random}", "sst2_lm"),
    "gpt2-tiny": ("{config: gpt2-tiny, weights: random}", "sst2_lm"),
    "vit-tiny": ("{config: vit-tiny, weights: random}", "digits"),
}


def cells(tmp_path, family: str, padding: str, suite_too: bool = False):
    model, task = BACKBONES[family]
    entries = "".join(f"  - {{method: {name}}}\n" for name in METHODS) + EXTRA_ENTRIES
    suite = tmp_path / f"{family}-{padding}.yaml"
    suite.write_text(
        f"name: planned\nbackbone: {model}\ntasks: [{task}]\nmethods:\n{entries}seeds: [0]\n"
        f"train: {{max_steps: 3, batch_size: 4, max_seq_length: 32, max_train_samples: 24, padding: {padding},"
        " evaluate: false, timing_warmup_steps: 0}\n"
    )
    loaded = load_suite(suite)
    found = {}
    for cell in loaded.cells():
        described = anatomy.describe(backbone.skeleton(loaded.backbone, cell.task))
        if worker.unsupported(cell, described) is None:  # refused before training, planned or run
            found[cell.entry.label] = cell
    return (found, loaded) if suite_too else found


def plans_and_runs(tmp_path, family: str, padding: str, data_dir):
    """{label: (plan, run)}: the suite planned as `harness plan` plans it (a process per cell: a process that
    planned a ViT, then ran more, crashed in torch's freeing of fake tensors), each plannable cell also run."""
    found, suite = cells(tmp_path, family, padding, suite_too=True)
    planned = {
        r["cell"]["label"]: r
        for r in runner.run_suite(suite, tmp_path / "plans", data_dir, fresh=True, planning={"budgets": []}, log=str)
    }
    return {
        label: (
            planned[label],
            worker.run_cell(cell, data_dir, "cpu", progress=False) if planned[label]["status"] == "ok" else None,
        )
        for label, cell in found.items()
    }


def check(planned, ran, label):
    name = label if label in UNPLANNABLE else None
    if name is not None:
        assert planned["status"] == "unsupported" and UNPLANNABLE[name] in planned["error"]["message"], planned
        return
    assert planned["status"] == "ok", (label, planned.get("error"))
    assert ran["status"] == "ok", (label, ran.get("error"))
    expected = {k: ran["measurements"].get(k) for k in EXACT_FIGURES}
    assert {k: planned["measurements"].get(k) for k in EXACT_FIGURES} == expected, label
    assert planned["params"] == ran["params"], label
    assert planned["measurements"]["train_step_flops"] > 0


@pytest.mark.parametrize("padding", ["dynamic", "max_length"])
def test_every_method_plans_what_a_minilm_run_measures(padding, tmp_path, data_dir):
    for label, (planned, ran) in plans_and_runs(tmp_path, "minilm", padding, data_dir).items():
        check(planned, ran, label)


@pytest.mark.parametrize("family", ["llama-tiny", "gpt2-tiny", "vit-tiny"])
def test_every_method_plans_what_a_run_of_a_tiny_model_measures(family, tmp_path, data_dir):
    found = plans_and_runs(tmp_path, family, "dynamic", data_dir)
    assert len(found) >= 15, sorted(found)  # most methods run on every family
    for label, (planned, ran) in found.items():
        check(planned, ran, label)


def test_the_longest_batch_is_planned_where_dynamic_padding_puts_the_peak(tmp_path, data_dir):
    cell = cells(tmp_path, "minilm", "dynamic")["full"]
    planned = plan.plan_cell(cell, data_dir, worker.provenance(cell))
    batches = planned["plan"]["batches"]
    assert [b["why"] for b in batches][0].startswith("first")
    assert "the task's real token lengths" in planned["plan"]["lengths"]
    longest = max(b["shape"][1] for b in batches)
    assert any("longest" in b["why"] and b["shape"][1] == longest for b in batches)


def test_the_largest_batch_search_agrees_with_the_peaks_it_probed():
    peaks = {}

    def peak(b):  # 100 MB of weights and state, 7 MB per example
        peaks[b] = 100_000_000 + 7_000_000 * b
        return peaks[b]

    largest, probed = plan.largest_batch(peak, 1_000_000_000)
    assert largest == (1_000_000_000 - 100_000_000) // 7_000_000
    assert probed[largest] <= 1_000_000_000 < probed[largest + 1]
    assert plan.largest_batch(peak, 50_000_000)[0] == 0
    curved = plan.largest_batch(lambda b: 10 * b + b * b, 10_000)  # not linear: the check and bisection fix it
    assert curved[0] == 95 and 10 * 95 + 95**2 <= 10_000 < 10 * 96 + 96**2


def test_a_budget_search_on_fake_tensors_fits_exactly_at_its_answer(tmp_path, data_dir):
    cell = cells(tmp_path, "minilm", "dynamic")["lora"]
    budget = parse_bytes("400MiB")
    planned = plan.plan_cell(cell, data_dir, worker.provenance(cell), (budget,))
    found = planned["plan"]["budgets"][0]
    assert found["largest_batch"] > 0 and found["fits"] is True
    assert found["peak_at_largest"] <= budget < found["peak_above_largest"]


def test_a_quantised_backbone_is_not_planned_and_says_why(tmp_path, data_dir):
    suite = tmp_path / "q.yaml"
    suite.write_text(
        "backbone: {config: llama-tiny, weights: random, dtype: nf4}\ntasks: [sst2_lm]\n"
        "methods: [{method: lora}]\n"
        "train: {max_steps: 1, batch_size: 2, max_train_samples: 4, evaluate: false, precision: bf16}\n"
    )
    (cell,) = load_suite(suite).cells()
    planned = plan.plan_cell(cell, data_dir, worker.provenance(cell))
    assert planned["status"] == "unsupported" and "bitsandbytes quantises" in planned["error"]["message"]


def test_a_module_copied_while_planning_stays_in_the_plans_mode():
    """copy.deepcopy of fake weights (peft's LN tuning, LST) must not copy the mode with them: freeing such copies
    crashed planning processes."""
    with plan.fake_tensors() as mode:
        norm = torch.nn.LayerNorm(8)
        copied = copy.deepcopy(norm)
    assert copied.weight is not norm.weight and copied.weight.fake_mode is mode


def test_a_large_tensor_made_from_shapes_is_fake_while_planning_and_a_small_one_real(monkeypatch):
    with plan.fake_tensors() as mode:
        pass
    with plan.LargeFactoriesFake(mode):
        large = torch.eye(plan.LARGEST_REAL_FACTORY_BYTES // 2**11)  # 2**21 elements of 4 bytes above the limit
        small = torch.arange(5)
    assert large.shape[0] == plan.LARGEST_REAL_FACTORY_BYTES // 2**11 and isinstance(large, FakeTensor)
    assert not isinstance(small, FakeTensor) and small.tolist() == [0, 1, 2, 3, 4]


def test_dora_plans_the_same_figures_when_its_identity_is_fake(monkeypatch, tmp_path, data_dir):
    """peft's DoRA passes an identity of each layer's input width through its adapter; at 8B shape it is made fake.
    Lowered limit: MiniLM's 384- and 1536-wide identities are made fake here, and the figures stay a run's."""
    cell = cells(tmp_path, "minilm", "dynamic")["dora"]
    monkeypatch.setattr(plan, "LARGEST_REAL_FACTORY_BYTES", 64 * 2**10)
    made_fake = []
    dispatch = plan.LargeFactoriesFake.__torch_dispatch__

    def recording(self, func, types, args=(), kwargs=None):
        out = dispatch(self, func, types, args, kwargs)
        if isinstance(out, FakeTensor):
            made_fake.append(str(func))
        return out

    monkeypatch.setattr(plan.LargeFactoriesFake, "__torch_dispatch__", recording)
    planned = plan.plan_cell(cell, data_dir, worker.provenance(cell))
    assert any("eye" in op for op in made_fake), made_fake
    check(planned, worker.run_cell(cell, data_dir, "cpu", progress=False), "dora")


def test_counting_flops_changes_nothing_the_meter_counts(data_dir, tmp_path):
    """The first step runs under the FLOP counter; the same batch counted again without it saves the same bytes."""
    from harness.meter import Meter
    from harness.train import accumulate

    cell = cells(tmp_path, "minilm", "max_length")["dora"]  # peft's DoRA: the module tracker kept its tensors
    model = worker.build(cell, 3)[0]
    model.train()
    preprocessor = backbone.load_preprocessor(cell.backbone, cell.task)
    batch = next(iter(worker.loaders(cell, data_dir, preprocessor)[1]))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    counted = []
    for flops in (True, False):
        meter = Meter(model, torch.device("cpu"), count_activations="every_step")
        with meter.count_flops() if flops else torch.enable_grad():
            accumulate(model, scaler, batch, cell.train, torch.device("cpu"), meter)
        model.zero_grad(set_to_none=True)
        counted.append(meter.summary()["activation_bytes"])
    assert counted[0] == counted[1]


def test_harness_plan_writes_records_marked_planned_and_a_report(tmp_path, data_dir):
    suite = tmp_path / "s.yaml"
    suite.write_text(
        "name: s\nbackbone: {config: llama-tiny, weights: random}\ntasks: [sst2_lm]\n"
        "methods: [{method: lora}, {method: wta_crs}]\n"
        "train: {max_steps: 2, batch_size: 4, max_train_samples: 8, max_seq_length: 32}\n"
    )
    out = tmp_path / "plans"

    def harness(*args):
        return subprocess.run(
            [sys.executable, "-m", "harness", *args],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env={**os.environ, "HARNESS_DATA_DIR": str(data_dir), "PYTHONPATH": str(ROOT)},
        )

    done = harness("plan", str(suite), "--out", str(out), "--budget", "1GiB", "--length", "24")
    assert done.returncode == 0, done.stderr[-2000:]
    frame = results.load(out)
    assert frame["planned"].all() and set(frame["status"]) == {"ok", "unsupported"}
    lora = json.loads((out / "sst2_lm__lora__seed0.json").read_text())
    assert lora["plan"]["lengths"] == "24 real tokens per sequence (padding: fill)"
    assert lora["plan"]["batches"][0]["shape"] == [4, 24]
    assert lora["plan"]["budgets"][0]["largest_batch"] > 4
    assert "planned" in (tmp_path / "reports" / "s-plan" / "report.md").read_text()
    assert harness("compare", str(out), str(out)).returncode == 0, "plans gate like runs"
    lora["measurements"]["activation_bytes"] = int(lora["measurements"]["activation_bytes"] * 0.9)
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "sst2_lm__lora__seed0.json").write_text(json.dumps(lora))
    assert harness("compare", str(tmp_path / "base"), str(out)).returncode == 1, "10% more activations fails the gate"
