"""The docs stay true to the code and to themselves: cheap checks, no network.

- The table of methods in docs/methods.md is generated from the registry, never
  edited by hand. Regenerate it with `python -m harness list methods --markdown`
  and paste the output between the markers in docs/methods.md; a missing marker
  is a failure, not a skip.
- README.md stays a short entry point (at most 250 lines); findings and
  references live in docs/.
- Every relative Markdown link in README.md and docs/*.md points to a file that
  exists, and a #fragment into a Markdown file to one of its headings.
"""

import re
from pathlib import Path

from harness.cli import main

ROOT = Path(__file__).resolve().parent.parent
METHODS_DOC = ROOT / "docs" / "methods.md"
START, END = "<!-- methods-table:start -->", "<!-- methods-table:end -->"
README_MAX_LINES = 250


def generated(capsys) -> str:
    assert main(["list", "methods", "--markdown"]) == 0
    return capsys.readouterr().out.strip()


def table_in(path: Path) -> str:
    text = path.read_text() if path.is_file() else ""
    assert START in text and END in text, (
        f"{path.relative_to(ROOT)} has no methods table: put the output of "
        f"`python -m harness list methods --markdown` between {START} and {END}"
    )
    return text.split(START, 1)[1].split(END, 1)[0].strip()


def test_methods_table_is_generated_from_the_registry(capsys):
    assert table_in(METHODS_DOC) == generated(capsys), (
        "docs/methods.md's methods table is stale: regenerate it with `python -m harness list methods --markdown`"
    )


def test_markdown_listing_is_only_for_methods(capsys):
    assert main(["list", "tasks", "--markdown"]) == 2
    assert "--markdown" in capsys.readouterr().err


def test_readme_is_short():
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines (at most {README_MAX_LINES}): "
        "move reference text or findings into docs/ and link to it"
    )


# ---------------------------------------------------------------- links

FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def prose(text: str) -> str:
    """The Markdown without code blocks and inline code, where a link is not a link."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def anchors(path: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation other than '-' and '_' dropped, spaces to '-'."""
    ids = set()
    for title in HEADING.findall(FENCE.sub("", path.read_text())):  # a heading's inline code keeps its text
        slug = re.sub(r"[^\w\- ]", "", title.replace("`", "").strip().lower()).replace(" ", "-")
        ids.add(slug)
    return ids


def relative_links(path: Path) -> list[str]:
    return [
        target for target in LINK.findall(prose(path.read_text())) if not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I)
    ]  # http:, https:, mailto: ... are not checked


def test_docs_exist():
    assert (ROOT / "docs").is_dir() and len(documents()) > 1, (
        "docs/ holds the reference and findings README.md links to"
    )


def test_relative_links_point_to_files_that_exist():
    broken = []
    for doc in documents():
        for target in relative_links(doc):
            file_part, _, fragment = target.partition("#")
            resolved = (doc.parent / file_part).resolve() if file_part else doc
            where = f"{doc.relative_to(ROOT)}: ({target})"
            if not resolved.exists():
                broken.append(f"{where}: no such file")
            elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
                broken.append(f"{where}: no heading '#{fragment}' in {resolved.relative_to(ROOT)}")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_link_checker_sees_links():
    """The checker above would pass on nothing: make sure it finds the README's links to docs/."""
    targets = relative_links(ROOT / "README.md")
    assert any(t.startswith("docs/") for t in targets), targets
