"""Import the module a suite names for a plugin: `package.module` or `path/to/file.py`.

One job: turn the part of a plugin reference before the ":" into a module, with
any failure as one UserError line (exit 2). A file is executed once per process:
a second reference to it gets the module already loaded. What to take from the
module (a Method class, a metric function) is the caller's business.
"""

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from harness.errors import UserError


def import_target(target: str, where: str) -> ModuleType:
    """The module named by `target`: a dotted module name, or a Python file relative to the working directory."""
    try:
        if not target.endswith(".py"):
            return importlib.import_module(target)
        path = Path(target).resolve()
        if not path.is_file():
            problem = "is a folder, not a Python file" if path.is_dir() else "does not exist"
            raise UserError(
                where, f"plugin file '{target}' {problem}", "give a path relative to where you run the harness"
            )
        name = f"harness_plugin_{path.stem}"
        loaded = sys.modules.get(name)
        if loaded is not None and getattr(loaded, "__file__", None) == str(path):
            return loaded
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[spec.name]  # a broken file is not left behind as if loaded
            raise
        return module
    except UserError:
        raise
    except Exception as exc:  # the plugin's own import error, shown in one line
        raise UserError(
            where,
            f"cannot import plugin '{target}': {type(exc).__name__}: {exc}",
            "check the module name and that it imports",
        ) from None
