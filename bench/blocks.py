"""Two things timed in one process in alternating blocks of steps (``decode_peer.py``,
``kernel_cache.py``): each side's median step, the speed ratio, and the rounds each side won.

A process on these 2-vCPU VMs decodes in a fast or a slow mode, so two things are compared
inside one process, in turns, rather than one process each; and over several processes by the
geometric mean of their ratios, as many with either side first.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from provenance import save
from workers import alternate, fast_copies_of, parse_or_serve, stamp


def prefill(pipe, decoder, embeds, room: int):
    """A new KV cache for ``pipe``'s model with ``room`` positions after ``embeds`` [1, S,
    hidden], which ``decoder`` (a session, or the copy in stages) reads into it in the engine's
    chunks: the cache, the last position's logits and the seconds it took."""
    import numpy as np

    from phi3v.kv_cache import PREFILL_CHUNK, KVCache

    config = pipe.config
    length = embeds.shape[1]
    cache = KVCache(
        config.decoder, length + room, config.past_present_share_buffer, config.vocab_size
    )
    started = time.perf_counter()
    for start in range(0, length, PREFILL_CHUNK):
        logits = cache.run(decoder, np.ascontiguousarray(embeds[:, start : start + PREFILL_CHUNK]))
    return cache, logits, time.perf_counter() - started


def greedy(pipe, decoder, cache, logits) -> tuple[Callable[[], None], list[int]]:
    """Greedy decode steps on ``cache`` after a prefill's last ``logits``: the step (one token
    through ``decoder``, as the engine's decode does, without the text) and the tokens so far,
    the prefill's own first."""
    import numpy as np

    tokens = [int(np.argmax(logits[: pipe.vocab_limit]))]

    def step() -> None:
        step_logits = cache.run(decoder, pipe.sessions.embed_token(tokens[-1]))
        tokens.append(int(np.argmax(step_logits[: pipe.vocab_limit])))

    return step, tokens


def take_turns(
    steps: dict[str, Callable[[], object]], block: int, rounds: int
) -> dict[str, list[list[float]]]:
    """``rounds`` rounds of ``block`` calls of each step, in the order given, reversed every
    other round: each call's milliseconds, by step and block."""
    names = list(steps)
    ms: dict[str, list[list[float]]] = {name: [] for name in names}
    for number in range(rounds):
        for name in names if number % 2 == 0 else names[::-1]:
            times = []
            for _ in range(block):
                started = time.perf_counter()
                steps[name]()
                times.append(1000 * (time.perf_counter() - started))
            ms[name].append(times)
        print(number, {name: round(statistics.median(ms[name][-1]), 1) for name in names})
    return ms


def block_summary(step_ms: dict[str, list[list[float]]], side: str, other: str) -> dict:
    """Per side the median step over all its blocks (the first step of each block left out: it
    pays for the other side's evicted caches) and each block's median; ``side``'s speed over
    ``other``'s (above 1: ``side`` is faster) and the rounds ``side`` was faster in."""
    found: dict = {}
    for name, blocks in step_ms.items():
        found[name] = {
            "median_ms": statistics.median(ms for times in blocks for ms in times[1:]),
            "rounds_ms": [statistics.median(times) for times in blocks],
        }
    ours, theirs = found[side], found[other]
    found["speed_ratio"] = theirs["median_ms"] / ours["median_ms"]
    pairs = zip(ours["rounds_ms"], theirs["rounds_ms"], strict=True)
    found["rounds_faster"] = sum(a < b for a, b in pairs)
    return found


def geometric_mean(values: list[float]) -> float:
    return math.exp(statistics.mean(math.log(v) for v in values))


def summarize(result: dict, names: tuple[str, str], won: str) -> dict:
    """Every process's :func:`block_summary` (``names[0]``'s speed over ``names[1]``'s), the
    geometric mean of their ratios over all processes and by the side that came first, the
    rounds ``names[0]`` was faster in (under ``won``) and the rounds in all."""
    each = [block_summary(process["step_ms"], *names) for process in result["processes"]]
    firsts = [process["first"] for process in result["processes"]]
    return {
        "processes": each,
        "speed_ratio": geometric_mean([found["speed_ratio"] for found in each]),
        "speed_ratio_by_first": ratio_by_first(each, firsts, names),
        won: sum(found["rounds_faster"] for found in each),
        "rounds": result["rounds"] * len(each),
    }


