"""Peak memory of one request as a function of its prompt length.

A request's memory beyond the loaded model is its KV cache (``bytes_per_position`` per prompt
position, in pages written only as positions are computed) plus one prefill chunk's activations
and logits (at most ``PREFILL_CHUNK`` rows; never ``[prompt, vocab]``). This measures it: one
process per prompt length, random token ids fed through ``input_ids=``, 4 new tokens, peak RSS
(``ru_maxrss``) against the RSS after loading.

    python bench/memory.py --model DIR [--lengths 512,2048,8192,32768] [--precision exact]

Writes ``bench/results/memory-<model folder>.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import resource
from pathlib import Path

import tables
from provenance import save
from workers import parse_or_serve, run_worker

NEW_TOKENS = 4
MIB = 1 << 20


def worker(model: str, length: int, precision: str) -> dict:
    import numpy as np

    from phi3v import Pipeline
    from phi3v.engine import PREFILL_CHUNK
    from phi3v.kv_cache import bytes_per_position

    pipe = Pipeline.load(model, precision=precision, max_prompt_tokens=length)
    loaded = _rss()
    ids = np.random.default_rng(length).integers(1000, 30000, length).tolist()
    result = pipe.generate(input_ids=ids, max_new_tokens=NEW_TOKENS)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    per_position = bytes_per_position(pipe.config.decoder)
    return {
        "length": length,
        "precision": pipe.precision,
        "loaded_mib": loaded / MIB,
        "peak_mib": peak / MIB,
        "kv_mib": (length + NEW_TOKENS) * per_position / MIB,
        "chunk_logits_mib": min(length, PREFILL_CHUNK) * pipe.config.vocab_size * 4 / MIB,
        "new_tokens": len(result.token_ids),
    }


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--lengths", default="512,2048,8192,32768")
    parser.add_argument("--precision", default="exact", choices=("exact", "fast", "auto"))
    if (args := parse_or_serve(parser, worker)) is None:
        return
    rows = []
    for length in (int(n) for n in args.lengths.split(",")):
        spec = {"model": str(args.model), "length": length, "precision": args.precision}
        rows.append(run_worker(__file__, spec, "--model", str(args.model)))
        print(rows[-1], flush=True)
    report = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "model": str(args.model),
        "rows": rows,
    }
    name = f"memory-{args.model.resolve().name}"
    save(name, report, markdown(report))
    print(markdown(report))


def markdown(report: dict) -> str:
    return (
        f"# Peak memory by prompt length: `{report['model']}`\n\n"
        f"{report['date']}; `python bench/memory.py`; one process per length, {NEW_TOKENS} new "
        f"tokens.\n\n{tables.memory(report)}\n"
    )


if __name__ == "__main__":
    main()
