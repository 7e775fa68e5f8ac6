"""Importing ``bench/`` scripts in tests: they import each other by bare name (``import paired``),
as they do when run as ``python bench/<script>.py``."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parent.parent / "bench"


@contextmanager
def bench_modules(*names: str) -> Iterator[tuple[ModuleType, ...]]:
    """The bench modules ``names``, imported with ``bench/`` on the path; afterwards the path is
    as it was and no bench module stays under a bare name (the next test imports its own)."""
    sys.path.insert(0, str(BENCH))
    try:
        yield tuple(importlib.import_module(name) for name in names)
    finally:
        sys.path.remove(str(BENCH))
        for name, module in list(sys.modules.items()):
            if Path(getattr(module, "__file__", None) or "/").parent == BENCH:
                del sys.modules[name]
