"""Decode on a KV cache on 2 MB pages against one on 4 KB pages, in one process (issue 16:
decode after a photo).

A decode step after a photo's prompt reads the whole KV cache, 1.5 GB at 1,935 positions of the
real model, beside the int4 weights. ``huge_pages.py`` moved the weights onto 2 MB pages (1.05x
decode); the cache stays on 4 KB pages, in a memory file with huge pages declined
(``phi3v/kv_cache.py``), so that its reserved room costs nothing: its layout [kv_heads, capacity,
head] leaves unwritten room inside every 2 MB, which a huge page would make resident. This
measures what that choice costs. Per process, the fast copy reads the same prompt (random
embeddings of a photo's length, in the engine's chunks) into two caches: the product's, and
one whose buffers are private anonymous memory with ``MADV_HUGEPAGE`` (the kernel then gives
its page faults 2 MB pages where it can); then the int4 decoder takes turns on the two:
``--block`` greedy steps on one, then on the other, ``--rounds`` times, the order swapped every
round. Half the processes prefill the 2 MB one first.

    python bench/kv_pages.py --model /tmp/scale [--block 8] [--rounds 8] [--processes 2]
        [--name kv_pages]

Each process also records how much of the 2 MB cache landed on huge pages (``AnonHugePages``
of its mappings) and what the room cost in resident memory.
"""

from __future__ import annotations

import math
import mmap
from contextlib import contextmanager, nullcontext
from pathlib import Path

import blocks
import numpy as np

from phi3v.engine import FOLLOW_UP_ROOM
from phi3v.kv_cache import bytes_per_position

FLAGS = {"amx_tile", "avx2", "avx512f", "avx512_vnni"}
SIDES = ("2 MB pages", "4 KB pages")
LENGTH = 1935  # a 1344x1008 photo's prompt at 16 crops


@contextmanager
def huge_page_buffers(mappings: list[mmap.mmap]):
    """While inside, new KV caches get private anonymous buffers that ask for 2 MB pages (their
    mappings are appended to ``mappings``) instead of the product's memory file."""
    from phi3v import kv_cache

    def allocate(count: int, shape: tuple[int, ...]):
        buffers = []
        for _ in range(count):
            memory = mmap.mmap(-1, math.prod(shape) * 4, flags=mmap.MAP_PRIVATE)
            memory.madvise(mmap.MADV_HUGEPAGE)
            mappings.append(memory)
            buffers.append(np.frombuffer(memory, np.float32).reshape(shape))
        return None, buffers

    product = kv_cache._allocate
    kv_cache._allocate = allocate
    try:
        yield
    finally:
        kv_cache._allocate = product


def huge_and_resident_mb(mappings: list[mmap.mmap]) -> tuple[float, float]:
    """MB on huge pages and resident of the process's mappings that hold ``mappings``, from
    ``/proc/self/smaps`` (Linux merges neighbouring buffers with the same flags into one
    mapping, which then holds only these buffers: their ``MADV_HUGEPAGE`` sets them apart)."""
    import ctypes

    from phi3v import huge_pages

    ranges = []
    for memory in mappings:
        start = ctypes.addressof(ctypes.c_char.from_buffer(memory))
        ranges.append((start, start + len(memory)))
    held = [
        found
        for found in huge_pages.mappings(Path("/proc/self/smaps").read_text())
        if any(found.start < end and start < found.end for start, end in ranges)
    ]
    return sum(m.huge for m in held) / 2**20, sum(m.resident for m in held) / 2**20


