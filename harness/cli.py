"""`python -m harness ...`: run, plan, validate, list, report, compare, export.

User mistakes come out as one line on stderr and exit status 2.
"""

import argparse
import dataclasses
import sys
from pathlib import Path

from harness.errors import UserError
from harness.formatting import markdown_cell


def _cmd_run(args) -> int:
    from harness import config, executors, runner, trackers

    suite = config.load_suite(args.suite)
    out_dir = Path(args.out) if args.out else Path("results") / suite.name
    executor = executors.Local(args.device, args.jobs)
    track = trackers.make(args.track or [], suite.name, out_dir)
    records = runner.run_suite(
        suite,
        out_dir,
        args.data_dir,
        args.device,
        args.fresh,
        args.max_train_samples,
        executor=executor,
        trackers=track,
    )
    tally, finished = _tally(records)
    print(f"{suite.name}: {len(records)} cells ({tally}); results in {out_dir}")
    if not args.no_report:
        _report_after_run(out_dir, Path("reports") / suite.name)
    return 0 if finished else 1


def _cmd_plan(args) -> int:
    from harness import config, executors, runner

    suite = config.load_suite(args.suite)
    name = f"{suite.name}-plan" + (f"-{Path(args.backbone).name}" if args.backbone else "")
    if args.backbone:  # a plan reads no weights: the config alone, shipped or from a folder or the hub
        suite = dataclasses.replace(
            suite, backbone=dataclasses.replace(suite.backbone, ref=args.backbone, weights="random")
        )
    out_dir = Path(args.out) if args.out else Path("results") / name
    overrides = {"padding": "fill", "max_seq_length": args.length} if args.length else None
    records = runner.run_suite(
        suite,
        out_dir,
        args.data_dir,
        fresh=True,
        planning={"budgets": args.budget or []},
        overrides=overrides,
        executor=executors.Local("cpu", args.jobs),
    )
    tally, finished = _tally(records)
    print(f"{suite.name}: {len(records)} cells planned ({tally}); plans in {out_dir}")
    if not args.no_report:
        _report_after_run(out_dir, Path("reports") / name)
    return 0 if finished else 1


def _tally(records: list[dict]) -> tuple[str, bool]:
    """('3 ok, 1 failed', whether every cell ended well). An unsupported cell is the configuration's answer,
    known before training (validate lists it): not a failure."""
    counts = {}
    for r in records:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    tally = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    return tally, counts.get("ok", 0) + counts.get("unsupported", 0) == len(records)


def _report_after_run(results_dir: Path, out_dir: Path) -> None:
    """The report is a view of the results: if it fails, say so, keep the results and the run's exit status."""
    try:
        from harness import report

        path = report.write_report(results_dir, out_dir)
        print(f"report: {path} (and {path.with_name(report.MARKDOWN_NAME).name})")
    except Exception as exc:  # noqa: BLE001 (any failure of the view must not fail the run)
        print(
            f"warning: the report failed ({type(exc).__name__}: {exc}); results are kept in {results_dir}; "
            f"retry with `python -m harness report {results_dir}`",
            file=sys.stderr,
        )


def _cmd_report(args) -> int:
    from harness import report

    results_dir = Path(args.results_dir)
    if not results_dir.is_dir():
        raise UserError(
            str(results_dir), "results folder not found", "give the folder `harness run` wrote, e.g. results/smoke"
        )
    path = report.write_report(results_dir, Path(args.out) if args.out else report.default_out_dir(results_dir))
    print(f"report: {path} (and {path.with_name(report.MARKDOWN_NAME).name}, figures as PNG and SVG beside them)")
    return 0


def _cmd_validate(args) -> int:
    from harness import backbone, config, runner

    suite = config.load_suite(args.suite)
    runner.preflight(suite, args.data_dir)
    cells = suite.cells()
    grid = f"{len(suite.tasks)} tasks x {len(suite.methods)} methods x {len(suite.seeds)} seeds"
    print(f"{args.suite}: ok ({grid} = {len(cells)} cells)")
    unsupported = runner.unsupported_cells(suite, cells)
    if unsupported:
        print(f"{len(unsupported)} cells unsupported on {backbone.describe(suite.backbone)} (run records them so):")
        pairs = {(cell.entry.label, unsupported[cell.key]): None for cell in cells if cell.key in unsupported}
        for label, reason in pairs:
            print(f"  {label}: {reason}")
    return 0


