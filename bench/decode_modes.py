"""Decode right after a photo's fast prefill, and again later in the same process, with and
without the fused attention kernel (issue 16: why the kernel is not the default yet).

In ``bench.py``'s runs decode after a photo took either about 110 or about 150 ms per token,
from process to process, for every runtime; the fused kernel's runs landed in the slow mode more
often. This separates the two questions: per process (one per path, alternated), the engine
answers a question about the photo in a conversation (load, vision, prefill, then decode), then
asks the same question again ``--repeats`` times in that conversation: the prompt's positions
are reused (no vision, no prefill), so those runs are decode alone, on the same KV cache.

    python bench/decode_modes.py --model /tmp/scale [--runs 3] [--repeats 4] [--name N]
        [--paths "fused kernel,GroupQueryAttention"] [--huge-pages]

``--paths``: which prompt attentions, of ``PATHS``; ``--huge-pages``: the weights moved onto
2 MB pages after loading, as the app runs (``PHI3V_HUGE_PAGES=1``).

Writes ``bench/results/decode_modes.{json,md}`` (``--name``: another stem, for another CPU).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import tables
from provenance import save
from workers import alternate, fast_copies_of, parse_or_serve, stamp

# each prompt attention, and the PHI3V_FUSED_ATTENTION value that asks for it
PATHS = {"fused kernel": "1", "fused kernel in bf16": "bf16", "GroupQueryAttention": "0"}
DEFAULT_PATHS = "fused kernel,GroupQueryAttention"
QUESTION = "Describe the picture."
NEW_TOKENS = 32
FLAGS = {"amx_tile", "avx2", "avx512f", "avx512_bf16", "avx512_vnni"}


def worker(model: str, image: str, path: str, repeats: int, huge_pages: bool = False) -> dict:
    os.environ["PHI3V_FUSED_ATTENTION"] = PATHS[path]
    from phi3v import Pipeline

    pipe = Pipeline.load(model, precision="fast", huge_pages=huge_pages)
    attention = pipe.sessions.prefill_attention
    if (PATHS[path] != "0") != attention.startswith("fused"):
        raise RuntimeError(f"asked for {path}, got {attention}")

    def ask() -> tuple[float, float, int]:
        result = pipe.generate(QUESTION, images=[image], max_new_tokens=NEW_TOKENS, conversation=1)
        timings = result.timings
        return 1000 / timings.decode_tokens_per_second, timings.prefill, result.reused_tokens

    first, prefill, _ = ask()
    before, start = thread_cpu(), time.perf_counter()
    again = [ask() for _ in range(repeats)]
    wall, after = time.perf_counter() - start, thread_cpu()
    if any(reused == 0 for _, _, reused in again):
        raise RuntimeError("a repeated question did not reuse the prompt's KV cache")
    busy = sorted((after[t] - before.get(t, 0.0) for t in after), reverse=True)
    return {
        "attention": attention,
        "prefill_s": prefill,
        "first_decode_ms": first,
        "repeat_decode_ms": [ms for ms, _, _ in again],
        # who used the cores while the repeated questions decoded: each thread's CPU share of
        # the wall clock, busiest first, and how many threads the process had
        "thread_shares": [round(cpu / wall, 3) for cpu in busy if cpu > 0.01 * wall],
        "threads": len(after),
    }


def thread_cpu() -> dict[str, float]:
    """CPU seconds (user and system) each thread of this process has used, by thread id."""
    tick = os.sysconf("SC_CLK_TCK")
    found = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            stat = Path(f"/proc/self/task/{tid}/stat").read_text()
        except FileNotFoundError:  # ended since the listing
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after the name, which may hold spaces
        found[tid] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--image", type=Path, help="a photo (default: bench.py's 1344x1008 PNG)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--name", default="decode_modes")
    parser.add_argument("--paths", default=DEFAULT_PATHS, help=f"of: {', '.join(PATHS)}")
    parser.add_argument("--huge-pages", action="store_true", help="as the app runs")
    if (args := parse_or_serve(parser, worker)) is None:
        return
    model = str(fast_copies_of(parser, args.model))
    from bench import make_image

    image = args.image or make_image(Path("/tmp/phi3v-bench-photo.png"))
    paths = [path.strip() for path in args.paths.split(",")]
    if unknown := [path for path in paths if path not in PATHS]:
        parser.error(f"--paths: {', '.join(unknown)} not of: {', '.join(PATHS)}")
    load_before = os.getloadavg()
    specs = {
        path: {
            "model": model,
            "image": str(image),
            "path": path,
            "repeats": args.repeats,
            "huge_pages": args.huge_pages,
        }
        for path in paths
    }
    runs = alternate(__file__, specs, args.runs)
    command = (
        f"python bench/decode_modes.py --model {args.model} --runs {args.runs} "
        f"--repeats {args.repeats}"
    )
    if args.paths != DEFAULT_PATHS:
        command += f' --paths "{args.paths}"'
    if args.huge_pages:
        command += " --huge-pages"
    result = {
        **stamp(command, FLAGS, load_before),
        "new_tokens": NEW_TOKENS,
        "huge_pages": args.huge_pages,
        "runs": runs,
    }
    save(args.name, result, report(result))
    print(report(result))


def summary(result: dict) -> dict[str, dict[str, list[float]]]:
    """Per path: decode right after the prefill, one value per process; and the median of each
    process's repeated decodes."""
    return {
        path: {
            "first": [run["first_decode_ms"] for run in found],
            "repeats": [statistics.median(run["repeat_decode_ms"]) for run in found],
        }
        for path, found in result["runs"].items()
    }


