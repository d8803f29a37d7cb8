"""Resume keeps a record only if the code that produced it is the code that would run now."""

import json

from harness.cli import main

PLUGIN = """
from harness.method import Method, count, freeze_all, head_parameters


class HeadOnly(Method):
    name = "head_only_plugin"
    family = "baseline"
    description = "the head alone"
    paper = "a test"

    def apply(self, model, task):
        freeze_all(model)
        for p in head_parameters(model).values():
            p.requires_grad_(True)
        return model

    def expected_trainable_params(self, model, task):
        return count(head_parameters(model).values())
"""


def test_rerun_keeps_records_of_the_same_code_and_reruns_those_of_changed_code(tiny_suite, tmp_path, data_dir, capsys):
    plugin = tmp_path / "head_only.py"
    plugin.write_text(PLUGIN)
    suite = tiny_suite(f"""
tasks: [sst2]
methods:
  - {{method: linear_probe, lr: 1.0e-2}}
  - {{method: '{plugin}:HeadOnly', label: plugin, lr: 1.0e-2}}
train: {{max_steps: 2, batch_size: 8, max_train_samples: 32, max_eval_samples: 16, max_seq_length: 32}}
""")
    out = tmp_path / "out"
    run = lambda: main(["run", str(suite), "--out", str(out), "--data-dir", str(data_dir), "--no-report"])
    assert run() == 0
    record = json.loads((out / "sst2__plugin__seed0.json").read_text())
    assert str(plugin) in record["code"] and "methods/linear_probe.py" not in record["code"]
    assert {"harness/meter.py", "harness/train.py"} <= set(record["code"])
    probe = json.loads((out / "sst2__linear_probe__seed0.json").read_text())
    assert "methods/linear_probe.py" in probe["code"]
    capsys.readouterr()

    assert run() == 0
    assert capsys.readouterr().out.count("already done") == 2, "same code, same settings: both kept"

    plugin.write_text(PLUGIN.replace("the head alone", "the task head alone"))  # any edit of the method's file
    assert run() == 0
    log = capsys.readouterr().out
    assert log.count("already done") == 1
    line = next(line for line in log.splitlines() if "rerunning" in line)
    assert "plugin" in line and f"code changed since its record ({plugin})" in line
