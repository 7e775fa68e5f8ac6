"""One measurement per process: the benchmarks' scripts re-run themselves with ``--worker SPEC``.

A fresh process per run makes load time and peak RSS (``ru_maxrss``) per run, and keeps one
run's caches and allocator state out of the next.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import native

MARK = "RESULT "


def run_worker(script: str | Path, spec: dict, *args: str, without_amx: bool = False) -> dict:
    """Run ``script --worker SPEC`` (plus ``args``) in a new Python; return what it reported.
    ``without_amx``: in a process that Linux refuses the AMX tile state (``bench/noamx.c``),
    which then runs what a CPU without AMX runs."""
    launcher = [native.noamx_launcher()] if without_amx else []
    out = subprocess.run(
        [*launcher, sys.executable, str(script), *args, "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out.split(MARK, 1)[1])


def report_result(result: dict) -> None:
    """In the worker: hand ``result`` back to :func:`run_worker`."""
    print(MARK + json.dumps(result), flush=True)


def parse_or_serve(
    parser: argparse.ArgumentParser, worker: Callable[..., dict]
) -> argparse.Namespace | None:
    """Parse the command line, with the hidden ``--worker SPEC`` that :func:`run_worker` passes.
    In a worker process: run ``worker(**spec)``, report its result and return None; else the
    arguments."""
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        report_result(worker(**json.loads(args.worker)))
        return None
    return args


def fast_copies_of(parser: argparse.ArgumentParser, model: Path | None) -> Path:
    """The ``--model`` folder, resolved, with its fast copies made (once, before anything is
    timed); a usage error when the option is missing."""
    if model is None:
        parser.error("--model is required")
    from phi3v import convert, load_config

    convert.fast_models(load_config(model))
    return model.resolve()


def alternate(
    script: str | Path, specs: dict[str, dict], runs: int, *args: str
) -> dict[str, list[dict]]:
    """``runs`` rounds of one worker process per spec, the specs in turn within each round (so a
    drift of the machine reaches them alike); each spec's results in run order, by name.
    ``args``: the script's own arguments that its parser requires in a worker too."""
    results: dict[str, list[dict]] = {name: [] for name in specs}
    for _ in range(runs):
        for name, spec in specs.items():
            results[name].append(run_worker(script, spec, *args))
            print(name, results[name][-1], flush=True)
    return results


def stamp(command: str, flags: set[str], load_before: tuple[float, ...]) -> dict:
    """A results file's header: when, at which commit, on which CPU (its ``flags`` of
    interest), by which command, and the load average before and now."""
    from provenance import commit

    from phi3v import machine

    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit(),
        "cpu": machine.describe_cpu(),
        "flags": sorted(machine.cpu_flags() & flags),
        "command": command,
        "load_before": load_before,
        "load_after": os.getloadavg(),
    }
