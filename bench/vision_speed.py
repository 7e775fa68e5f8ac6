"""Candidates for the fast vision copy: error on the trained proxy beside speed at real size.

Each candidate is a :class:`~phi3v.integer_gemm.Numerics`. Its accuracy is a real integer-GEMM copy
of the DINOv2 ViT-S/14 int4 proxy on 11 photographs (mean relative feature error to truth, the same
int4 weights with fp32 activations, as a multiple of exact's, pooled over draws of the rounding
noise: ``bench/vision_proxy.py``, ``bench/accuracy.py``'s measure). Its speed is a copy of the
real-size vision model (CLIP ViT-L/14-336, random weights: timing depends on shapes, not values) on
17 crops (a square photo at 16 crops: 1 global + 4 x 4), ``--threads`` threads; the candidates
alternate in one process, median of ``--repeats`` after a warm-up; once on this CPU as it is, and
with AMX refused (bench/noamx.c), which is what a VNNI-only CPU runs. The targets (issue 15): error
at most 1.5x exact's, time at most 1.10x today's fast copy.

    python bench/vision_speed.py --model /tmp/scale   # ~15 min -> bench/results/vision_speed.*
    python bench/vision_speed.py --model /tmp/scale --name vision_speed-vnni  # on a VNNI-only CPU

The copies are made once into ``--copies`` (a scratch folder, never the model folder).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnxruntime as ort
import tables
import vision_proxy
from provenance import commit, save
from workers import report_result, run_worker

from phi3v import convert, integer_gemm, load_config, machine
from phi3v.sessions import SessionSettings, open_session

N = integer_gemm.Numerics
QKV, OUT, FC2 = "attention_in", "attention_out", "mlp_out"
BASELINE = "hadamard 32 (today's fast)"
CANDIDATES = {
    BASELINE: N(rotation=32),
    "hadamard 32, remainder on all": N(rotation=32, fine_weights=tuple(integer_gemm.ROLES)),
    "hadamard 64, remainder qkv+out": N(rotation=64, fine_weights=(QKV, OUT)),
    "hadamard 32, remainder qkv+out": N(rotation=32, fine_weights=(QKV, OUT)),
    "hadamard 64, remainder out+fc2": N(rotation=64, fine_weights=(OUT, FC2)),
    "hadamard 32, remainder out": N(rotation=32, fine_weights=(OUT,)),
    # By layer (Numerics.fine_layers): the last layer, whose rounding reaches the features
    # unmixed, carries the most error on the proxy (bench/vision_attribution.py), the first next.
    "hadamard 32, remainder last 2 layers+out": N(
        rotation=32, fine_weights=(OUT,), fine_layers=(-2, -1)
    ),
    "hadamard 32, remainder first+last layers+out": N(
        rotation=32, fine_weights=(OUT,), fine_layers=(0, -1)
    ),
    "hadamard 32, remainder first+last 2 layers+out": N(
        rotation=32, fine_weights=(OUT,), fine_layers=(0, -2, -1)
    ),
}
TARGET_ERROR = 1.5  # x exact's mean feature error on the proxy
TARGET_TIME = 1.10  # x today's fast copy at 17 crops
CROPS = 17
IMAGE_SIZE = (1344, 1344)  # height, width: a 4 x 4 grid of 336-pixel crops plus the global one


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a real-size set (python -m phi3v.testing)")
    parser.add_argument("--copies", type=Path, default=Path("/tmp/vision-speed-copies"))
    parser.add_argument("--candidates", nargs="*", default=list(CANDIDATES), choices=CANDIDATES)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--name", default="vision_speed", help="results file stem (default: %(default)s)"
    )
    vision_proxy.add_draws_argument(parser)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        report_result(timing(json.loads(args.worker)))
        return
    if BASELINE not in args.candidates:
        args.candidates.insert(0, BASELINE)
    candidates = {name: CANDIDATES[name] for name in args.candidates}
    result = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit(),
        "cpu": machine.describe_cpu(),
        "command": "python bench/vision_speed.py " + " ".join(sys.argv[1:]),
        "crops": CROPS,
        "threads": args.threads,
        "repeats": args.repeats,
        "baseline": BASELINE,
        "numerics": {name: asdict(numerics) for name, numerics in candidates.items()},
        "load_before": os.getloadavg(),
    }
    started = time.perf_counter()
    result["accuracy"] = proxy_accuracy(candidates, args.draws)
    result["draws"] = args.draws
    if args.model:
        copies = real_copies(args.model, args.copies, candidates)
        spec = {"model": str(args.model), "copies": copies, "threads": args.threads}
        spec["repeats"] = args.repeats
        result["speed"] = {"this CPU": run_worker(__file__, spec)}
        if machine.has_amx():
            refused = run_worker(__file__, spec, without_amx=True)
            result["speed"]["AMX refused (VNNI only)"] = refused
        result["speed_detail"] = {k: v.pop("runs") for k, v in result["speed"].items()}
    else:
        result["speed"] = {}
    result["load_after"] = os.getloadavg()
    result["seconds"] = round(time.perf_counter() - started)
    # The first answer is derived in docs/PERFORMANCE.md, from a bench.py run (bench/studies.py).
    text = tables.vision_speed(result, TARGET_ERROR, TARGET_TIME, first_answer={})
    save(args.name, result, f"{_head(result)}\n\n{text}")
    print(text)


def proxy_accuracy(candidates: dict[str, integer_gemm.Numerics], draws: int) -> dict:
    """Each candidate's real copy on the proxy: its error as a multiple of exact's, pooled over
    the photos and ``draws`` draws of the rounding noise (bench/vision_proxy.py)."""
    with tempfile.TemporaryDirectory() as work:
        proxy = vision_proxy.VisionProxy(Path(work) / "int4", draws)
        result = {}
        for index, (name, numerics) in enumerate(candidates.items()):
            target = Path(work) / f"copy{index}.onnx"
            convert.convert_model(proxy.source, target, convert.stored_for_this_cpu(numerics))
            result[name] = proxy.ratio(proxy.errors(proxy.session(target)))
    return result


def real_copies(model: Path, folder: Path, candidates: dict) -> dict[str, str]:
    """A copy of the real-size vision model per candidate, made once (a numerics file beside)."""
    config = load_config(model)
    source = config.path(config.vision.filename)
    paths = {}
    for name, numerics in candidates.items():
        numerics = convert.stored_for_this_cpu(numerics)
        target = folder / numerics.describe().replace(", ", "_").replace(" ", "-") / source.name
        stamp = target.with_name("numerics.json")
        wanted = json.dumps(asdict(numerics))
        if not (stamp.exists() and stamp.read_text() == wanted and target.exists()):
            target.parent.mkdir(parents=True, exist_ok=True)
            started = time.perf_counter()
            convert.convert_model(source, target, numerics, what=name)
            stamp.write_text(wanted)
            print(f"{name}: copy made in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        paths[name] = str(target)
    return paths


def timing(spec: dict) -> dict:
    """In the worker: seconds of each copy on CROPS crops, alternated, median of the repeats."""
    config = load_config(spec["model"])
    settings = SessionSettings(num_threads=spec["threads"])
    sessions = {name: open_session(Path(path), settings) for name, path in spec["copies"].items()}
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((1, CROPS, 3, 336, 336)).astype(np.float32)
    feeds = {
        config.vision.pixel_values: pixels,
        config.vision.image_sizes: np.array([IMAGE_SIZE], np.int64),
    }
    warm = {
        config.vision.pixel_values: pixels[:, :2],
        config.vision.image_sizes: np.array([[336, 336]], np.int64),  # 1 global + 1 crop
    }
    for session in sessions.values():
        session.run(None, warm)
    runs: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(spec["repeats"]):
        for name, session in sessions.items():
            started = time.perf_counter()
            session.run(None, feeds)
            runs[name].append(time.perf_counter() - started)
            print(f"{name}: {runs[name][-1]:.2f} s", file=sys.stderr, flush=True)
    medians = {name: statistics.median(times) for name, times in runs.items()}
    return {**medians, "runs": runs}


def _head(result: dict) -> str:
    return (
        f"{result['date']}; phi3v {result['commit']}; {result['cpu']}; `{result['command']}`; "
        f"vision copies of the real-size set on {result['crops']} crops, {result['threads']} "
        f"threads, median of {result['repeats']} alternated runs; load average "
        f"{result['load_before'][0]:.2f} -> {result['load_after'][0]:.2f}. Targets: error at most "
        f"{TARGET_ERROR}x exact's, time at most {TARGET_TIME:.2f}x {result['baseline']}."
    )


if __name__ == "__main__":
    ort.set_default_logger_severity(3)
    main()
