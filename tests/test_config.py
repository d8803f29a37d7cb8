"""Suite files: settings resolve in a fixed order, and a cell's identity follows its settings."""

import pytest

from harness.config import load_suite
from harness.method import registry
from tests.conftest import ROOT


def test_settings_resolve_suite_then_task_then_method(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("""
tasks:
  - {task: sst2, train: {max_steps: 7, batch_size: 8}}
  - stsb
methods:
  - {method: full, train: {batch_size: 4}}
  - {method: lora, label: lora-r4, hparams: {r: 4}}
train: {max_steps: 3, batch_size: 16}
""")
    suite = load_suite(path)
    settings = {(c.task.name, c.entry.label): (c.train.max_steps, c.train.batch_size) for c in suite.cells()}
    assert settings == {
        ("sst2", "full"): (7, 4),
        ("sst2", "lora-r4"): (7, 8),
        ("stsb", "full"): (3, 4),
        ("stsb", "lora-r4"): (3, 16),
    }
    capped = suite.cells(max_train_samples=10)
    assert all(c.train.max_train_samples == 10 for c in capped)


def test_lr_defaults_to_the_method_and_config_hash_follows_settings(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("tasks: [sst2]\nmethods: [{method: full}, {method: lora, lr: 1.0e-3}]\n")
    full, lora = load_suite(path).cells()
    assert full.entry.lr == 5e-5 and lora.entry.lr == 1e-3
    path.write_text("tasks: [sst2]\nmethods: [{method: full}, {method: lora, lr: 2.0e-3}]\n")
    full2, lora2 = load_suite(path).cells()
    assert full.config_hash() == full2.config_hash() and lora.config_hash() != lora2.config_hash()


def test_cells_carry_every_hyperparameter_so_a_changed_default_reruns(tmp_path, monkeypatch):
    path = tmp_path / "s.yaml"
    path.write_text("tasks: [sst2]\nmethods: [{method: lora, hparams: {r: 4}}]\n")
    (cell,) = load_suite(path).cells()
    lora = registry()["lora"]
    assert cell.to_dict()["method"][0]["hparams"] == {**lora.defaults, "r": 4}
    monkeypatch.setattr(lora, "defaults", {**lora.defaults, "alpha": lora.defaults["alpha"] * 2})
    (changed,) = load_suite(path).cells()
    assert changed.config_hash() != cell.config_hash()


@pytest.mark.parametrize("path", sorted((ROOT / "suites").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_suite_loads(path):
    assert load_suite(path).cells()
