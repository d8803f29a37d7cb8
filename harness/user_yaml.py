"""Reading a user's YAML file: plain data through a safe loader, every failure one UserError naming the file.

Kept apart from the suite schema (config.py), which imports torch and the method
registry: `harness compare --suite` needs a suite's `gate:` mapping and nothing else.
"""

from pathlib import Path

import yaml

from harness.errors import UserError


def yaml_file(path: Path, what: str, example: str):
    """A user's YAML file as plain data; every way it cannot be read is a UserError naming it."""
    if not path.exists():
        raise UserError(str(path), f"{what} file not found", f"give the path of a {what} YAML, e.g. {example}")
    if path.is_dir():
        raise UserError(str(path), f"is a folder, not a {what} file", f"give the path of a {what} YAML, e.g. {example}")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(
            str(path),
            f"not a UTF-8 text file (byte {exc.object[exc.start : exc.start + 1]!r} at offset {exc.start})",
            f"save the {what} as UTF-8 YAML",
        ) from None
    except PermissionError:
        raise UserError(str(path), "cannot be read: permission denied", "make it readable (e.g. chmod a+r)") from None
    except OSError as exc:
        raise UserError(
            str(path), f"cannot be read: {exc.strerror or exc}", f"give the path of a {what} YAML, e.g. {example}"
        ) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        if (
            isinstance(exc, yaml.constructor.ConstructorError) and "tag" in problem
        ):  # e.g. !!python/object: plain data only
            raise UserError(
                f"{path}{at}", f"YAML tag not allowed: {problem}", f"{what}s are plain data; remove the tag"
            ) from None
        raise UserError(f"{path}{at}", f"YAML syntax error: {problem}", "fix the YAML at that line") from None


def suite_mapping(path: Path) -> dict:
    """A suite file as a mapping, unvalidated beyond being one."""
    raw = yaml_file(path, "suite", "suites/smoke.yaml")
    if raw is None:
        raise UserError(str(path), "the suite file is empty (no YAML in it)", "start from suites/smoke.yaml")
    if not isinstance(raw, dict):
        raise UserError(str(path), "a suite must be a YAML mapping", "start from suites/smoke.yaml")
    return raw