def _cmd_list(args) -> int:
    if args.markdown and args.what != "methods":
        raise UserError(
            "--markdown", f"only `list methods` has a Markdown table, not `list {args.what}`", "drop --markdown"
        )
    if args.what == "methods":
        from harness.method import registry

        if args.markdown:
            print(_methods_table(registry()))
            return 0
        for name, cls in registry().items():
            print(f"{name:<20} {cls.family:<9} {cls.description}")
            if args.verbose:
                print(f"{'':<30} paper: {cls.paper or '-'}; defaults: {cls.defaults or '{}'}")
    else:
        from harness.tasks import BUILTIN_TASKS

        for name, task in BUILTIN_TASKS.items():
            print(f"{name:<8} {task.type:<14} {task.primary_metric:<22} {task.description}")
    return 0


def _cmd_compare(args) -> int:
    from harness import compare, gate

    suite_gate = gate.from_suite(args.suite) if args.suite else {}  # the gate: mapping alone
    settings = gate.resolve(
        suite_gate,
        {
            "memory_tolerance": args.memory_tolerance,
            "metric_tolerance": args.metric_tolerance,
            "time_tolerance": args.time_tolerance,
        },
    )
    result = compare.compare(args.baseline, args.current, settings)
    print(compare.render_markdown(result) if args.format == "markdown" else compare.render_text(result))
    return 1 if result.failed else 0


def _cmd_export(args) -> int:
    from harness import compare

    count = compare.export(args.results, args.file)
    print(f"{count} records from {args.results} written to {args.file}")
    return 0


