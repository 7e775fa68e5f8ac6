"""Decode steps of phi3v and onnxruntime-genai in one process, in alternating blocks (issue 16:
decode at least as fast as onnxruntime-genai).

On the 2-vCPU VMs this project is measured on, decode runs in a fast or a slow mode that holds
for a whole process, and drifts within one: a process per runtime compares the modes as much as
the runtimes. Here both runtimes load the same model folder into one process, read the same
prompt (random token ids: decode time depends on lengths, not values), and then take turns:
``--block`` decode steps of one, then of the other, ``--rounds`` times, the order swapped every
round. Whatever the machine does reaches both alike. Both decode on the same int4 decoder with
greedy search, so they must also produce the same tokens, which is checked step by step.
onnxruntime-genai runs with as many threads as phi3v (``bench.py``'s genai-B: a copy of the
folder's config asking for them; its own default takes half the cores).

The order in which the two load matters as well: in one process the runtime loaded first
decoded 5-20 % slower than the other, whichever it was (five runs with phi3v first, then one
with onnxruntime-genai first, which reversed the gap). So each of ``--processes`` rounds runs
one process per load order, and the speed ratio is the geometric mean over all processes, an
equal number with each runtime first.

phi3v's steps are the engine's own (``Sessions.embed_token`` then ``KVCache.run`` on the int4
decoder: what ``Pipeline.stream`` does per token, without the text decoding); onnxruntime-genai's
are ``Generator.generate_next_token``. Both hold their weights and a KV cache for the prompt, so
the process needs about twice one runtime's memory (11 GB at 1,935 positions on the real-size
set).

    python bench/decode_peer.py --model /tmp/scale [--length 1935] [--block 8] [--rounds 8]
        [--processes 2] [--name decode_peer] [--huge-pages]

``--huge-pages``: phi3v's weights moved onto 2 MB pages once loaded, as the app runs
(``phi3v/huge_pages.py``), only its own: onnxruntime-genai's memory is left as it allocates it.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import blocks
import numpy as np
from workers import parse_or_serve

from bench import B_THREADS, make_config_b

FLAGS = {"amx_tile", "avx2", "avx512f", "avx512_vnni"}
RUNTIMES = ("phi3v", "onnxruntime-genai")


def measure(
    model: str, length: int, block: int, rounds: int, first: str, huge_pages: bool = False
) -> dict:
    """One process: both runtimes loaded (``first`` loads and reads the prompt first), then
    their decode steps in alternating blocks; with ``huge_pages``, phi3v's weights moved onto
    2 MB pages once loaded, as the app does, and only phi3v's."""
    import onnxruntime_genai as og

    from phi3v import Pipeline
    from phi3v import huge_pages as pages

    ids = np.random.default_rng(length).integers(1000, 30000, length)
    steps = block * rounds
    prefill: dict[str, float] = {}
    loaded: dict = {}

    def load_phi3v() -> None:
        smaps = Path("/proc/self/smaps")
        others = [(m.start, m.end) for m in pages.mappings(smaps.read_text())]
        pipe = Pipeline.load(model, precision="exact", huge_pages=False)
        if huge_pages:  # as Pipeline.load would, leaving onnxruntime-genai's memory as it is
            loaded["pages"] = pages.collapse(leave=others).describe()
        embeds = pipe.sessions.embed(ids[None], {})
        decoder = pipe.sessions.prefill_decoder  # in exact, the decoder itself
        cache, logits, prefill["phi3v"] = blocks.prefill(pipe, decoder, embeds, steps + 1)
        loaded.update(pipe=pipe, cache=cache, logits=logits)

    def load_genai() -> None:
        # onnxruntime-genai as bench.py's genai-B: threads = cores (its default takes half).
        folder = make_config_b(Path(model), Path(tempfile.mkdtemp(prefix="decode-peer-")))
        genai = og.Model(og.Config(str(folder)))
        params = og.GeneratorParams(genai)
        params.set_search_options(max_length=length + steps + 1, do_sample=False)
        generator = og.Generator(genai, params)
        started = time.perf_counter()
        generator.append_tokens(ids[None].astype(np.int32))
        prefill["onnxruntime-genai"] = time.perf_counter() - started
        loaded.update(genai=genai, generator=generator)

    loads = {"phi3v": load_phi3v, "onnxruntime-genai": load_genai}
    for name in (first, *(n for n in RUNTIMES if n != first)):
        loads[name]()
    pipe, cache, generator = loaded["pipe"], loaded["cache"], loaded["generator"]

    phi3v_step, ours = blocks.greedy(pipe, pipe.sessions.decoder, cache, loaded["logits"])
    step = {"phi3v": phi3v_step, "onnxruntime-genai": generator.generate_next_token}
    ms = blocks.take_turns(step, block, rounds)
    theirs = generator.get_sequence(0)[length:].tolist()
    same = min(len(ours), len(theirs))
    return {
        "first": first,
        "prefill_s": prefill,
        "step_ms": ms,
        "same_tokens": ours[:same] == theirs[:same],
        "tokens_compared": same,
        "phi3v_pages": loaded.get("pages", "4 KB pages: not asked"),
    }


