"""Decode with the int4 decoder's weights on 2 MB pages against 4 KB pages, in one process
(``phi3v/huge_pages.py``).

One process per run on these 2-vCPU VMs decodes in a fast or a slow mode (``decode_peer.py``),
which swamps a difference between processes. So each process holds two int4 decoders:
``Pipeline.load`` (exact) with its weights moved onto 2 MB pages, then a second session of the
same decoder opened afterwards, whose weights stay on the 4 KB pages they were allocated on.
Each decoder reads the same prompt (``--positions`` random embeddings) into a KV cache of its
own, then they take turns: ``--block`` greedy steps on one, then on the other, ``--rounds``
times, the order swapped every round. Whatever the process or the machine does reaches both
alike. The decoder on 2 MB pages is always the one loaded first, which in ``decode_peer.py``
decoded slower whichever it was: a bias against it, if any.

    python bench/huge_pages.py --model /tmp/scale [--block 8] [--rounds 8] [--processes 2]
        [--positions 256] [--name huge_pages]

Writes ``bench/results/huge_pages.{json,md}`` (``--name``: another stem, for another CPU).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import blocks
import numpy as np
from workers import parse_or_serve

FLAGS = {"amx_tile", "avx2", "avx512f", "avx512_vnni"}
SIDES = ("2 MB pages", "4 KB pages")


def measure(model: str, block: int, rounds: int, positions: int) -> dict:
    """One process: both decoders, their caches prefilled, then alternating decode blocks."""
    from phi3v import Pipeline
    from phi3v.sessions import open_session

    pipe = Pipeline.load(model, precision="exact", huge_pages=True)
    moved = pipe.sessions.huge_pages
    if moved.reason:
        raise RuntimeError(f"the weights were not moved: {moved.reason}")
    config = pipe.config
    small = open_session(config.path(config.decoder.filename), pipe.sessions.options)
    decoders = dict(zip(SIDES, (pipe.sessions.decoder, small), strict=True))
    rng = np.random.default_rng(positions)
    embeds = rng.standard_normal((1, positions, config.decoder.hidden_size), np.float32) * 0.02
    steps_of, tokens, prefill = {}, {}, {}
    for side, decoder in decoders.items():
        cache, logits, prefill[side] = blocks.prefill(pipe, decoder, embeds, block * rounds + 1)
        steps_of[side], tokens[side] = blocks.greedy(pipe, decoder, cache, logits)

    ms = blocks.take_turns(steps_of, block, rounds)
    same = tokens[SIDES[0]] == tokens[SIDES[1]]
    return {
        "first": SIDES[0],
        "prefill_s": prefill,
        "step_ms": ms,
        "moved": moved.describe(),
        "move_s": moved.seconds,
        "huge_gb": huge_kib() / 2**20,
        "same_tokens": same,
    }


def huge_kib() -> int:
    """This process's anonymous memory on huge pages, in KiB (/proc/self/smaps_rollup)."""
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


def summary(result: dict) -> dict:
    """Every process's summary (:func:`blocks.block_summary`: above 1, 2 MB pages decode
    faster), the geometric mean of their ratios, and the rounds won."""
    return blocks.summarize(result, SIDES, "rounds_huge_faster")


def report(result: dict) -> str:
    found = summary(result)
    rows = blocks.process_rows(result, found, SIDES, digits=3)
    processes = result["processes"]
    moved = "; ".join(p["moved"] for p in processes)
    same = all(p["same_tokens"] for p in processes)
    return "\n".join(
        [
            "# Decode on 2 MB pages and on 4 KB pages, in one process",
            "",
            f"{result['date']}; phi3v {result['commit']}; {result['cpu']} "
            f"(`{', '.join(result['flags'])}`); `{result['command']}`; load average "
            f"{result['load_before'][0]:.2f} -> {result['load_after'][0]:.2f}.",
            "",
            f"Per process: the int4 decoder twice, its weights moved onto 2 MB pages after "
            f"`Pipeline.load` and left on 4 KB pages in a second session; {result['positions']} "
            f"positions of random embeddings prefilled by each into its own cache, then "
            f"{result['rounds']} rounds of {result['block']} greedy steps on each, the order "
            "swapped each round; a block's first step is left out of its median. What the move "
            f"did: {moved}.",
            "",
            "| process | loaded first | 2 MB: prefill s | 2 MB: ms per step | 4 KB: prefill s | "
            "4 KB: ms per step | speed on 2 MB / on 4 KB | rounds faster on 2 MB |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            f"Decode speed on 2 MB pages over 4 KB pages, all processes: "
            f"**{found['speed_ratio']:.3f}x** (geometric mean); faster on 2 MB pages in "
            f"{found['rounds_huge_faster']} of {found['rounds']} rounds. The same tokens on both: "
            f"{'yes' if same else '**no**'}.",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a real-size set (python -m phi3v.testing)")
    parser.add_argument("--positions", type=int, default=256)
    blocks.add_options(parser, "huge_pages", "run")
    if (args := parse_or_serve(parser, measure)) is None:
        return
    if args.model is None:
        parser.error("--model is required")
    spec = {
        "model": str(args.model.resolve()),
        "block": args.block,
        "rounds": args.rounds,
        "positions": args.positions,
    }
    command = (
        f"python bench/huge_pages.py --model {args.model} --block {args.block} --rounds "
        f"{args.rounds} --processes {args.processes} --positions {args.positions}"
    )
    blocks.run_in_turn(__file__, {"run": spec}, args, spec, command, FLAGS, summary, report)


if __name__ == "__main__":
    main()
