"""A stack of methods is a Method: its optimizer groups keep each component's learning rates, its
declared count is what trains, and the worker builds one Method for every cell. A method that needs
the run's length gets it from the harness. A plugin is executed once per process."""

import inspect
import re
from pathlib import Path

import pytest
import torch

from harness import worker
from harness.config import load_suite
from harness.errors import UserError
from harness.method import Method, Run, Stack, registry, resolve
from tests.conftest import tiny_bert, toy_batch, toy_task

TASK = toy_task()


def stack(*names_and_hparams):
    return Stack([registry()[name](**hparams) for name, hparams in names_and_hparams])


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def check_groups_partition(model, groups):
    """Every trainable parameter in exactly one group, nothing frozen in any."""
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)), "a parameter in two groups"
    assert set(ids) == {id(p) for p in trainable(model)}


@pytest.mark.parametrize("after", ["mesa", "tokentune"])
def test_stacked_dept_keeps_both_learning_rates(after):
    method = stack(("dept", {"lowrank_lr": 1e-4}), (after, {}))
    model, declared = method.attach(tiny_bert(TASK), TASK)
    groups = method.param_groups(model, 0.3)
    assert sorted(g["lr"] for g in groups) == [1e-4, 0.3]
    check_groups_partition(model, groups)
    fast = next(g for g in groups if g["lr"] == 0.3)["params"]
    slow = {id(p) for p in next(g for g in groups if g["lr"] == 1e-4)["params"]}
    assert fast == [model.prompt]
    assert {id(model.lora_a), id(model.lora_b), id(model.model.classifier.weight)} <= slow
    assert declared == sum(p.numel() for p in trainable(model))


def test_stacked_sherl_keeps_its_late_layer_rate():
    method = stack(("sherl", {"train_late_layers": True, "late_lr_ratio": 0.1}), ("mesa", {}))
    model, _ = method.attach(tiny_bert(TASK), TASK)
    groups = method.param_groups(model, 1e-3)
    assert sorted(g["lr"] for g in groups) == pytest.approx([1e-4, 1e-3])
    check_groups_partition(model, groups)


def test_stacked_prefix_tuning_keeps_its_head_rate():
    method = stack(("prefix_tuning", {"head_lr": 5e-2}), ("mesa", {}))
    model, _ = method.attach(tiny_bert(TASK), TASK)
    groups = method.param_groups(model, 1e-2)
    assert sorted(g["lr"] for g in groups) == [1e-2, 5e-2]
    check_groups_partition(model, groups)


def test_a_one_component_stack_is_that_component():
    alone = registry()["dept"](lowrank_lr=1e-4)
    model = tiny_bert(TASK)
    expected = alone.expected_trainable_params(model, TASK)
    torch.manual_seed(0)
    single = alone.apply(model, TASK)
    own = alone.param_groups(single, 0.3)
    method = Stack([registry()["dept"](lowrank_lr=1e-4)])
    torch.manual_seed(0)
    model, declared = method.attach(tiny_bert(TASK), TASK)
    assert declared == expected
    assert [
        (g["lr"], [n for p in g["params"] for n, q in model.named_parameters() if q is p])
        for g in method.param_groups(model, 0.3)
    ] == [(g["lr"], [n for p in g["params"] for n, q in single.named_parameters() if q is p]) for g in own]


LORA = registry()["lora"]().expected_trainable_params(tiny_bert(TASK), TASK)  # from LoRA's shapes formula


@pytest.mark.parametrize(
    "components",
    [
        [("lora", {}), ("mesa", {})],
        [("lora", {}), ("tokentune", {})],
        [("lora", {}), ("tokentune", {}), ("mesa", {})],
        [("lora", {}), ("wta_crs", {"skip": []})],
    ],
    ids=["lora+mesa", "lora+tokentune", "lora+tokentune+mesa", "lora+wta_crs"],
)
def test_a_stack_declares_what_trains(components):
    method = stack(*components)
    assert method.expected_trainable_params(tiny_bert(TASK), TASK) == LORA, "declared before apply, on copies"
    model, declared = method.attach(tiny_bert(TASK), TASK)
    assert declared == LORA == sum(p.numel() for p in trainable(model))
    assert method.activations_depend_on_values == any(registry()[n].activations_depend_on_values for n, _ in components)
    groups = method.param_groups(model, 3e-3)
    check_groups_partition(model, groups)
    batch = toy_batch(TASK)
    optimizer = torch.optim.AdamW(groups)
    model.train()
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.95 * losses[0]


