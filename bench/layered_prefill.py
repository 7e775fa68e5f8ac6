"""The fast prefill with our fused attention kernel (fp32, and bf16 where the CPU has it) against
the whole copy with onnxruntime's GroupQueryAttention, and where the layered prefill's time goes
(issue 16: attention's share).

On a real-size set (its fast copies as ``Pipeline.load(precision="fast")`` makes them), one
process per run, the paths alternated: the decoder copy on a photo's 1,935 prompt positions
(random values: timing depends on shapes, not values) in the engine's chunks of 512, into a fresh
KV cache, into a fresh one whose prompt pages are written first (``KVCache.prefault``, timed with
the prefill, as the engine runs), then into a cache whose memory was touched beforehand. The
last figure leaves out the cost of the cache's first pages, which both paths pay alike (on this
kind of VM it is seconds: see the report). In the layered runs the kernel's
calls and the copies of each chunk's keys and values into the cache are timed on their own,
which gives attention's share of the prefill.

    python bench/layered_prefill.py --model /tmp/scale [--runs 3] [--name N]

Writes ``bench/results/layered_prefill.{json,md}`` (``--name``: another stem, for another CPU).
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

POSITIONS = 1935  # a 1344x1008 photo at 16 crops and its question
# path -> the kernel's numerics (PHI3V_FUSED_ATTENTION), None for the whole copy
PATHS = {"fused kernel": "fp32", "fused kernel, bf16": "bf16", "GroupQueryAttention": None}
TARGET_SHARE = 0.25  # issue 16: prefill attention <= 25 % of prefill time
# The KV caches each run prefills into, and their titles: fresh (the prefill's own writes take
# each page's first write), prefaulted (KVCache.prefault first, timed: what the engine runs) and
# touched beforehand (untimed: what the copies cost without the first writes).
CACHES = {
    "fresh": "fresh KV cache, its pages first written by the prefill",
    "prefaulted": "fresh KV cache, its prompt's pages written first (as the engine runs)",
    "touched": "KV cache touched beforehand",
}
FLAGS = {"amx_bf16", "amx_int8", "amx_tile", "avx2", "avx512f", "avx512_bf16", "avx512_vnni"}


def worker(model: str, path: str) -> dict:
    import numpy as np

    from phi3v import convert, load_config
    from phi3v.kv_cache import PREFILL_CHUNK, KVCache
    from phi3v.layered import LayeredDecoder
    from phi3v.sessions import Sessions

    config = load_config(model)
    fast = convert.fast_models(config)
    fused = PATHS[path] is not None
    sessions = Sessions(
        config,
        vision_path=fast.vision,
        prefill_path=fast.decoder,
        fused_attention=PATHS[path] or False,
    )
    decoder = sessions.prefill_decoder
    if fused != isinstance(decoder, LayeredDecoder):
        return {"not_run": sessions.prefill_attention}  # e.g. bf16 on a CPU without it
    spent = {"kernel": 0.0, "store": 0.0}
    if fused:
        decoder.attention = _Timed(decoder.attention, spent)
    rng = np.random.default_rng(0)
    embeds = (rng.standard_normal((1, POSITIONS, config.decoder.hidden_size)) * 0.5).astype(
        np.float32
    )
    result = {"attention": sessions.prefill_attention}
    for key in CACHES:
        cache = KVCache(config.decoder, POSITIONS + 64, True, config.vocab_size)
        if key == "touched":
            for buffer in cache._buffers:
                buffer[...] = 0
        spent.update(kernel=0.0, store=0.0)
        started = time.perf_counter()
        if key == "prefaulted":  # as the engine runs: the prompt's pages first, then its prefill
            cache.prefault(POSITIONS, threads=2)
            result["prefaulted_prefault_s"] = time.perf_counter() - started
        for start in range(0, POSITIONS, PREFILL_CHUNK):
            cache.run(decoder, np.ascontiguousarray(embeds[:, start : start + PREFILL_CHUNK]))
        result[f"{key}_s"] = time.perf_counter() - started
        if fused:
            result[f"{key}_kernel_s"] = spent["kernel"]
            result[f"{key}_kv_copy_s"] = spent["store"]
        cache.close()
    return result


class _Timed:
    """The layered decoder's kernel, its two calls timed into ``spent``."""

    def __init__(self, kernel, spent: dict):
        self.kernel, self.spent = kernel, spent
        self.name = kernel.name

    def __call__(self, *args) -> None:
        started = time.perf_counter()
        self.kernel(*args)
        self.spent["kernel"] += time.perf_counter() - started

    def store(self, *args) -> None:
        started = time.perf_counter()
        self.kernel.store(*args)
        self.spent["store"] += time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--name", default="layered_prefill")
    if (args := parse_or_serve(parser, worker)) is None:
        return
    model = fast_copies_of(parser, args.model)

    load_before = os.getloadavg()
    specs = {path: {"model": str(model), "path": path} for path in PATHS}
    runs = alternate(__file__, specs, args.runs)
    command = f"python bench/layered_prefill.py --model {args.model} --runs {args.runs}"
    result = {
        **stamp(command, FLAGS, load_before),
        "positions": POSITIONS,
        "runs": runs,
        "medians": {
            path: {
                key: statistics.median(run[key] for run in found)
                for key in found[0]
                if key != "attention"
            }
            for path, found in runs.items()
            if "not_run" not in found[0]
        },
    }
    save(args.name, result, report(result))
    print(report(result))


