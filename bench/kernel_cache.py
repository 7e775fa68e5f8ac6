"""Decode on a KV cache the fused kernel wrote against one GroupQueryAttention wrote, in one
process (issue 16: why the kernel is not the default yet).

Processes that ran the fused kernel's prefill decoded slowly more often than those that ran
GroupQueryAttention's (``docs/PERFORMANCE.md``, the VNNI section), and one process per path
compares the VM's per-process decode modes as much as the paths. Here one process holds both
prompt decoders (the fast copy in stages with the kernel, and whole) and the int4 decoder; each
prompt decoder reads the same prompt (random embeddings of a photo's length, in the engine's
chunks) into a KV cache of its own, and then the int4 decoder takes turns on the two caches:
``--block`` greedy steps on one, then on the other, ``--rounds`` times, the order swapped every
round. Whatever the process or the machine does reaches both caches alike; what differs is only
who wrote the cache, and how (the kernel writes a chunk's keys and values on its own threads,
GroupQueryAttention on onnxruntime's). Half the processes prefill the kernel's cache first.

    python bench/kernel_cache.py --model /tmp/scale [--block 8] [--rounds 8] [--processes 2]
        [--name kernel_cache]

About 14 GB: both prompt decoders, the int4 decoder and two caches of 1,935 positions.
"""

from __future__ import annotations

import os

import blocks
import numpy as np

FLAGS = {"amx_tile", "avx2", "avx512f", "avx512_vnni"}
PATHS = ("fused kernel", "GroupQueryAttention")
LENGTH = 1935  # a 1344x1008 photo's prompt at 16 crops


def measure(model: str, block: int, rounds: int, first: str) -> dict:
    """One process: both caches prefilled (``first``'s first), then alternating decode blocks."""
    os.environ["PHI3V_FUSED_ATTENTION"] = "1"
    from phi3v import Pipeline, convert
    from phi3v.sessions import open_session

    pipe = Pipeline.load(model, precision="fast")
    sessions, config = pipe.sessions, pipe.config
    if not sessions.prefill_attention.startswith("fused"):
        raise RuntimeError(f"the fused kernel does not run here: {sessions.prefill_attention}")
    whole = open_session(convert.fast_models(config).decoder, sessions.options)
    writers = {"fused kernel": sessions.prefill_decoder, "GroupQueryAttention": whole}
    rng = np.random.default_rng(LENGTH)
    embeds = rng.standard_normal((1, LENGTH, config.decoder.hidden_size), np.float32) * 0.02
    steps = block * rounds
    steps_of, prefill = {}, {}
    for path in (first, *(p for p in PATHS if p != first)):
        cache, logits, prefill[path] = blocks.prefill(pipe, writers[path], embeds, steps + 1)
        steps_of[path], _ = blocks.greedy(pipe, sessions.decoder, cache, logits)

    ms = blocks.take_turns({path: steps_of[path] for path in PATHS}, block, rounds)
    return {"first": first, "prefill_s": prefill, "step_ms": ms}


def summary(result: dict) -> dict:
    """Every process's summary (:func:`blocks.block_summary`, the kernel's cache against
    GroupQueryAttention's: below 1, the kernel's decodes slower), the geometric mean of their
    ratios over all processes and by which cache was prefilled first, and the rounds won."""
    return blocks.summarize(result, PATHS, "rounds_kernel_faster")


def report(result: dict) -> str:
    found = summary(result)
    rows = blocks.process_rows(result, found, PATHS, digits=3)
    by_first = blocks.by_first_text(found)
    return "\n".join(
        [
            "# Decode on the fused kernel's KV cache and on GroupQueryAttention's, in one process",
            "",
            f"{result['date']}; phi3v {result['commit']}; {result['cpu']} "
            f"(`{', '.join(result['flags'])}`); `{result['command']}`; load average "
            f"{result['load_before'][0]:.2f} -> {result['load_after'][0]:.2f}.",
            "",
            f"Per process: {LENGTH:,} positions of random embeddings prefilled into two caches, "
            f"one by the fast copy in stages with the fused kernel, one by the whole copy with "
            f"GroupQueryAttention; then {result['rounds']} rounds of {result['block']} greedy "
            "int4 decode steps on each cache, the order swapped each round; a block's first step "
            "is left out of its median.",
            "",
            "| process | prefilled first | kernel prefill s | kernel cache ms per step | "
            "GQA prefill s | GQA cache ms per step | kernel cache speed / GQA cache's | "
            "rounds the kernel cache was faster |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            f"Decode speed on the kernel's cache over GroupQueryAttention's, all processes: "
            f"**{found['speed_ratio']:.3f}x** (geometric mean; {by_first}); the kernel's cache "
            f"faster in {found['rounds_kernel_faster']} of {found['rounds']} rounds.",
        ]
    )


def main() -> None:
    blocks.two_caches_main(__file__, __doc__, measure, PATHS, FLAGS, summary, report)


if __name__ == "__main__":
    main()
