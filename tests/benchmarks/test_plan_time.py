"""Planning time and memory (harness.plan) of the 13 methods of suites/llm_memory.yaml at Llama-3.1-8B shape
(harness/backbones/llama-3.1-8b, 8.03B parameters), batch 4 x 512, with two budget searches, on this machine:

    pytest tests/benchmarks/test_plan_time.py --benchmark-autosave

pytest-benchmark times the whole `harness plan` command (one round: it plans 13 cells, each in its own process);
extra_info holds the slowest cell's seconds and the largest peak RSS of any planning process. The targets: at most
60 s per cell and under 3 GiB for any process of the command, on a 2-core CPU.
"""

import json
import os
import resource
import subprocess
import sys

from tests.conftest import ROOT

COMMAND = ["plan", "suites/llm_memory.yaml", "--backbone", "llama-3.1-8b", "--budget", "24GiB", "--budget", "80GiB"]
CELL_SECONDS, PROCESS_BYTES = 60, 3 * 2**30


def test_planning_the_llm_suite_at_8b(benchmark, tmp_path, data_dir):
    out = tmp_path / "plans"

    def plan():
        done = subprocess.run(
            [sys.executable, "-m", "harness", *COMMAND, "--out", str(out), "--no-report"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env={**os.environ, "HARNESS_DATA_DIR": str(data_dir)},
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    benchmark.pedantic(plan, rounds=1, iterations=1)
    records = [json.loads(path.read_text()) for path in sorted(out.glob("*.json"))]
    assert len(records) == 13 and all(r["status"] in ("ok", "unsupported") for r in records)
    slowest = max(r["measurements"]["total_seconds"] for r in records)
    largest = max(
        [r["plan"]["peak_rss_bytes"] for r in records]
        + [resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024]  # the command's own process
    )
    benchmark.extra_info.update(slowest_cell_seconds=slowest, largest_process_rss_bytes=largest)
    print(f"\nslowest cell {slowest:.1f} s, largest process {largest / 2**30:.2f} GiB")
    assert slowest <= CELL_SECONDS
    assert largest < PROCESS_BYTES
