"""The C programs the benchmarks build with gcc, each into a scratch folder of its own:
``noamx.c`` (runs a command with AMX refused, what a VNNI-only CPU runs) and ``peak.c`` (each
arithmetic instruction's peak, for ``floor.py``)."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path


def build(source: str, target: str, *options: str) -> Path:
    """``bench/<source>`` compiled by ``gcc -O2`` with ``options`` into a scratch folder, as
    ``target``."""
    built = Path(tempfile.mkdtemp(prefix="phi3v-bench-")) / target
    source_path = Path(__file__).with_name(source)
    subprocess.run(["gcc", "-O2", *options, "-o", str(built), str(source_path)], check=True)
    return built


def noamx_launcher() -> str:
    """The launcher that runs its arguments as a command with AMX refused (``noamx.c``)."""
    return str(build("noamx.c", "noamx"))
