"""``import_path()``: import a test's helper module by its file, as pytest's importlib mode wants.

In importlib mode no test folder is on ``sys.path``, so a plugin's tests cannot ``import
fake_upstream`` from the file next to them. ``import_path(Path(__file__).with_name("fake.py"))``
imports it once and gives every later caller the same module (one set of classes, so
``isinstance`` holds across test files).
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

__all__ = ["import_path"]


def import_path(path: str | Path) -> ModuleType:
    """The module in the Python file at ``path``, imported on the first call, cached after."""
    path = Path(path).resolve()
    name = "_aioproxy_imported_" + re.sub(r"\W", "_", str(path))
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"not a Python file: {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # before it runs: a dataclass or a cycle looks itself up
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return module
