"""On a CUDA machine: the harness's peak allocated bytes for a cell against
torch.cuda.max_memory_allocated of a bare training loop on the same cell
(same model, method, batches, optimizer, clipping), each in its own process.
Target: within 1%. NVML's figure is printed beside them.

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
    import json, sys, torch
    from harness import backbone, data, worker
    from harness.config import load_suite
    cell = load_suite(sys.argv[1]).cells()[0]
    task, settings = cell.task, cell.train
    device = torch.device("cuda")
    worker.seed_everything(cell.seed)
    tokenizer = backbone.load_tokenizer(None)
    model, _, groups, _ = worker.build(cell)
    model.to(device)
    frame = data.subset(data.load_split(task, "train", data.resolve_data_dir(None)), settings.max_train_samples)
    loader = torch.utils.data.DataLoader(data.Encoded(task, frame, tokenizer, settings.max_seq_length),
        batch_size=settings.batch_size, shuffle=True, generator=torch.Generator().manual_seed(cell.seed),
        collate_fn=data.make_collate(task, tokenizer, settings.padding, settings.max_seq_length), drop_last=True)
    optimizer = torch.optim.AdamW(groups)
    trainable = [p for g in groups for p in g["params"]]
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    model.train()
    for step, batch in zip(range(settings.max_steps), loader):
        batch = {k: v.to(device) for k, v in batch.items()}
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, settings.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    print(json.dumps({"bare_peak_allocated": torch.cuda.max_memory_allocated()}))
""")


@pytest.mark.parametrize("method", ["full", "lora", "linear_probe"])
def test_harness_peak_matches_bare_loop(method, tmp_path, data_dir):
    suite = tmp_path / "cell.yaml"
    suite.write_text(CELL.replace("METHOD", method))
    out = tmp_path / "results"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "harness",
            "run",
            str(suite),
            "--device",
            "cuda",
            "--out",
            str(out),
            "--no-report",
            "--data-dir",
            str(data_dir),
        ],
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
    bare_peak = json.loads(bare.stdout.strip().splitlines()[-1])["bare_peak_allocated"]
    m = record["measurements"]
    ratio = m["peak_gpu_allocated_bytes"] / bare_peak
    print(
        f"\n{method}: harness peak {m['peak_gpu_allocated_bytes']:,} B, bare loop {bare_peak:,} B, ratio {ratio:.4f}; "
        f"reserved {m['peak_gpu_reserved_bytes']:,} B; NVML {m.get('nvml_peak_bytes')} B ({m.get('nvml_source')}, "
        f"{m.get('nvml_samples')} samples); modelled {m['modelled_peak_bytes']:,} B; "
        f"activations {m['activation_bytes']:,} B"
    )
    assert abs(ratio - 1) <= 0.01
