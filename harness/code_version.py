"""Which source code a cell's result depends on, file by file, so that resume can tell stale records.

A cell's result follows from its settings (the config hash) and from code: the
harness's training and measuring path (everything `harness.worker` imports from
this project) and its methods' modules with the project modules they import,
plugin files included. `cell_code` hashes each such file; a record keeps the
map, and a rerun of the suite reruns a finished cell whose files changed,
naming them.
"""

import hashlib
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROJECT_PACKAGES = ("harness", "methods")


def _ours(module: types.ModuleType, plugin_dirs: set[Path]) -> bool:
    """A module of this project, or one beside a plugin file; never a library's."""
    file = getattr(module, "__file__", None)
    if not file:
        return False
    if module.__name__.split(".")[0] in PROJECT_PACKAGES:
        return True
    return Path(file).resolve().parent in plugin_dirs and "site-packages" not in Path(file).parts


def _imports(module: types.ModuleType):
    """The modules `module` imported, or imported names from."""
    for value in vars(module).values():
        if isinstance(value, types.ModuleType):
            yield value
        else:
            owner = sys.modules.get(getattr(value, "__module__", None) or "")
            if owner is not None:
                yield owner


def _label(path: Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:  # a plugin outside the project
        return str(path)


def cell_code(method_classes) -> dict[str, str]:
    """{file: sha256 prefix} of the worker's and the methods' source files, transitively."""
    import harness.worker  # the training and measuring path, whatever the method

    roots = [harness.worker, *(sys.modules[cls.__module__] for cls in method_classes)]
    plugin_dirs = {Path(m.__file__).resolve().parent for m in roots[1:] if not _ours(m, set())}
    seen, stack = {}, list(roots)
    while stack:
        module = stack.pop()
        if module.__name__ in seen or not _ours(module, plugin_dirs):
            continue
        seen[module.__name__] = Path(module.__file__).resolve()
        stack.extend(_imports(module))
    return {_label(path): hashlib.sha256(path.read_bytes()).hexdigest()[:16] for path in sorted(set(seen.values()))}


def changed_files(old: dict | None, new: dict) -> list[str]:
    """Files whose hash differs between a record's code and the current code (added or gone included)."""
    old = old or {}
    return sorted(name for name in old.keys() | new.keys() if old.get(name) != new.get(name))
