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

phi3v's steps are the engine's own (``Sessions.embed_token`` then ``KVCache.run`` on the int4
decoder: what ``Pipeline.stream`` does per token, without the text decoding); onnxruntime-genai's
are ``Generator.generate_next_token``. Both hold their weights and a KV cache for the prompt, so
the process needs about twice one runtime's memory (11 GB at 1,935 positions on the real-size
set).

    python bench/decode_peer.py --model /tmp/scale [--length 1935] [--block 8] [--rounds 8]
        [--name decode_peer]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from provenance import save
from workers import stamp

from bench import B_THREADS, make_config_b

FLAGS = {"amx_tile", "avx2", "avx512f", "avx512_vnni"}
RUNTIMES = ("phi3v", "onnxruntime-genai")


def measure(model: str, length: int, block: int, rounds: int) -> dict:
    import onnxruntime_genai as og

    from phi3v import Pipeline
    from phi3v.run_state import RunState

    ids = np.random.default_rng(length).integers(1000, 30000, length)
    steps = block * rounds
    pipe = Pipeline.load(model, precision="exact")
    cache = pipe._new_cache(length + steps + 1)
    started = time.perf_counter()
    logits = pipe._prefill(cache, pipe.sessions.embed(ids[None], {}), RunState(started))
    prefill = {"phi3v": time.perf_counter() - started}

    # onnxruntime-genai as bench.py's genai-B: threads = cores (its default takes half of them).
    peer_folder = make_config_b(Path(model), Path(tempfile.mkdtemp(prefix="decode-peer-")))
    genai = og.Model(og.Config(str(peer_folder)))
    params = og.GeneratorParams(genai)
    params.set_search_options(max_length=length + steps + 1, do_sample=False)
    generator = og.Generator(genai, params)
    started = time.perf_counter()
    generator.append_tokens(ids[None].astype(np.int32))
    prefill["onnxruntime-genai"] = time.perf_counter() - started

    token = int(np.argmax(logits[: pipe.vocab_limit]))
    ours = [token]

    def phi3v_step() -> None:
        nonlocal token
        step_logits = cache.run(pipe.sessions.decoder, pipe.sessions.embed_token(token))
        token = int(np.argmax(step_logits[: pipe.vocab_limit]))
        ours.append(token)

    step = {"phi3v": phi3v_step, "onnxruntime-genai": generator.generate_next_token}
    ms: dict[str, list[list[float]]] = {name: [] for name in RUNTIMES}
    for number in range(rounds):
        for name in RUNTIMES if number % 2 == 0 else RUNTIMES[::-1]:
            times = []
            for _ in range(block):
                started = time.perf_counter()
                step[name]()
                times.append(1000 * (time.perf_counter() - started))
            ms[name].append(times)
        print(number, {name: round(statistics.median(ms[name][-1]), 1) for name in RUNTIMES})
    theirs = generator.get_sequence(0)[length:].tolist()
    same = min(len(ours), len(theirs))
    return {
        "model": model,
        "length": length,
        "block": block,
        "rounds": rounds,
        "prefill_s": prefill,
        "step_ms": ms,
        "same_tokens": ours[:same] == theirs[:same],
        "genai_threads": B_THREADS,
        "tokens_compared": same,
    }


def summary(result: dict) -> dict:
    """Per runtime: the median step over all rounds (the first block of each left out: the
    first steps after a switch pay for the other runtime's evicted caches alike), the median
    of each round; and phi3v's speed over onnxruntime-genai's (above 1: phi3v faster)."""
    found = {}
    for name, blocks in result["step_ms"].items():
        steps = [ms for times in blocks for ms in times[1:]]
        found[name] = {
            "median_ms": statistics.median(steps),
            "rounds_ms": [statistics.median(times) for times in blocks],
        }
    ours, theirs = found["phi3v"]["median_ms"], found["onnxruntime-genai"]["median_ms"]
    found["speed_ratio"] = theirs / ours
    found["rounds_phi3v_faster"] = sum(
        a < b
        for a, b in zip(
            found["phi3v"]["rounds_ms"], found["onnxruntime-genai"]["rounds_ms"], strict=True
        )
    )
    return found


def report(result: dict) -> str:
    found = summary(result)
    rows = [
        f"| {name} | {result['prefill_s'][name]:.1f} | {found[name]['median_ms']:.1f} | "
        + ", ".join(f"{ms:.0f}" for ms in found[name]["rounds_ms"])
        + " |"
        for name in RUNTIMES
    ]
    return "\n".join(
        [
            f"# Decode in one process: phi3v and onnxruntime-genai (`{result['name']}`)",
            "",
            f"{result['date']}; phi3v {result['commit']}; {result['cpu']} "
            f"(`{', '.join(result['flags'])}`); `{result['command']}`; load average "
            f"{' '.join(f'{x:.2f}' for x in result['load_before'])} -> "
            f"{' '.join(f'{x:.2f}' for x in result['load_after'])}",
            "",
            f"A prompt of {result['length']:,} random ids on `{result['model']}`, then "
            f"{result['rounds']} rounds of {result['block']} greedy decode steps per runtime, "
            "the order swapped each round; a step's median leaves out the first step of each "
            f"block. onnxruntime-genai with {result['genai_threads']} intra-op threads (bench.py's "
            "genai-B), phi3v with onnxruntime's default (one per core).",
            "",
            "| runtime | prefill s | decode ms per step (median) | median of each round, ms |",
            "|---|---|---|---|",
            *rows,
            "",
            f"phi3v's decode speed over onnxruntime-genai's: **{found['speed_ratio']:.2f}x**; "
            f"phi3v faster in {found['rounds_phi3v_faster']} of {result['rounds']} rounds; the "
            f"same tokens ({result['tokens_compared']} compared): "
            f"**{'yes' if result['same_tokens'] else 'no'}**.",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model folder (the real-size set)")
    parser.add_argument("--length", type=int, default=1935, help="prompt ids (a photo's)")
    parser.add_argument("--block", type=int, default=8, help="steps per turn")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--name", default="decode_peer")
    args = parser.parse_args()
    load_before = os.getloadavg()
    result = measure(args.model, args.length, args.block, args.rounds)
    command = (
        f"python bench/decode_peer.py --model {args.model} --length {args.length} "
        f"--block {args.block} --rounds {args.rounds} --name {args.name}"
    )
    result.update(name=args.name, **stamp(command, FLAGS, load_before))
    result["summary"] = summary(result)
    text = report(result)
    save(args.name, result, text)
    print(text)


if __name__ == "__main__":
    main()