def measure(model: str, block: int, rounds: int, first: str) -> dict:
    """One process: both caches prefilled (``first``'s first), then alternating decode blocks."""
    from phi3v import Pipeline

    pipe = Pipeline.load(model, precision="fast", huge_pages=True)  # the weights, as the app
    sessions, config = pipe.sessions, pipe.config
    rng = np.random.default_rng(LENGTH)
    embeds = rng.standard_normal((1, LENGTH, config.decoder.hidden_size), np.float32) * 0.02
    steps = block * rounds
    steps_of, tokens, prefill, mappings = {}, {}, {}, []
    for side in (first, *(s for s in SIDES if s != first)):
        with huge_page_buffers(mappings) if side == SIDES[0] else nullcontext():
            cache, logits, prefill[side] = blocks.prefill(
                pipe, sessions.prefill_decoder, embeds, steps + 1
            )
        steps_of[side], tokens[side] = blocks.greedy(pipe, sessions.decoder, cache, logits)
    huge_mb, resident_mb = huge_and_resident_mb(mappings)

    ms = blocks.take_turns({side: steps_of[side] for side in SIDES}, block, rounds)
    cache_mb = LENGTH * bytes_per_position(config.decoder) / 2**20
    return {
        "first": first,
        "prefill_s": prefill,
        "step_ms": ms,
        "huge_cache": {"written_mb": cache_mb, "huge_mb": huge_mb, "resident_mb": resident_mb},
        "same_tokens": tokens[SIDES[0]] == tokens[SIDES[1]],
    }


def summary(result: dict) -> dict:
    """Every process's summary (:func:`blocks.block_summary`, the 2 MB cache against the 4 KB
    one: above 1, the 2 MB cache decodes faster), the geometric mean of their ratios over all
    processes and by which cache was prefilled first, and the rounds won."""
    return blocks.summarize(result, SIDES, "rounds_huge_faster")


def report(result: dict) -> str:
    found = summary(result)
    rows = blocks.process_rows(result, found, SIDES, digits=3)
    by_first = blocks.by_first_text(found)
    pages = [
        f"{run['huge_cache']['huge_mb']:,.0f} of {run['huge_cache']['resident_mb']:,.0f} MB"
        for run in result["processes"]
    ]
    written = result["processes"][0]["huge_cache"]["written_mb"]
    same = all(run["same_tokens"] for run in result["processes"])
    return "\n".join(
        [
            "# Decode on a KV cache on 2 MB pages and on one on 4 KB pages, in one process",
            "",
            f"{result['date']}; phi3v {result['commit']}; {result['cpu']} "
            f"(`{', '.join(result['flags'])}`); `{result['command']}`; load average "
            f"{result['load_before'][0]:.2f} -> {result['load_after'][0]:.2f}.",
            "",
            f"Per process: {LENGTH:,} positions of random embeddings prefilled by the fast copy "
            "into two caches, the product's (a memory file, 4 KB pages) and one of private "
            "anonymous memory asking for 2 MB pages; the weights on 2 MB pages in both, as the "
            f"app runs. Then {result['rounds']} rounds of {result['block']} greedy int4 decode "
            "steps on each cache, the order swapped each round; a block's first step is left "
            "out of its median.",
            "",
            "| process | prefilled first | 2 MB prefill s | 2 MB cache ms per step | "
            "4 KB prefill s | 4 KB cache ms per step | 2 MB cache speed / 4 KB cache's | "
            "rounds the 2 MB cache was faster |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            f"Decode speed on the 2 MB cache over the 4 KB one, all processes: "
            f"**{found['speed_ratio']:.3f}x** (geometric mean; {by_first}); the 2 MB cache "
            f"faster in {found['rounds_huge_faster']} of {found['rounds']} rounds; the same "
            f"tokens on both: {'yes' if same else 'no'}. The 2 MB cache's memory on huge pages, "
            f"of its resident memory, per process: {', '.join(pages)}; its written positions "
            f"are {written:,.0f} MB, the rest is the room for the decode steps, resident because "
            "a huge page is resident whole. The product keeps room for "
            f"{FOLLOW_UP_ROOM:,} positions after each answer (`FOLLOW_UP_ROOM`, for follow-up "
            "questions without a copy of the cache); on 2 MB pages that room would be resident "
            f"too: {written / LENGTH * FOLLOW_UP_ROOM:,.0f} MB more per conversation at this "
            "model's size, against the speed above.",
        ]
    )


def main() -> None:
    blocks.two_caches_main(__file__, __doc__, measure, SIDES, FLAGS, summary, report)


if __name__ == "__main__":
    main()
