"""Decode speed after a long prompt, exact vs fast, one process per run, alternated.

Both precisions decode on the same int4 decoder; fast only holds more in memory (the
integer-GEMM copies). This checks that decode is not slower for it, at the KV length of a photo's
prompt. Random token ids stand for the prompt (decode time depends on lengths, not values).

    python bench/decode_check.py --model /tmp/scale [--runs 3] [--length 1935] [--name NAME]

Writes ``bench/results/decode_check.{json,md}`` (``--name``: another stem, for another CPU).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
from pathlib import Path

from provenance import commit, save
from workers import parse_or_serve, run_worker

from phi3v import machine

NEW_TOKENS = 33  # 32 decode steps after the first token
COMPARED = ("exact", "fast")


def worker(model: str, precision: str, length: int) -> dict:
    import numpy as np

    from phi3v import Pipeline

    pipe = Pipeline.load(model, precision=precision)
    ids = np.random.default_rng(length).integers(1000, 30000, length).tolist()
    result = pipe.generate(input_ids=ids, max_new_tokens=NEW_TOKENS)
    return {
        "precision": precision,
        "prefill_s": result.timings.prefill,
        "decode_ms": 1000 / result.timings.decode_tokens_per_second,
        "tokens": len(result.token_ids),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--length", type=int, default=1935)
    parser.add_argument(
        "--name", default="decode_check", help="results file stem (default: %(default)s)"
    )
    if (args := parse_or_serve(parser, worker)) is None:
        return
    started = os.getloadavg()
    runs = []
    for _ in range(args.runs):
        for precision in COMPARED:
            spec = {"model": str(args.model), "precision": precision, "length": args.length}
            runs.append(run_worker(__file__, spec, "--model", str(args.model)))
            print(runs[-1], flush=True)
    medians = {
        p: statistics.median(r["decode_ms"] for r in runs if r["precision"] == p) for p in COMPARED
    }
    report = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "commit": commit(),
        "cpu": machine.describe_cpu(),
        "model": str(args.model),
        "length": args.length,
        "loadavg": [started, os.getloadavg()],
        "runs": runs,
        "median_decode_ms": medians,
    }
    lines = [
        f"# Decode after a {args.length}-token prompt: exact vs fast",
        "",
        f"{report['date']}; phi3v {report['commit']}; {report['cpu']}; "
        f"`python bench/decode_check.py --model {args.model}`; "
        f"{args.runs} alternated processes per precision, {NEW_TOKENS - 1} decode steps; "
        f"load average {started[0]:.2f} -> {os.getloadavg()[0]:.2f}.",
        "",
        "| precision | decode ms/token, each run | median |",
        "|---|---|---|",
    ]
    for p in COMPARED:
        each = ", ".join(f"{r['decode_ms']:.1f}" for r in runs if r["precision"] == p)
        lines.append(f"| {p} | {each} | {medians[p]:.1f} |")
    lines += ["", f"fast / exact: **{medians['fast'] / medians['exact']:.2f}**"]
    save(args.name, report, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
