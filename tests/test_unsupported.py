"""An unsupported (method, backbone) pair is known before training, from the backbone's anatomy alone: `validate`
lists it with its reason, and `run` records the cell as `unsupported`, starts no worker for it, and goes on."""

import json

import pytest

from harness import executors, results, runner
from harness.cli import main
from harness.config import load_suite
from tests.conftest import save_tiny

BODY = """
tasks: [sst2]
methods:
  - {method: full, lr: 1.0e-3}
  - {method: bitfit, lr: 1.0e-2}
train: {max_steps: 2, batch_size: 4, max_train_samples: 16, max_eval_samples: 8, max_seq_length: 16,
        timing_warmup_steps: 0}
"""
REASON = "llama has no bias terms"


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A bias-free tiny random Llama (grouped-query attention, RMSNorm), saved with the MiniLM tokenizer."""
    from transformers import LlamaConfig, LlamaModel

    folder = tmp_path_factory.mktemp("tiny-llama")
    return save_tiny(folder, LlamaConfig, LlamaModel, num_key_value_heads=2, max_position_embeddings=64)


@pytest.fixture
def llama_suite(tmp_path, tiny_llama):
    path = tmp_path / "llama.yaml"
    path.write_text(f"name: llama\nbackbone: {tiny_llama}\n{BODY}")
    return path


def test_the_pair_is_known_from_the_backbone_s_config_alone(llama_suite, monkeypatch):
    from harness import backbone

    monkeypatch.setattr(backbone, "load_model", lambda *a, **k: pytest.fail("no weights are loaded to decide"))
    suite = load_suite(llama_suite)
    found = runner.unsupported_cells(suite, suite.cells())
    assert list(found) == ["sst2__bitfit__seed0"] and REASON in found["sst2__bitfit__seed0"]


def test_validate_lists_the_pair_with_its_reason(llama_suite, glue_like_data, capsys):
    assert main(["validate", str(llama_suite), "--data-dir", str(glue_like_data)]) == 0
    out = capsys.readouterr().out
    assert "1 cells unsupported" in out and f"bitfit: {REASON}" in out and "full:" not in out


def test_run_records_it_without_a_worker_and_goes_on(llama_suite, tmp_path, data_dir, monkeypatch, capsys):
    started = []
    original = executors.Local._start
    monkeypatch.setattr(
        executors.Local, "_start", lambda self, job, *a: started.append(job.cell.key) or original(self, job, *a)
    )
    out = tmp_path / "out"
    argv = ["run", str(llama_suite), "--out", str(out), "--data-dir", str(data_dir), "--no-report"]
    assert main(argv) == 0
    assert started == ["sst2__full__seed0"], "a worker only for the supported cell"
    record = json.loads((out / "sst2__bitfit__seed0.json").read_text())
    assert record["status"] == "unsupported" and REASON in record["error"]["message"]
    assert json.loads((out / "sst2__full__seed0.json").read_text())["status"] == "ok"
    frame = results.load(out)
    assert dict(zip(frame["method"], frame["status"])) == {"full": "ok", "bitfit": "unsupported"}

    from harness import report

    markdown = report.write_report(out, tmp_path / "report").with_name(report.MARKDOWN_NAME).read_text()
    shown = [line for line in markdown.splitlines() if "bitfit" in line and "unsupported" in line]
    assert any(REASON in line for line in shown), "the report shows the cell, its status and the reason"

    capsys.readouterr()
    assert main(argv) == 0
    assert "already done (unsupported), skipped" in capsys.readouterr().out, "final until the code changes"
