"""Where the fast prefill of a photo's prompt goes, by operator, and what the chunk size and
onnxruntime's tiled ("flash") GroupQueryAttention change.

On a real-size set, the fast decoder copy prefills 1,935 positions of random embeddings (timing
depends on shapes, not values) in chunks of ``--chunks`` positions, each chunk attending to the
ones before it through the KV cache: smaller chunks skip more of the causal upper triangle, larger
ones feed the GEMMs more rows. Each configuration runs in its own process (the flash switch,
``ORT_GQA_DISABLE_FLASH_ATTENTION``, is read by the process), alternated, median of ``--runs``;
one more run per configuration with onnxruntime's profiler gives each operator type's share.

    python bench/prefill_profile.py --model /tmp/scale [--runs 3] [--chunks 256 512 1935]

Writes ``bench/results/prefill_profile.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from workers import report_result, run_worker

RESULTS = Path(__file__).resolve().parent / "results"
POSITIONS = 1935  # a 1344x1008 photo at 16 crops and its question
FLASH_OFF = "ORT_GQA_DISABLE_FLASH_ATTENTION"


def worker(model: str, chunk: int, profile: bool) -> dict:
    import numpy as np
    import onnxruntime as ort

    from phi3v import convert, load_config
    from phi3v.kv_cache import KVCache

    config = load_config(model)
    copies = convert.fast_models(config)
    options = ort.SessionOptions()
    folder = tempfile.mkdtemp()
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(folder) / "prefill")
    session = ort.InferenceSession(str(copies.decoder), options)
    hidden = config.decoder.hidden_size
    embeds = np.random.default_rng(0).standard_normal((1, POSITIONS, hidden), np.float32) * 0.02
    cache = KVCache(config.decoder, POSITIONS, True, config.vocab_size)
    started = time.perf_counter()
    for start in range(0, POSITIONS, chunk):
        cache.run(session, np.ascontiguousarray(embeds[:, start : start + chunk]))
    seconds = time.perf_counter() - started
    cache.close()
    result = {"chunk": chunk, "seconds": seconds, "flash": FLASH_OFF not in os.environ}
    if profile:
        result["ops"] = _op_seconds(session.end_profiling())
    return result


def _op_seconds(trace: str) -> dict[str, float]:
    """Seconds per operator type in an onnxruntime profile (its node events)."""
    totals: dict[str, float] = defaultdict(float)
    for event in json.loads(Path(trace).read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            totals[event["args"]["op_name"]] += event["dur"] / 1e6
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


def measure(model: str, chunks: list[int], runs: int) -> list[dict]:
    """Alternate every (chunk, flash) configuration, ``runs`` times, then profile each once."""
    script = Path(__file__)
    configs = [(chunk, flash) for chunk in chunks for flash in (True, False)]
    times: dict[tuple, list[float]] = defaultdict(list)
    for _ in range(runs):
        for chunk, flash in configs:
            spec = {"model": model, "chunk": chunk, "profile": False}
            times[chunk, flash].append(_run(script, spec, flash)["seconds"])
    rows = []
    for chunk, flash in configs:
        profiled = _run(script, {"model": model, "chunk": chunk, "profile": True}, flash)
        ops = profiled["ops"]
        total = sum(ops.values())
        rows.append(
            {
                "chunk": chunk,
                "flash": flash,
                "seconds": statistics.median(times[chunk, flash]),
                "runs": times[chunk, flash],
                "ops": ops,
                "attention_share": ops.get("GroupQueryAttention", 0.0) / total if total else 0,
            }
        )
        print(rows[-1]["chunk"], flash, rows[-1]["seconds"], flush=True)
    return rows


def _run(script: Path, spec: dict, flash: bool) -> dict:
    saved = os.environ.pop(FLASH_OFF, None)
    if not flash:
        os.environ[FLASH_OFF] = "1"
    try:
        return run_worker(script, spec)
    finally:
        os.environ.pop(FLASH_OFF, None)
        if saved is not None:
            os.environ[FLASH_OFF] = saved


def markdown(report: dict) -> str:
    lines = [
        "# Fast prefill of a photo's prompt: chunk size, tiled attention, operator shares",
        "",
        f"{report['date']}; phi3v {report['commit']}; {report['cpu']}; `{report['command']}`; "
        f"{POSITIONS} positions; median of {report['runs']} processes per configuration, "
        f"alternated; load average {report['load_before'][0]:.2f} -> "
        f"{report['load_after'][0]:.2f}.",
        "",
        "| chunk | GQA tiled path | prefill s | GroupQueryAttention share "
        "| top operators (profiled run, s) |",
        "|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        top = ", ".join(f"{op} {s:.2f}" for op, s in list(row["ops"].items())[:5])
        lines.append(
            f"| {row['chunk']} | {'on' if row['flash'] else 'off'} | {row['seconds']:.2f} | "
            f"{row['attention_share']:.0%} | {top} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--chunks", type=int, nargs="+", default=[256, 512, POSITIONS])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        report_result(worker(**json.loads(args.worker)))
        return
    import subprocess

    from phi3v import machine

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    report = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit.stdout.strip(),
        "cpu": machine.describe_cpu(),
        "command": f"python bench/prefill_profile.py --model {args.model} --runs {args.runs}",
        "runs": args.runs,
        "load_before": os.getloadavg(),
    }
    report["rows"] = measure(args.model, args.chunks, args.runs)
    report["load_after"] = os.getloadavg()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "prefill_profile.json").write_text(json.dumps(report, indent=1) + "\n")
    (RESULTS / "prefill_profile.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
