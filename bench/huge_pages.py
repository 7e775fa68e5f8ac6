"""Decode with the weights on 2 MB pages against 4 KB pages (``phi3v/huge_pages.py``).

On a real-size set, one process per run, the two settings alternated (``PHI3V_HUGE_PAGES`` unset
and ``0``): ``Pipeline.load`` in ``--precision`` (exact by default: decode runs on the int4
decoder in either precision), a prompt of ``--positions`` random embeddings into a KV cache,
then ``--steps`` greedy int4 decode steps, each timed; per process the median step (the first
left out), the load time (the move to 2 MB pages included), what the move did, and the bytes of
the process on huge pages at the end (``AnonHugePages`` of /proc/self/smaps_rollup).

    python bench/huge_pages.py --model /tmp/scale [--runs 4] [--positions 256] [--steps 64]
        [--precision exact] [--name huge_pages]

Writes ``bench/results/huge_pages.{json,md}`` (``--name``: another stem, for another CPU).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import blocks
import tables
from provenance import save
from workers import alternate, parse_or_serve, stamp

# setting -> PHI3V_HUGE_PAGES (None: unset, the product's default)
SETTINGS = {"2 MB pages (the default)": None, "4 KB pages (PHI3V_HUGE_PAGES=0)": "0"}
FLAGS = {"avx2", "avx512f", "avx512_vnni", "amx_tile"}


def worker(model: str, pages: str | None, precision: str, positions: int, steps: int) -> dict:
    import numpy as np

    if pages is None:
        os.environ.pop("PHI3V_HUGE_PAGES", None)
    else:
        os.environ["PHI3V_HUGE_PAGES"] = pages
    from phi3v import Pipeline

    started = time.perf_counter()
    pipe = Pipeline.load(model, precision=precision)
    load_s = time.perf_counter() - started
    sessions, config = pipe.sessions, pipe.config
    rng = np.random.default_rng(positions)
    embeds = rng.standard_normal((1, positions, config.decoder.hidden_size), np.float32) * 0.02
    cache, logits, prefill_s = blocks.prefill(pipe, sessions.decoder, embeds, steps + 1)
    token = int(np.argmax(logits[: pipe.vocab_limit]))
    step_ms = []
    for _ in range(steps):
        begun = time.perf_counter()
        logits = cache.run(sessions.decoder, sessions.embed_token(token))
        step_ms.append(1000 * (time.perf_counter() - begun))
        token = int(np.argmax(logits[: pipe.vocab_limit]))
    return {
        "load_s": load_s,
        "moved": sessions.huge_pages.describe(),
        "move_s": sessions.huge_pages.seconds,
        "prefill_s": prefill_s,
        "step_ms": step_ms,
        "median_ms": statistics.median(step_ms[1:]),
        "huge_mib": huge_kib() / 1024,
    }


def huge_kib() -> int:
    """This process's anonymous memory on huge pages, in KiB."""
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--positions", type=int, default=256)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--precision", default="exact", choices=("exact", "fast"))
    parser.add_argument("--name", default="huge_pages")
    if (args := parse_or_serve(parser, worker)) is None:
        return
    if args.model is None:
        parser.error("--model is required")
    load_before = os.getloadavg()
    shared = {
        "model": str(args.model.resolve()),
        "precision": args.precision,
        "positions": args.positions,
        "steps": args.steps,
    }
    specs = {name: {**shared, "pages": pages} for name, pages in SETTINGS.items()}
    runs = alternate(__file__, specs, args.runs)
    command = (
        f"python bench/huge_pages.py --model {args.model} --runs {args.runs} --positions "
        f"{args.positions} --steps {args.steps} --precision {args.precision}"
    )
    result = {**stamp(command, FLAGS, load_before), **shared, "runs": runs}
    save(args.name, result, report(result))
    print(report(result))


def report(result: dict) -> str:
    runs = result["runs"]
    rows = []
    for name, found in runs.items():
        rows.append(
            [
                name,
                ", ".join(f"{run['median_ms']:.0f}" for run in found),
                f"{statistics.median(run['median_ms'] for run in found):.1f}",
                f"{statistics.median(run['load_s'] for run in found):.1f}",
                f"{statistics.median(run['huge_mib'] for run in found) / 1024:.2f}",
                found[0]["moved"],
            ]
        )
    header = [
        "weights on",
        "decode ms per step, per process in run order",
        "median",
        "load s (median)",
        "GB on huge pages at the end",
        "what the move did (first process)",
    ]
    huge, small = (statistics.median(run["median_ms"] for run in found) for found in runs.values())
    return f"""# Decode with the weights on 2 MB pages and on 4 KB pages

{result["date"]}; phi3v {result["commit"]}; {result["cpu"]} (`{", ".join(result["flags"])}`);
`{result["command"]}`; {len(next(iter(runs.values())))} processes per setting, alternated; load
average {result["load_before"][0]:.2f} -> {result["load_after"][0]:.2f}.

Per process: `Pipeline.load` ({result["precision"]}), {result["positions"]} positions of random
embeddings into a KV cache, then {result["steps"]} greedy int4 decode steps; the median step
without the first.

{tables._table(header, rows)}

On 2 MB pages decode ran at **{small / huge:.2f}x** the speed on 4 KB pages (median of the
processes' medians: {huge:.1f} against {small:.1f} ms per step). The numbers computed are the
same: only the pages holding them moved."""


if __name__ == "__main__":
    main()