THREADS_NOTE = """ The last column counts, from `/proc/self/task`, every thread that used at
least 1 % of the wall clock while the repeated questions decoded: a slow process with a third
busy thread would be losing a core to it."""


def busy_threads(run: dict) -> str:
    """The threads that used a core while ``run``'s repeated questions decoded, as "1.00 +
    0.99 of 41": each one's CPU time over the wall clock, of the process's thread count."""
    return f"{' + '.join(f'{share:.2f}' for share in run['thread_shares'])} of {run['threads']}"


def report(result: dict) -> str:
    def values(numbers: list[float]) -> str:
        return ", ".join(f"{n:.0f}" for n in numbers)

    rows = [
        [
            path,
            values(found["first"]),
            f"{statistics.median(found['first']):.0f}",
            values(found["repeats"]),
            f"{statistics.median(found['repeats']):.0f}",
        ]
        for path, found in summary(result).items()
    ]
    header = [
        "prompt attention",
        "decode right after the photo's prefill, ms/token (per process, in run order)",
        "median",
        "decode asked again in the same process, ms/token (median per process)",
        "median",
    ]
    threads = [run for runs in result["runs"].values() for run in runs if "thread_shares" in run]
    if threads:  # recorded since 2026-12-08
        header.append("threads using a core while it decoded again: CPU / wall clock, per process")
        for row, runs in zip(rows, result["runs"].values(), strict=True):
            row.append("; ".join(busy_threads(run) for run in runs))
    processes = len(next(iter(result["runs"].values())))
    pages = " The weights on 2 MB pages, as the app runs." if result.get("huge_pages") else ""
    load = f"{result['load_before'][0]:.2f} -> {result['load_after'][0]:.2f}"
    return f"""# Decode after the fast prefill, with and without the fused attention kernel

{result["date"]}; phi3v {result["commit"]}; {result["cpu"]} (`{", ".join(result["flags"])}`);
`{result["command"]}`; {processes} processes per path, alternated, {result["new_tokens"]} new
tokens per answer; load average {load}.{pages}

{tables._table(header, rows)}

The repeated questions reuse the prompt's KV cache, which the path named in the first column
wrote: they decode on the same cache as the first answer, without its vision run and prefill.{
        THREADS_NOTE if threads else ""
    }"""


if __name__ == "__main__":
    main()
