"""Load a module of bench/ by its path for the tests: putting bench/ on sys.path would let
its protocol.py, session.py ... shadow other imports for the rest of the test session."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def load_bench(name: str) -> ModuleType:
    """``bench/<name>.py`` as module ``bench_<name>``, registered in ``sys.modules``
    (dataclasses look their module up by name)."""
    path = Path(__file__).resolve().parent.parent / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
