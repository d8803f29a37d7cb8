"""The README's table of methods is generated from the registry, never edited by hand.

Regenerate it with `python -m harness list methods --markdown` and paste the
output between the markers in README.md; a missing marker is a failure, not a
skip.
"""

from pathlib import Path

from harness.cli import main

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- methods-table:start -->", "<!-- methods-table:end -->"


def generated(capsys) -> str:
    assert main(["list", "methods", "--markdown"]) == 0
    return capsys.readouterr().out.strip()


def table_in(path: Path) -> str:
    text = path.read_text() if path.is_file() else ""
    assert START in text and END in text, (
        f"{path.relative_to(ROOT)} has no methods table: put the output of "
        f"`python -m harness list methods --markdown` between {START} and {END}")
    return text.split(START, 1)[1].split(END, 1)[0].strip()


def test_methods_table_is_generated_from_the_registry(capsys):
    assert table_in(ROOT / "README.md") == generated(capsys), (
        "README.md's methods table is stale: regenerate it with `python -m harness list methods --markdown`")


def test_markdown_listing_is_only_for_methods(capsys):
    assert main(["list", "tasks", "--markdown"]) == 2
    assert "--markdown" in capsys.readouterr().err