def _methods_table(methods: dict) -> str:
    """The README's table of methods, generated from the registry (name, family, paper, what is trained) and, with
    their default hyperparameters, the architecture families of harness.families each refuses before training."""
    from harness.families import unsupported

    def cell(text: str) -> str:
        return markdown_cell(text or "-")

    rows = ["| method | family | paper | what is trained | refuses |", "| --- | --- | --- | --- | --- |"]
    rows += [
        f"| `{name}` | {cls.family} | {cell(cls.paper)} | {cell(cls.trains)} | {cell(', '.join(unsupported(cls())))} |"
        for name, cls in methods.items()
    ]
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m harness", description="Benchmark PETL and METL methods on the same work."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run",
        help="train and evaluate every cell of a suite",
        description="Train and evaluate every cell (task x method x seed) of a suite; "
        "each cell in a fresh process, one JSON record each.",
    )
    run.add_argument("suite", help="suite YAML file, e.g. suites/glue_small.yaml")
    run.add_argument("--out", help="results directory (default: results/<suite name>)")
    run.add_argument(
        "--data-dir", help="local data folder (default: $HARNESS_DATA_DIR; unset means the Hugging Face hub)"
    )
    run.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="auto", help="where to train (default: cuda if available)"
    )
    run.add_argument("--max-train-samples", type=_positive_int, help="cap every task's train set (overrides the suite)")
    run.add_argument("--fresh", action="store_true", help="rerun cells that already have a result")
    run.add_argument(
        "--jobs",
        type=_positive_int,
        default=1,
        help="cells at once on this machine: each on its own GPU, or an equal share of the CPU cores (default: 1)",
    )
    run.add_argument(
        "--track",
        action="append",
        choices=["mlflow", "tensorboard"],
        help="also log each cell as a run of this tracker (repeatable; the extra 'track' installs both)",
    )
    run.add_argument(
        "--no-report", action="store_true", help="do not write the report (reports/<suite name>) at the end"
    )
    run.set_defaults(func=_cmd_run)

    planner = sub.add_parser(
        "plan",
        help="exact memory and FLOPs of every cell, from fake tensors: no weights, no device",
        description="Step each cell's first training batches on fake tensors (harness.plan): frozen, trainable, "
        "gradient, optimizer-state and saved-activation bytes, the modelled peak and the FLOPs of a step, as "
        "a run of the cell records them; with --budget, the largest batch that fits. One record per cell.",
    )
    planner.add_argument("suite", help="suite YAML file, e.g. suites/llm_memory.yaml")
    planner.add_argument("--out", help="plans directory (default: results/<suite name>-plan)")
    planner.add_argument("--data-dir", help="local data folder (default: $HARNESS_DATA_DIR), for the token lengths")
    planner.add_argument(
        "--budget",
        action="append",
        type=_size,
        metavar="SIZE",
        help="memory budget, e.g. 24GiB (repeatable): does each cell fit, and the largest batch that does",
    )
    planner.add_argument(
        "--length",
        type=_positive_int,
        metavar="TOKENS",
        help="plan every sequence at this many real tokens instead of the task's own lengths",
    )
    planner.add_argument(
        "--backbone",
        metavar="MODEL",
        help="plan the suite on another model: a shipped config (e.g. llama-3.1-8b), a folder or a hub id",
    )
    planner.add_argument(
        "--jobs", type=_positive_int, default=1, help="cells planned at once, each on an equal share of the CPU cores"
    )
    planner.add_argument("--no-report", action="store_true", help="do not write the report (reports/<suite>-plan)")
    planner.set_defaults(func=_cmd_plan)

    report = sub.add_parser(
        "report",
        help="write the HTML and Markdown report of a results folder",
        description="Summarize a results folder into report.html (self-contained), report.md and figures (PNG, SVG).",
    )
    report.add_argument("results_dir", help="folder of result records, e.g. results/glue_small")
    report.add_argument("--out", help="where to write the report (default: reports/<suite name>)")
    report.set_defaults(func=_cmd_report)

    validate = sub.add_parser(
        "validate",
        help="check a suite (config, methods, data) without training",
        description="Check a suite's YAML, methods, hyperparameters and data without training.",
    )
    validate.add_argument("suite")
    validate.add_argument("--data-dir", help="local data folder (default: $HARNESS_DATA_DIR)")
    validate.set_defaults(func=_cmd_validate)

    listing = sub.add_parser(
        "list", help="what the registries hold", description="List registered methods or built-in tasks."
    )
    listing.add_argument("what", choices=["methods", "tasks"])
    listing.add_argument("-v", "--verbose", action="store_true", help="with papers and default hyperparameters")
    listing.add_argument(
        "--markdown",
        action="store_true",
        help="methods as a Markdown table (name, family, paper, what is trained), for the README",
    )
    listing.set_defaults(func=_cmd_list)

    comp = sub.add_parser(
        "compare",
        help="gate a run against a baseline: exit 1 if anything regressed",
        description="Match cells by task, method label and seed; judge memory, metric and time against "
        "tolerances. Exit 0: nothing regressed; 1: a regression or a cell missing from CURRENT; "
        "2: bad input. Tolerances: flag, else the suite's gate: mapping, else the default.",
    )
    comp.add_argument(
        "baseline", help="results directory or baseline file (harness export), e.g. results/baselines/smoke"
    )
    comp.add_argument("current", help="results directory or baseline file of the run to judge")
    comp.add_argument("--memory-tolerance", metavar="PCT", help="relative, e.g. 2%% (default), 0 for exact, or off")
    comp.add_argument(
        "--metric-tolerance",
        metavar="POINTS",
        help="absolute points of the primary metric, 1 pt = 0.01 (default 1.0), or off",
    )
    comp.add_argument(
        "--time-tolerance",
        metavar="PCT",
        help="relative, on train_seconds and step_time_median_s (default 50%%), or off",
    )
    comp.add_argument("--format", choices=["text", "markdown"], default="text", help="markdown for a PR comment")
    comp.add_argument("--suite", help="suite YAML whose gate: mapping sets tolerances and gated figures")
    comp.set_defaults(func=_cmd_compare)

    exp = sub.add_parser(
        "export",
        help="write a results directory into one baseline file",
        description="Write every record of a results directory into one JSON file that compare accepts as BASELINE.",
    )
    exp.add_argument("results", help="results directory, e.g. results/smoke")
    exp.add_argument("file", help="baseline file to write, e.g. baselines/smoke.json")
    exp.set_defaults(func=_cmd_export)
    return parser


def _size(text: str) -> int:
    from harness.formatting import parse_bytes

    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if "data_dir" in vars(args):  # once, at start-up: a relative path means relative to where the command started
            from harness import data

            args.data_dir = data.resolve_data_dir(args.data_dir)
        return args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished cells are kept; run the same command again to resume", file=sys.stderr)
        return 130
