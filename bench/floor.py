"""The least time a photo's fast first answer can take on this CPU, from its instructions' peaks
(issue 16: whether 0.30x onnxruntime-genai on a VNNI-only CPU, or 0.12x on AMX, is in reach).

Two measurements, each in its own process:

* **peaks** (``peak.c``, built with gcc): multiply-adds per second of each arithmetic
  instruction the CPU has (int8 dot products on AMX tiles, AVX-512 VNNI, AVX-VNNI or AVX2; fp32
  FMA; bf16 dot products), on as many threads as cores, from registers. No GEMM or attention
  built on an instruction can go faster than it.
* **the work**: the product's fast copies (``convert.fast_models``) of a real-size set run the
  photo as ``prefill_profile.py`` does (the vision copy on the 13 crops of a 1344x1008 photo,
  then the decoder copy on its 1,935 positions in the engine's chunks of 512, GroupQueryAttention
  as by default), under onnxruntime's profiler: per operator the seconds, and for the products
  the multiply-adds, from the shapes the profiler records (a MatMul's rows x K from its input,
  N from its output; MultiHeadAttention's Q·Kᵀ and P·V from its query). GroupQueryAttention's
  work is counted from the chunks: what it computes (each chunk's queries against every key up
  to the chunk's end) and the causal part a kernel that skips the rest must do.

The floor is the integer GEMMs' work at the int8 peak plus attention's causal work at the fp32
peak (and, as a bound for a kernel in bf16, at the bf16 peak), with every other operator free;
set against onnxruntime-genai's first answer on the same kind of CPU (``results/scale*.json``).

    python bench/floor.py --model /tmp/scale [--name floor-vnni]

Writes ``bench/results/<name>.{json,md}``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import time
from pathlib import Path

import native
import prefill_profile
from provenance import save
from workers import fast_copies_of, parse_or_serve, run_worker, stamp

FLAGS = {"amx_int8", "amx_tile", "avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16"}
# (function in peak.c, the flags it needs, what it is); the int8 ones in the order onnxruntime's
# u8s8 GEMM prefers them, so the first this CPU has is the one its integer GEMMs run on.
INT8 = (
    ("amx_int8", {"amx_int8", "amx_tile"}, "AMX tdpbusd"),
    ("int8_vnni512", {"avx512_vnni"}, "AVX-512 VNNI vpdpbusd"),
    ("int8_vnni256", {"avx_vnni"}, "AVX-VNNI vpdpbusd"),
    ("int8_avx2", {"avx2"}, "AVX2 vpmaddubsw + vpmaddwd"),
)
FP32 = (
    ("fp32_fma512", {"avx512f"}, "AVX-512 FMA"),
    ("fp32_fma256", {"avx2", "fma"}, "AVX2 FMA"),
)
BF16 = (("bf16_dot512", {"avx512_bf16"}, "AVX-512 BF16 vdpbf16ps"),)


def build() -> Path:
    """``peak.c`` compiled into a scratch folder, as a library."""
    return native.build("peak.c", "peak.so", "-fopenmp", "-shared", "-fPIC")


def peaks(threads: int, seconds: float = 0.3, calls: int = 5) -> dict[str, dict]:
    """Per instruction this CPU has: its best multiply-adds per second over ``calls`` calls of
    about ``seconds`` each, on ``threads`` threads (None where Linux refused AMX's tiles)."""
    from phi3v import machine

    library = ctypes.CDLL(str(build()))
    flags = machine.cpu_flags()
    found = {}
    for name, needs, what in INT8 + FP32 + BF16:
        if not needs <= flags:
            continue
        function = getattr(library, name)
        function.restype, function.argtypes = ctypes.c_int64, [ctypes.c_int64, ctypes.c_int]
        if function(1, 1) < 0:  # AMX: the kernel refused the tile state
            found[name] = {"what": what, "per_second": None}
            continue
        iterations, best = 1000, 0.0
        while True:  # size a call to about ``seconds``
            started = time.perf_counter()
            function(iterations, threads)
            if time.perf_counter() - started > seconds / 4:
                break
            iterations *= 4
        for _ in range(calls):
            started = time.perf_counter()
            done = function(iterations, threads)
            best = max(best, done / (time.perf_counter() - started))
        found[name] = {"what": what, "per_second": best}
    return found


def best(found: dict[str, dict], group: tuple) -> tuple[str, float] | None:
    """The first instruction of ``group`` measured here (what it is, its peak), or None."""
    for name, _, _ in group:
        if name in found and found[name]["per_second"]:
            return found[name]["what"], found[name]["per_second"]
    return None


def work(model: str) -> dict:
    """The photo through the fast copies (``prefill_profile.photo``, in the engine's chunks),
    profiled: seconds and multiply-adds by operator, and attention's work by count."""
    from phi3v import convert, load_config
    from phi3v.kv_cache import PREFILL_CHUNK

    config = load_config(model)
    copies = convert.fast_models(config)
    ran = prefill_profile.photo(model, copies.vision, copies.decoder, PREFILL_CHUNK, True)
    positions = prefill_profile.POSITIONS
    chunks = [(s, min(s + PREFILL_CHUNK, positions)) for s in range(0, positions, PREFILL_CHUNK)]
    decoder = config.decoder
    width = decoder.num_attention_heads * decoder.head_size
    layers = decoder.num_hidden_layers
    # Q·Kᵀ and P·V: per query, (keys it is scored against) x width, twice.
    computed = sum(2 * (end - start) * end * width for start, end in chunks) * layers
    causal = sum(2 * (p + 1) * width for p in range(positions)) * layers
    return {
        "vision_s": ran["vision"],
        "prefill_s": ran["prefill"],
        "vision": prefill_profile.operators(ran["vision_trace"]),
        "prefill": prefill_profile.operators(ran["prefill_trace"]),
        "attention": {"computed": computed, "causal": causal, "layers": layers, "width": width},
    }


def floor(result: dict) -> dict:
    """The floor of the first answer from ``result``'s peaks and work: seconds by part, each
    part's multiply-adds at the peak of the instruction it runs on, every other operator free."""
    found, measured = result["peaks"], result["work"]
    int8, fp32, bf16 = best(found, INT8), best(found, FP32), best(found, BF16)
    parts = (measured["vision"], measured["prefill"])

    def macs(op: str) -> float:
        return sum(part.get(op, {}).get("macs", 0.0) for part in parts)

    attention = measured["attention"]["causal"] + macs("MultiHeadAttention")
    seconds = {
        "integer GEMMs": macs("MatMulIntegerToFloat") / int8[1],
        "fp32 GEMMs (the rotations)": macs("MatMul") / fp32[1],
        "prefill attention, causal part": measured["attention"]["causal"] / fp32[1],
        "vision attention": macs("MultiHeadAttention") / fp32[1],
    }
    total = sum(seconds.values())
    return {
        "int8": int8,
        "fp32": fp32,
        "bf16": bf16,
        "seconds": seconds,
        "total": total,
        "total_bf16_attention": total - attention / fp32[1] + attention / bf16[1] if bf16 else None,
    }


def peer_first_answer(name: str) -> dict | None:
    """onnxruntime-genai's first answer about the photo in ``results/<name>.json`` (bench.py),
    with that run's CPU, or None when there is no such run."""
    path = Path(__file__).with_name("results") / f"{name}.json"
    if not path.exists():
        return None
    run = json.loads(path.read_text())
    entry = run["summary"].get("image", {}).get("genai-B")
    if entry is None:
        return None
    value = entry["ttft_s"]
    return {
        "name": name,
        "seconds": value["median"] if isinstance(value, dict) else value,
        "cpu": run["machine"]["cpu_model"],
        "simd": run["machine"]["simd"],
        "date": run["date"],
    }


def worker(part: str, model: str | None = None, threads: int = 1) -> dict:
    if part == "peaks":
        return peaks(threads)
    return work(model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a real-size set (python -m phi3v.testing)")
    parser.add_argument("--name", default="floor", help="results file stem (another CPU's, say)")
    parser.add_argument(
        "--peer",
        help="the bench.py results of this kind of CPU (default: scale-amx with AMX, else scale)",
    )
    if (args := parse_or_serve(parser, worker)) is None:
        return
    model = fast_copies_of(parser, args.model)
    from phi3v import machine

    load_before = os.getloadavg()
    threads = machine.physical_cores()
    found = run_worker(__file__, {"part": "peaks", "threads": threads})
    measured = run_worker(__file__, {"part": "work", "model": str(model)})
    peer = args.peer or ("scale-amx" if machine.has_amx() else "scale")
    command = f"python bench/floor.py --model {args.model} --name {args.name}"
    result = {
        **stamp(command, FLAGS, load_before),
        "threads": threads,
        "peaks": found,
        "work": measured,
        "peer": peer_first_answer(peer),
    }
    result["floor"] = floor(result)
    save(args.name, result, report(result))
    print(report(result))


def report(result: dict) -> str:
    """The results file's text: the peaks, the work by part, and the floor against the peer."""
    from tables import _table

    found, measured, least = result["peaks"], result["work"], result["floor"]
    rows = [
        [what, f"{entry['per_second'] / 1e9:,.0f}" if entry["per_second"] else "refused"]
        for entry in found.values()
        for what in [entry["what"]]
    ]
    peaks_table = _table(["instruction", "multiply-adds per second (G), all threads"], rows)
    vision, prefill = measured["vision"], measured["prefill"]
    attention = measured["attention"]

    def rate(macs: float, seconds: float, peak: float) -> str:
        return f"{macs / seconds / 1e9:,.0f} G/s ({macs / seconds / peak:.0%} of the peak)"

    int8, fp32 = least["int8"], least["fp32"]
    work_rows = []
    for label, ops, op, peak, name in (
        ("vision: integer GEMMs", vision, "MatMulIntegerToFloat", int8, "int8"),
        ("prefill: integer GEMMs", prefill, "MatMulIntegerToFloat", int8, "int8"),
        ("vision: fp32 GEMMs (rotations)", vision, "MatMul", fp32, "fp32"),
        ("prefill: fp32 GEMMs (rotations)", prefill, "MatMul", fp32, "fp32"),
        ("vision: MultiHeadAttention", vision, "MultiHeadAttention", fp32, "fp32"),
    ):
        entry = ops.get(op)
        if not entry or not entry["macs"]:
            continue
        work_rows.append(
            [
                label,
                f"{entry['macs'] / 1e12:.3f}",
                f"{entry['s']:.2f}",
                rate(entry["macs"], entry["s"], peak[1]),
                f"{entry['macs'] / peak[1]:.2f} ({name})",
            ]
        )
    gqa = prefill.get("GroupQueryAttention", {"s": 0.0})
    work_rows.append(
        [
            "prefill: GroupQueryAttention",
            f"{attention['computed'] / 1e12:.3f} computed, {attention['causal'] / 1e12:.3f} causal",
            f"{gqa['s']:.2f}",
            rate(attention["computed"], gqa["s"], fp32[1]) if gqa["s"] else "-",
            f"{attention['causal'] / fp32[1]:.2f} (fp32, the causal part)",
        ]
    )
    counted = {"MatMulIntegerToFloat", "MatMul", "MultiHeadAttention", "GroupQueryAttention"}
    rest = sum(e["s"] for ops in (vision, prefill) for op, e in ops.items() if op not in counted)
    work_rows.append(["every other operator", "-", f"{rest:.2f}", "-", "0 (assumed free)"])
    work_table = _table(
        ["part", "multiply-adds (T)", "measured s", "rate", "s at the peak"], work_rows
    )
    peer = result["peer"]
    text = f"""# The least time a photo's first answer can take here

{result["date"]}; phi3v {result["commit"]}; {result["cpu"]} (`{", ".join(result["flags"])}`);
{result["threads"]} threads; `{result["command"]}`; load average {result["load_before"][0]:.2f}
-> {result["load_after"][0]:.2f}.

Each instruction's peak, from registers (`bench/peak.c`, the best of 5 calls):

{peaks_table}

The photo's work in the fast copies (13 crops, 1,935 positions in chunks of 512), profiled by
onnxruntime in one process (by the wall clock, profiler included: vision
{measured["vision_s"]:.1f} s, prefill {measured["prefill_s"]:.1f} s):

{work_table}

**The floor: {least["total"]:.1f} s** with every multiply-add at its instruction's peak
({int8[0]} for the integer GEMMs, {fp32[0]} for the rest, attention only its causal part) and
every other operator free"""
    if least["total_bf16_attention"]:
        text += (
            f"; {least['total_bf16_attention']:.1f} s with attention on {least['bf16'][0]} at its "
            "peak instead"
        )
    text += "."
    if peer:
        ratio = least["total"] / peer["seconds"]
        text += (
            f" onnxruntime-genai took {peer['seconds']:.1f} s for the same first answer in "
            f"`{peer['name']}.md` ({peer['cpu']}, {peer['date'][:10]}): the floor is "
            f"**{ratio:.2f}x** its time"
        )
        if least["total_bf16_attention"]:
            text += f" ({least['total_bf16_attention'] / peer['seconds']:.2f}x with bf16 attention)"
        text += "."
    return text + "\n"


if __name__ == "__main__":
    main()