def report(result: dict) -> str:
    medians = result["medians"]
    whole = medians["GroupQueryAttention"]
    rows = []
    for path, fused in medians.items():
        if path == "GroupQueryAttention":
            continue
        attention = result["runs"][path][0]["attention"]
        for key, title in CACHES.items():
            if f"{key}_s" not in fused:  # runs from before the engine prefaulted
                continue
            rows.append(
                [
                    f"{attention}, {title}",
                    f"{fused[f'{key}_s']:.2f}",
                    f"{whole[f'{key}_s']:.2f}",
                    f"{whole[f'{key}_s'] / fused[f'{key}_s']:.2f}x",
                    f"{fused[f'{key}_kernel_s']:.2f}",
                    f"{fused[f'{key}_kv_copy_s']:.2f}",
                    f"{share_of(fused, key):.0%}",
                ]
            )
    header = [
        "prefill of 1,935 positions: kernel, cache",
        "fused kernel, s",
        "GroupQueryAttention, s",
        "speed-up",
        "of which the kernel, s",
        "keys and values into the cache, s",
        "attention's share",
    ]
    fused = medians["fused kernel"]
    share, fresh_share = share_of(fused, "touched"), share_of(fused, "fresh")
    first_pages = fused["fresh_s"] - fused["touched_s"]
    met = "met" if max(share, fresh_share) <= TARGET_SHARE else "**not met**"
    not_run = [
        f"{path}: {found[0]['not_run']}"
        for path, found in result["runs"].items()
        if "not_run" in found[0]
    ]
    text = f"""# The fast prefill: fused attention kernel against GroupQueryAttention

{result["date"]}; phi3v {result["commit"]}; {result["cpu"]} (`{", ".join(result["flags"])}`);
`{result["command"]}`; median of {len(result["runs"]["fused kernel"])} processes per path,
alternated; load average {result["load_before"][0]:.2f} -> {result["load_after"][0]:.2f}.

{tables._table(header, rows)}

Attention in the layered prefill is the kernel plus the copy of each chunk's keys and values into
the cache (GroupQueryAttention makes the same copy inside its run). Its share is
{share:.0%} with the cache's memory touched beforehand and {fresh_share:.0%} with a fresh cache,
where the copy also takes the first write to every page of the cache: {first_pages:.1f} s of the
fused path's time here, paid by both paths alike. Issue 16 asks for at most
{TARGET_SHARE:.0%}: {met} on this CPU with the kernel in fp32.{bf16_share(medians)}"""
    text += prefault_note(medians)
    return text + ("\n\nNot run: " + "; ".join(not_run) + "." if not_run else "")


def prefault_note(medians: dict) -> str:
    """What writing the prompt's pages first (``KVCache.prefault``, as the engine does) saved
    each path against a fresh cache, where the run measured it."""
    parts = []
    for path, found in medians.items():
        if "prefaulted_s" in found:
            saved = found["fresh_s"] - found["prefaulted_s"]
            prefault = found["prefaulted_prefault_s"]
            parts.append(
                f"{path}: {found['prefaulted_s']:.2f} s against {found['fresh_s']:.2f} s "
                f"({saved:.2f} s sooner; the prefault itself {prefault:.2f} s)"
            )
    if not parts:
        return ""
    return (
        "\n\nWriting the prompt's pages of a fresh cache first, in one pass on two threads, then "
        "prefilling (`KVCache.prefault`, as the engine runs), timed together: "
        + "; ".join(parts)
        + "."
    )


def share_of(path: dict, key: str) -> float:
    """Attention's share of a layered path's prefill (its medians), into a ``key`` ("fresh" or
    "touched") cache: the kernel's calls and the chunks' keys and values into the cache."""
    return (path[f"{key}_kernel_s"] + path[f"{key}_kv_copy_s"]) / path[f"{key}_s"]


def bf16_share(medians: dict) -> str:
    """Attention's share with the kernel in bf16, where it ran."""
    if (bf16 := medians.get("fused kernel, bf16")) is None:
        return ""
    touched, fresh = share_of(bf16, "touched"), share_of(bf16, "fresh")
    text = f" In bf16: {touched:.0%} touched, {fresh:.0%} fresh"
    if "prefaulted_s" in bf16:
        prefaulted = share_of(bf16, "prefaulted")
        met = "met" if prefaulted <= TARGET_SHARE else "**not met**"
        text += f", {prefaulted:.0%} as the engine runs (its prompt's pages written first): {met}"
    return text + "."


if __name__ == "__main__":
    main()