def summary(result: dict) -> dict:
    """Every process's summary (:func:`blocks.block_summary`, phi3v against onnxruntime-genai);
    the speed ratio over all of them (a geometric mean, as many processes with either runtime
    loaded first) and for each load order; each runtime's median step (the median of the
    processes' medians); rounds won; tokens the same in all."""
    found = blocks.summarize(result, RUNTIMES, "rounds_phi3v_faster")
    each = found["processes"]
    return {
        **found,
        **{
            name: {"median_ms": statistics.median(s[name]["median_ms"] for s in each)}
            for name in RUNTIMES
        },
        "same_tokens": all(p["same_tokens"] for p in result["processes"]),
        "tokens_compared": min(p["tokens_compared"] for p in result["processes"]),
    }


def report(result: dict) -> str:
    found = summary(result)
    rows = blocks.process_rows(result, found, RUNTIMES, digits=2)
    by_first = found["speed_ratio_by_first"]
    return "\n".join(
        [
            f"# Decode in one process: phi3v and onnxruntime-genai (`{result['name']}`)",
            "",
            f"{result['date']}; phi3v {result['commit']}; {result['cpu']} "
            f"(`{', '.join(result['flags'])}`); `{result['command']}`; load average "
            f"{' '.join(f'{x:.2f}' for x in result['load_before'])} -> "
            f"{' '.join(f'{x:.2f}' for x in result['load_after'])}",
            "",
            f"In each process, a prompt of {result['length']:,} random ids on "
            f"`{result['model']}` read by both runtimes (the one named first loads and reads "
            f"first), then {result['rounds']} rounds of {result['block']} greedy decode steps "
            "per runtime, the order swapped each round; a step's median leaves out the first "
            f"step of each block. onnxruntime-genai with {result['genai_threads']} intra-op "
            "threads (bench.py's genai-B), phi3v with onnxruntime's default (one per core).",
            "",
            "| process | loaded first | phi3v prefill s | phi3v ms per step | "
            "onnxruntime-genai prefill s | onnxruntime-genai ms per step | phi3v speed / "
            "onnxruntime-genai's | rounds phi3v faster |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            f"phi3v's decode speed over onnxruntime-genai's, all processes: "
            f"**{found['speed_ratio']:.2f}x** (geometric mean); "
            + "; ".join(f"{by_first[name]:.2f}x with {name} loaded first" for name in RUNTIMES)
            + f". phi3v faster in {found['rounds_phi3v_faster']} of {found['rounds']} rounds; "
            f"the same tokens in every process ({found['tokens_compared']} compared): "
            f"**{'yes' if found['same_tokens'] else 'no'}**."
            + (
                " phi3v's weights were moved onto 2 MB pages once loaded, as the app does "
                "(`--huge-pages`; its own address ranges only, onnxruntime-genai's left as "
                "they are): " + "; ".join(p["phi3v_pages"] for p in result["processes"]) + "."
                if result.get("huge_pages")
                else ""
            ),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model folder (the real-size set)")
    parser.add_argument("--length", type=int, default=1935, help="prompt ids (a photo's)")
    blocks.add_options(parser, "decode_peer", "load order")
    parser.add_argument("--huge-pages", action="store_true", help="phi3v's as the app runs")
    args = parse_or_serve(parser, measure)
    if args is None:
        return
    shape = dict(model=args.model, length=args.length, block=args.block, rounds=args.rounds)
    specs = {
        f"{first} first": {**shape, "first": first, "huge_pages": args.huge_pages}
        for first in RUNTIMES
    }
    command = (
        f"python bench/decode_peer.py --model {args.model} --length {args.length} "
        f"--block {args.block} --rounds {args.rounds} --processes {args.processes} "
        f"--name {args.name}" + (" --huge-pages" if args.huge_pages else "")
    )
    fields = {**shape, "genai_threads": B_THREADS, "name": args.name}
    if args.huge_pages:
        fields["huge_pages"] = True
    blocks.run_in_turn(
        __file__, specs, args, fields, command, FLAGS, summary, report, "--model", args.model
    )


if __name__ == "__main__":
    main()