def test_the_worker_builds_one_method_whatever_the_count():
    source = inspect.getsource(worker)
    assert "len(methods)" not in source and 'len(cell["method"])' not in source


def suite_cell(tiny_suite, methods: str, train: str):
    suite = load_suite(tiny_suite(f"tasks: [sst2]\nmethods:\n{methods}\ntrain: {train}\n"))
    return suite.cells()[0]


def test_the_worker_keeps_a_stacks_groups_and_declares_its_count(tiny_suite):
    cell = suite_cell(
        tiny_suite,
        "  - {stack: [{method: dept, hparams: {lowrank_lr: 1.0e-4, max_length: 64}}, {method: mesa}], lr: 0.3}",
        "{max_steps: 2, max_seq_length: 32}",
    )
    model, declared, groups, value_dependent = worker.build(cell, total_steps=2)
    assert sorted(g["lr"] for g in groups) == [1e-4, 0.3]
    assert declared == sum(p.numel() for p in trainable(model))
    assert value_dependent is False


@pytest.mark.parametrize("hparams, expected", [("{}", 3), ("{total_step: 7}", 7)], ids=["the-run's", "given"])
def test_adalora_schedule_follows_the_cells_steps(hparams, expected, tiny_suite, data_dir, monkeypatch):
    """48 examples in batches of 16 for one epoch: 3 steps, known only from the loader."""
    cell = suite_cell(
        tiny_suite,
        f"  - {{method: adalora, hparams: {hparams}}}",
        "{epochs: 1, batch_size: 16, max_train_samples: 48, max_eval_samples: 16, max_seq_length: 32, "
        "timing_warmup_steps: 1}",
    )
    built = []
    real_build = worker.build
    monkeypatch.setattr(worker, "build", lambda *args, **kw: built.append(real_build(*args, **kw)) or built[-1])
    record = worker.run_cell(cell, data_dir, "cpu", progress=False)
    assert record["status"] == "ok", record["error"]
    assert record["train"]["steps"] == 3
    config = built[0][0].peft_config["default"]
    assert config.total_step == expected
    assert (config.tinit, config.tfinal) == (int(0.15 * expected), int(0.45 * expected))


def test_a_method_hears_the_runs_length_through_the_stack():
    method = stack(("adalora", {}), ("mesa", {}))
    method.set_run(Run(total_steps=11))
    assert [c.run for c in method.components] == [Run(11), Run(11)]
    model = method.apply(tiny_bert(TASK), TASK)
    assert model.peft_config["default"].total_step == 11


PLUGIN = """
from pathlib import Path
from methods.full_finetune import FullFineTune

with open(Path(__file__).with_suffix(".log"), "a") as log:
    log.write("executed\\n")


class Counted(FullFineTune):
    name = "test_counted_plugin"
"""


def test_a_plugin_file_is_executed_once(tmp_path, monkeypatch):
    plugin = tmp_path / "counted.py"
    plugin.write_text(PLUGIN)
    first = resolve(f"{plugin}:Counted", "here")
    assert resolve(f"{plugin}:Counted", "there") is first
    monkeypatch.chdir(tmp_path)
    assert resolve("counted.py", "elsewhere") is first, "the same file, spelt another way"
    assert plugin.with_suffix(".log").read_text() == "executed\n"


def test_one_name_one_class():
    with pytest.raises(TypeError, match="method name 'lora' is taken"):
        type("Impostor", (Method,), {"name": "lora", "family": "PETL", "__module__": "methods.impostor"})
    assert registry()["lora"].__module__ == "methods.lora"


def test_a_plugin_may_not_take_a_registered_name(tmp_path):
    plugin = tmp_path / "shadow.py"
    plugin.write_text(PLUGIN.replace("test_counted_plugin", "lora"))
    with pytest.raises(UserError, match="'lora' is taken by methods.lora"):
        resolve(str(plugin), "suite.methods[0].method")


def test_the_harness_names_no_method():
    """The engine knows the Method interface only: no module of harness/ imports a method or spells a
    registered method's name; the registry finds methods by importing the `methods` package's modules."""
    names = set(registry())
    for path in sorted((Path(__file__).parent.parent / "harness").rglob("*.py")):
        source = path.read_text()
        spelled = {m.group(1) for m in re.finditer(r"""["']([A-Za-z0-9_]+)["']""", source)} & names
        assert not spelled, f"{path.name} names methods {sorted(spelled)}"
        imports = re.findall(r"^\s*(?:from|import) (methods\S*)", source, re.M)
        assert imports in ([], ["methods"]) and (not imports or path.name == "method.py"), (path.name, imports)
