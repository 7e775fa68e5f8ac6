"""Where the fast precision's first answer about a photo goes: vision and prefill by numerics,
chunk size and onnxruntime's tiled ("flash") GroupQueryAttention, with each operator's share.

On a real-size set, the copies are made once per numerics into a scratch folder. One run is one
process (``ORT_GQA_DISABLE_FLASH_ATTENTION`` is read by the process): the vision copy on the 13
crops a 1344x1008 photo uses, then the decoder copy on its 1,935 prompt positions (random
values: timing depends on shapes, not values) in chunks of ``chunk`` positions, each chunk
attending to those before it through the KV cache. Configurations are alternated, median of
``--runs``; one more run per configuration with onnxruntime's profiler gives the operator shares.

    python bench/prefill_profile.py --model /tmp/scale [--runs 3] [--before LABEL=DIR] [--name N]

``--before`` adds rows for copies made elsewhere (an earlier converter's, say), by label.

Writes ``bench/results/prefill_profile.{json,md}`` (``--name``: another stem, for another CPU).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import tables
from provenance import commit, save
from workers import parse_or_serve, run_worker

POSITIONS = 1935  # a 1344x1008 photo at 16 crops and its question
CROPS = 13  # the crops that photo's HD grid uses (1 global + 3 x 4)
FLASH_OFF = "ORT_GQA_DISABLE_FLASH_ATTENTION"
BEFORE = "before: "  # the numerics name of a --before row
COPIES = ".bench-copies"  # inside the model folder, beside .phi3v-cache
# (numerics, prefill chunk, GQA's tiled path): today's per-row copy and the chosen numerics at the
# engine's chunk; then the chosen numerics with other chunk sizes and with the tiled path off.
CONFIGS = (
    ("per row", 512, True),
    ("default", 512, True),
    ("default", 512, False),
    ("default", 256, True),
    ("default", POSITIONS, True),
)


def worker(model: str, numerics: str, chunk: int, profile: bool, before: dict[str, str]) -> dict:
    from phi3v import load_config

    label = numerics.removeprefix(BEFORE)
    copies = Path(before[label]) if numerics.startswith(BEFORE) else Path(model) / COPIES / numerics
    config = load_config(model)
    vision, decoder = copies / config.vision.filename, copies / config.decoder.filename
    ran = photo(model, vision, decoder, chunk, profile)
    result = {"vision": ran["vision"], "prefill": ran["prefill"]}
    if profile:
        for part in ("vision", "prefill"):
            found = operators(ran[f"{part}_trace"])
            result[f"{part}_ops"] = {op: entry["s"] for op, entry in found.items()}
    return result


def photo(model: str, vision_path: Path, decoder_path: Path, chunk: int, profile: bool) -> dict:
    """The photo through a vision copy and a decoder copy of ``model``'s: the 13 crops, then
    POSITIONS positions of random embeddings (timing depends on shapes, not values) in chunks of
    ``chunk``, each attending to those before it through the KV cache. The seconds of each
    (``vision``, ``prefill``) and, with ``profile``, each session's onnxruntime profile
    (``vision_trace``, ``prefill_trace``)."""
    import numpy as np
    import onnxruntime as ort

    from phi3v import load_config
    from phi3v.kv_cache import KVCache

    config = load_config(model)
    options = ort.SessionOptions()
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "fast")
    vision = ort.InferenceSession(str(vision_path), options)
    decoder = ort.InferenceSession(str(decoder_path), options)
    rng = np.random.default_rng(0)
    feeds = {
        config.vision.pixel_values: rng.standard_normal((1, CROPS, 3, 336, 336), np.float32),
        config.vision.image_sizes: np.array([[1008, 1344]], np.int64),
    }
    started = time.perf_counter()
    vision.run(None, feeds)
    vision_seconds = time.perf_counter() - started
    hidden = config.decoder.hidden_size
    embeds = rng.standard_normal((1, POSITIONS, hidden), np.float32) * 0.02
    cache = KVCache(config.decoder, POSITIONS, True, config.vocab_size)
    started = time.perf_counter()
    for start in range(0, POSITIONS, chunk):
        cache.run(decoder, np.ascontiguousarray(embeds[:, start : start + chunk]))
    prefill_seconds = time.perf_counter() - started
    cache.close()
    result = {"vision": vision_seconds, "prefill": prefill_seconds}
    if profile:
        result.update(vision_trace=vision.end_profiling(), prefill_trace=decoder.end_profiling())
    return result


GEMMS = ("MatMulIntegerToFloat", "MatMul")  # products whose work the profile's shapes give


def operators(trace: str) -> dict[str, dict[str, float]]:
    """Per operator type in an onnxruntime profile (its node events), the most time first:
    seconds, and multiply-adds where :func:`multiply_adds` can tell them."""
    totals: dict[str, dict[str, float]] = defaultdict(lambda: {"s": 0.0, "macs": 0.0})
    for event in json.loads(Path(trace).read_text()):
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        args = event["args"]
        entry = totals[args["op_name"]]
        entry["s"] += event["dur"] / 1e6
        entry["macs"] += multiply_adds(args["op_name"], args)
    return dict(sorted(totals.items(), key=lambda item: -item[1]["s"]))


def multiply_adds(op: str, args: dict) -> float:
    """The multiply-adds of one profiled node, from the shapes the profiler recorded: a MatMul
    (float or integer) whose weight is an initializer lists its activation [..., K] and its
    output [..., N]; MultiHeadAttention (no mask) its query [B, S, width], scored against S keys.
    0 for any other operator."""

    def shape(entries: list[dict], index: int) -> list[int]:
        return list(entries[index].values())[0]

    inputs, outputs = args.get("input_type_shape") or [], args.get("output_type_shape") or []
    if op in GEMMS and inputs and outputs:
        if op == "MatMul" and len(inputs) > 1:  # both operands computed: not a weight's GEMM
            return 0.0
        return float(math.prod(shape(inputs, 0)) * shape(outputs, 0)[-1])
    if op == "MultiHeadAttention" and inputs:
        batch, length, width = shape(inputs, 0)
        return float(2 * batch * length * length * width)
    return 0.0


def make_copies(model: str) -> None:
    """Vision and decoder copies of each numerics compared, in ``<model>/.bench-copies``."""
    from phi3v import convert, load_config

    config = load_config(model)
    root = Path(model) / COPIES
    numerics = {
        "per row": convert.numerics_for_this_cpu(convert.FastNumerics()),
        "default": convert.numerics_for_this_cpu(),
    }
    for name, chosen in numerics.items():
        folder = root / name
        key, made_by = (
            folder / "numerics.json",
            f"converter {convert.CONVERTER_VERSION}, {chosen!r}",
        )
        if key.exists() and key.read_text() == made_by:
            continue
        folder.mkdir(parents=True, exist_ok=True)
        vision, decoder = config.path(config.vision.filename), config.path(config.decoder.filename)
        convert.convert_model(vision, folder / vision.name, chosen.vision)
        convert.convert_model(
            decoder, folder / decoder.name, chosen.decoder, last_position_output="logits"
        )
        key.write_text(made_by)


def measure(model: str, runs: int, before: dict[str, str]) -> list[dict]:
    """Alternate every configuration ``runs`` times, then profile each once."""
    script = Path(__file__)
    configs = [(BEFORE + label, 512, True) for label in before] + list(CONFIGS)
    times: dict[tuple, list[dict]] = defaultdict(list)
    base = {"model": model, "before": before}
    for _ in range(runs):
        for numerics, chunk, flash in configs:
            spec = {**base, "numerics": numerics, "chunk": chunk, "profile": False}
            times[numerics, chunk, flash].append(_run(script, spec, flash))
    rows = []
    for numerics, chunk, flash in configs:
        spec = {**base, "numerics": numerics, "chunk": chunk, "profile": True}
        profiled = _run(script, spec, flash)
        done = times[numerics, chunk, flash]
        prefill_ops = profiled["prefill_ops"]
        rows.append(
            {
                "numerics": numerics,
                "chunk": chunk,
                "flash": flash,
                "vision": statistics.median(r["vision"] for r in done),
                "prefill": statistics.median(r["prefill"] for r in done),
                "runs": done,
                "prefill_ops": prefill_ops,
                "vision_ops": profiled["vision_ops"],
                "attention_share": prefill_ops.get("GroupQueryAttention", 0.0)
                / max(sum(prefill_ops.values()), 1e-9),
            }
        )
        print(rows[-1]["numerics"], chunk, flash, rows[-1]["vision"], rows[-1]["prefill"])
    return rows


def _run(script: Path, spec: dict, flash: bool) -> dict:
    saved = os.environ.pop(FLASH_OFF, None)
    if not flash:
        os.environ[FLASH_OFF] = "1"
    try:
        return run_worker(script, spec)
    finally:
        os.environ.pop(FLASH_OFF, None)
        if saved is not None:
            os.environ[FLASH_OFF] = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a real-size set (python -m phi3v.testing DIR --size real)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--name", default="prefill_profile", help="results file stem (another CPU's, say)"
    )
    parser.add_argument(
        "--before",
        action="append",
        default=[],
        metavar="LABEL=DIR",
        help="a folder of copies made elsewhere (an earlier converter), timed as one more row",
    )
    if (args := parse_or_serve(parser, worker)) is None:
        return
    if not args.model:
        parser.error("--model is required")
    before = dict(entry.partition("=")[::2] for entry in args.before)
    if not all(before) or not all(Path(folder).is_dir() for folder in before.values()):
        parser.error(f"--before takes LABEL=DIR with an existing folder, got {args.before}")
    from phi3v import convert, machine

    report = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit(),
        "cpu": machine.describe_cpu(),
        "command": f"python bench/prefill_profile.py --model {args.model} --runs {args.runs}"
        + (f" --name {args.name}" if args.name != "prefill_profile" else "")
        + "".join(f" --before {entry}" for entry in args.before),
        "runs": args.runs,
        "default_numerics": {
            "vision": convert.numerics_for_this_cpu().vision.describe(),
            "decoder": convert.numerics_for_this_cpu().decoder.describe(),
        },
        "load_before": os.getloadavg(),
    }
    make_copies(args.model)
    report["rows"] = measure(args.model, args.runs, before)
    report["load_after"] = os.getloadavg()
    save(args.name, report, tables.fast_profile(report))
    print(tables.fast_profile(report))


if __name__ == "__main__":
    main()