def ratio_by_first(each: list[dict], firsts: list[str], names: tuple[str, ...]) -> dict:
    """The geometric mean of the processes' speed ratios for each side that came first."""
    return {
        name: geometric_mean(
            [found["speed_ratio"] for found, f in zip(each, firsts, strict=True) if f == name]
        )
        for name in names
        if name in firsts
    }


def by_first_text(found: dict, digits: int = 3) -> str:
    """The speed ratio for each side prefilled first, as a report's words."""
    return "; ".join(
        f"{ratio:.{digits}f}x with the {side} cache prefilled first"
        for side, ratio in found["speed_ratio_by_first"].items()
    )


def process_rows(result: dict, found: dict, names: tuple[str, ...], digits: int = 2) -> list[str]:
    """One Markdown table row per process: its number, which side came first, each side's
    prefill seconds and median step, the speed ratio and the rounds won."""
    return [
        f"| {number} | {process['first']} | "
        + " | ".join(
            f"{process['prefill_s'][name]:.1f} | {each[name]['median_ms']:.1f}" for name in names
        )
        + f" | {each['speed_ratio']:.{digits}f} | {each['rounds_faster']} of {result['rounds']} |"
        for number, (process, each) in enumerate(
            zip(result["processes"], found["processes"], strict=True), 1
        )
    ]


def add_options(parser: argparse.ArgumentParser, name: str, processes: str) -> None:
    """The options of a script timed in blocks: steps per turn, rounds, processes per order
    (``processes``: what the order is) and the results file's stem (default ``name``)."""
    parser.add_argument("--block", type=int, default=8, help="steps per turn")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--processes", type=int, default=2, help=f"processes per {processes}")
    parser.add_argument("--name", default=name)


def run_in_turn(
    script: str | Path,
    specs: dict[str, dict],
    args: argparse.Namespace,
    fields: dict,
    command: str,
    flags: set[str],
    summary: Callable[[dict], dict],
    report: Callable[[dict], str],
    *worker_args: str,
) -> None:
    """``args.processes`` rounds of one process per spec (:func:`workers.alternate`; the
    script's own required ``worker_args`` passed on), then their results file
    ``results/<args.name>.{json,md}``: ``fields``, the processes in the order they ran, the
    stamp (:func:`workers.stamp`), the ``summary``; the ``report`` printed too."""
    load_before = os.getloadavg()
    runs = alternate(script, specs, args.processes, *worker_args)
    in_order = [run for turn in zip(*runs.values(), strict=True) for run in turn]
    result = {**fields, "processes": in_order}
    result.update(stamp(command, flags, load_before))
    result["summary"] = summary(result)
    text = report(result)
    save(args.name, result, text)
    print(text)


def two_caches_main(
    script: str,
    doc: str,
    measure: Callable[..., dict],
    sides: tuple[str, str],
    flags: set[str],
    summary: Callable[[dict], dict],
    report: Callable[[dict], str],
) -> None:
    """The command line of a script that prefills two KV caches in one process and decodes on
    them in turns (``kernel_cache.py``, ``kv_pages.py``): ``--model`` (a real-size set, its fast
    copies made first), the options of :func:`add_options`, and as many processes with either
    side prefilled first (``measure(model, block, rounds, first)`` in each); then the results
    file (:func:`run_in_turn`)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a real-size set (python -m phi3v.testing)")
    add_options(parser, Path(script).stem, "prefill order")
    if (args := parse_or_serve(parser, measure)) is None:
        return
    model = str(fast_copies_of(parser, args.model))
    shape = {"model": model, "block": args.block, "rounds": args.rounds}
    specs = {f"{side} first": {**shape, "first": side} for side in sides}
    command = (
        f"python bench/{Path(script).name} --model {args.model} --block {args.block} "
        f"--rounds {args.rounds} --processes {args.processes} --name {args.name}"
    )
    run_in_turn(script, specs, args, shape, command, flags, summary, report)
