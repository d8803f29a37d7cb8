"""On a CUDA machine: the harness's peak allocated bytes for a cell against
torch.cuda.max_memory_allocated of a bare training loop on the same cell
(same model, method, batches, optimizer, clipping, autocast), each in its own
process, and at peft method_comparison's LoRA setting (Llama-3.2-3B's shape,
bf16) the reserved max/mean/p99 against the bare loop's. Target: within 1%.
NVML's figure is printed beside them.

    pytest tests/benchmarks/test_cuda_crosscheck.py -s
"""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

CELL = """
name: crosscheck
tasks: [sst2]
methods: [{method: METHOD}]
train: {max_steps: 20, batch_size: 32, max_train_samples: 640, max_eval_samples: 64, timing_warmup_steps: 2}
"""

BARE_LOOP = textwrap.dedent("""
    import json, sys, numpy as np, torch
    from harness import backbone, data, worker
    from harness.config import load_suite
    from harness.train import autocast
    cell = load_suite(sys.argv[1]).cells()[0]
    task, settings = cell.task, cell.train
    device = torch.device("cuda")
    worker.seed_everything(cell.seed)
    tokenizer = backbone.load_preprocessor(cell.backbone, task)
    model, _, groups, _ = worker.build(cell)
    model.to(device)
    frame = data.subset(data.load_split(task, "train", data.resolve_data_dir(None)), settings.max_train_samples)
    loader = torch.utils.data.DataLoader(data.examples(task, frame, tokenizer, settings.max_seq_length),
        batch_size=settings.batch_size, shuffle=True, generator=torch.Generator().manual_seed(cell.seed),
        collate_fn=data.make_collate(task, tokenizer, settings.padding, settings.max_seq_length), drop_last=True)
    optimizer = torch.optim.AdamW(groups)
    trainable = [p for g in groups for p in g["params"]]
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    model.train()
    reserved = []
    for step, batch in zip(range(settings.max_steps), loader):
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast(device, settings.precision):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, settings.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        reserved.append(torch.cuda.memory_reserved())
    print(json.dumps({"bare_peak_allocated": torch.cuda.max_memory_allocated(), "reserved_max": max(reserved),
        "reserved_mean": float(np.mean(reserved)), "reserved_p99": float(np.percentile(reserved, 99))}))
""")


def run_both(suite, tmp_path, data_dir) -> tuple[dict, dict]:
    """(the harness's record of the suite's one cell, the bare loop's figures on the same cell), each run in its
    own process on CUDA."""
    out = tmp_path / "results"
    subprocess.run(
        [sys.executable, "-m", "harness", "run", str(suite), "--device", "cuda", "--out", str(out), "--no-report"]
        + ["--data-dir", str(data_dir)],
        check=True,
    )
    record = json.loads(next(out.glob("*.json")).read_text())
    assert record["status"] == "ok", record.get("error")
    bare = subprocess.run(
        [sys.executable, "-c", BARE_LOOP, str(suite)],
        check=True,
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "HARNESS_DATA_DIR": str(data_dir)},
    )
    return record, json.loads(bare.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("method", ["full", "lora", "linear_probe"])
def test_harness_peak_matches_bare_loop(method, tmp_path, data_dir):
    suite = tmp_path / "cell.yaml"
    suite.write_text(CELL.replace("METHOD", method))
    record, bare = run_both(suite, tmp_path, data_dir)
    bare_peak = bare["bare_peak_allocated"]
    m = record["measurements"]
    ratio = m["peak_gpu_allocated_bytes"] / bare_peak
    print(
        f"\n{method}: harness peak {m['peak_gpu_allocated_bytes']:,} B, bare loop {bare_peak:,} B, ratio {ratio:.4f}; "
        f"reserved {m['peak_gpu_reserved_bytes']:,} B; NVML {m.get('nvml_peak_bytes')} B ({m.get('nvml_source')}, "
        f"{m.get('nvml_samples')} samples); modelled {m['modelled_peak_bytes']:,} B; "
        f"activations {m['activation_bytes']:,} B"
    )
    assert abs(ratio - 1) <= 0.01


# peft's method_comparison LoRA run: Llama-3.2-3B in bf16, LoRA r=32, alpha 64 on q_proj and v_proj, batch 4, its
# MetaMathQA samples about 210 tokens on average (here every sequence is 210 tokens: padding fill). Its published
# reserved max on an L40S: 21,260 MiB.
PEFT_COMPARISON = """
name: peft_comparison
backbone: {config: llama-3.2-3b, weights: random, dtype: bf16}
tasks: [sst2_lm]
methods: [{method: lora, lr: 1.0e-4, hparams: {r: 32, alpha: 64, dropout: 0.0, target_modules: [query, value]}}]
train: {max_steps: 20, batch_size: 4, max_seq_length: 210, padding: fill, precision: bf16, evaluate: false,
        max_train_samples: 400, timing_warmup_steps: 2}
"""


def test_reserved_memory_at_peft_method_comparisons_lora_setting_matches_a_bare_loop(tmp_path, data_dir):
    suite = tmp_path / "peft.yaml"
    suite.write_text(PEFT_COMPARISON)
    record, bare = run_both(suite, tmp_path, data_dir)
    m = record["measurements"]
    mib = 2**20
    print(
        f"\nLlama-3.2-3B LoRA r=32 q,v, bf16, 4 x 210: reserved max/mean/p99 harness "
        f"{m['reserved_max_bytes'] / mib:,.0f} / {m['reserved_mean_bytes'] / mib:,.0f} / "
        f"{m['reserved_p99_bytes'] / mib:,.0f} MiB, bare loop {bare['reserved_max'] / mib:,.0f} / "
        f"{bare['reserved_mean'] / mib:,.0f} / {bare['reserved_p99'] / mib:,.0f} MiB; peft's published max 21,260 MiB "
        f"(L40S, MetaMathQA); allocated peak {m['peak_gpu_allocated_bytes'] / mib:,.0f} MiB; "
        f"{m['train_tokens_per_s']:,.0f} tokens/s, {m['train_target_tokens_per_s']:,.0f} target tokens/s"
    )
    for key in ("max", "mean", "p99"):
        assert abs(m[f"reserved_{key}_bytes"] / bare[f"reserved_{key}"] - 1) <= 0.01, key
