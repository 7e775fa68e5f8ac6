"""One measurement per process: the benchmarks' scripts re-run themselves with ``--worker SPEC``.

A fresh process per run makes load time and peak RSS (``ru_maxrss``) per run, and keeps one
run's caches and allocator state out of the next.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

MARK = "RESULT "


def run_worker(script: str | Path, spec: dict, *args: str) -> dict:
    """Run ``script --worker SPEC`` (plus ``args``) in a new Python; return what it reported."""
    out = subprocess.run(
        [sys.executable, str(script), *args, "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out.split(MARK, 1)[1])


def report_result(result: dict) -> None:
    """In the worker: hand ``result`` back to :func:`run_worker`."""
    print(MARK + json.dumps(result), flush=True)
