"""OpenVINO beside onnxruntime on the same ONNX files: decoder prefill and decode, vision.

What an Intel user would try instead of onnxruntime: OpenVINO's CPU plugin reading the model
folder's ONNX files directly (threads = cores, the plugin's default precision hint: bf16 where the
CPU has AMX or AVX512-BF16, else fp32; the results record it). Bare model calls on random inputs
(time depends on shapes, not values):

* **decoder**: a prefill of ``--positions`` positions (random ``inputs_embeds``, empty past), then
  one decode step on its keys and values;
* **vision**: ``pixel_values`` of each ``--crops`` count (the global view plus an h x w grid of
  tiles, ``image_sizes`` to match).

Beside each, onnxruntime on the file as it is (``exact``) and, where the folder has them, on the
integer-GEMM copies in ``.phi3v-cache/fast-*/`` (``fast``; it decodes on the exact decoder, as
its decode row says). Where OpenVINO cannot read a file (2026.4 fails on ``vision.onnx``'s ``Loop``)
the failure is recorded, the graph is cut at the ``Loop``, and the parts before and after it run
on OpenVINO with the ``Loop`` (the HD layout: copies, no arithmetic) on onnxruntime between them;
the results say exactly what was timed.

One process per runtime, task and repeat, the runtimes alternated. Each process loads the model,
warms up on a small input (so the timed call is the first of its size, as a new prompt or image
is in use), times one call (the decode step: the median of a few) and reports its peak RSS
(``ru_maxrss``). Every output is compared with exact's (relative L2 difference).

    python bench/openvino_peer.py --model /tmp/scale [--positions 1935] [--crops 13,17]
                                  [--repeats 3] [--results bench/results]

Writes ``<results>/openvino.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import re
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import numpy as np
import tables
from provenance import RESULTS, commit, save
from workers import report_result, run_worker

from phi3v.config import DecoderConfig, load_config
from phi3v.image import TILE
from phi3v.machine import describe_cpu

REPO = Path(__file__).resolve().parent.parent
RUNTIMES = ("openvino", "exact", "fast")
DEFAULT_POSITIONS = 1935  # the 1344x1008 photo's prompt (bench/bench.py's image case)
DEFAULT_CROPS = "13,17"  # that photo (12 tiles + the global view), and the 16-tile maximum
WARMUP_POSITIONS = 16  # a short prefill first, untimed: thread pools and allocators up
WARMUP_CROPS = 2  # the smallest image, untimed: the global view and one tile
DECODE_STEPS = 5  # the same decode step timed this many times, median
EMBED_SCALE = 0.02  # about the spread of Phi-3's embedding rows
PACKAGES = ("openvino", "onnxruntime", "onnx", "numpy")
OPENVINO_PROPERTIES = (
    "INFERENCE_PRECISION_HINT",
    "INFERENCE_NUM_THREADS",
    "PERFORMANCE_HINT",
    "NUM_STREAMS",
    "DYNAMIC_QUANTIZATION_GROUP_SIZE",
    "KV_CACHE_PRECISION",
)
MIB = 1 << 20
# OpenVINO's error texts start with the source locations that raised them; the cause follows.
SOURCE_LOCATION = re.compile(r"(Exception from|Check '.*' failed at) src/\S+:\d+:?")
NO_FAST_COPIES = (
    "no .phi3v-cache/fast-*/ copies in the model folder: make them once with "
    "`python -m phi3v --model DIR --precision fast --prompt Hi --max-new-tokens 1`"
)
FAST_HAS_NO_DECODE = (
    "not applicable: fast decodes on the exact int4 decoder (its prompt copy keeps the last "
    "position's logits only)"
)


# --- one model, either runtime ------------------------------------------------------------------


Call = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def load(path: Path, runtime: str, threads: int) -> tuple[Call, Call, dict]:
    """The model at ``path`` on ``runtime`` ("openvino" or onnxruntime): two calls (OpenVINO's on
    two requests, so the first call's outputs stay valid while the second runs) and the
    runtime's settings as it reports them."""
    if runtime != "openvino":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        inputs = {i.name for i in session.get_inputs()}

        def run(feeds):
            mine = {name: array for name, array in feeds.items() if name in inputs}
            return dict(zip(names, session.run(None, mine), strict=True))

        return run, run, {"intra_op_num_threads": str(threads)}
    import openvino as ov

    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": threads})
    settings = {key: _setting(compiled.get_property(key)) for key in OPENVINO_PROPERTIES}
    return _request(compiled), _request(compiled), settings


def _setting(value) -> str:
    import openvino as ov

    return value.get_type_name() if isinstance(value, ov.Type) else str(value)  # "bf16"


def _request(compiled) -> Call:
    request = compiled.create_infer_request()
    ports = [(port, port.get_any_name()) for port in compiled.outputs]
    inputs = {name for port in compiled.inputs for name in port.get_names()}

    def run(feeds):
        mine = {name: array for name, array in feeds.items() if name in inputs}
        # In and out shared with numpy, as onnxruntime reads numpy inputs in place and hands
        # its outputs over: no copies of the KV cache inside a timed call.
        result = request.infer(mine, share_inputs=True, share_outputs=True)
        return {name: result[port] for port, name in ports}

    return run


def _timed(call: Call, feeds: dict) -> tuple[dict, float]:
    started = time.perf_counter()
    result = call(feeds)
    return result, time.perf_counter() - started


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MIB


def error_summary(err: BaseException) -> str:
    """The cause in a runtime's error text, on one line (OpenVINO's start with source lines)."""
    text = SOURCE_LOCATION.sub(" ", str(err))
    words = " ".join(text.split())
    return words[:300] or type(err).__name__


# --- the decoder --------------------------------------------------------------------------------


def prefill_feeds(cfg: DecoderConfig, embeds: np.ndarray) -> dict[str, np.ndarray]:
    """Decoder inputs for a prefill of ``embeds`` [1, S, hidden] with an empty past."""
    empty = np.zeros((1, cfg.num_key_value_heads, 0, cfg.head_size), np.float32)
    feeds = {
        cfg.inputs_embeds: np.ascontiguousarray(embeds),
        cfg.attention_mask: np.ones((1, embeds.shape[1]), np.int64),
    }
    for layer in range(cfg.num_hidden_layers):
        feeds.update(dict.fromkeys(cfg.past_names(layer), empty))
    return feeds


def decode_feeds(cfg: DecoderConfig, embeds: np.ndarray, prefill: dict) -> dict[str, np.ndarray]:
    """Decoder inputs for one step of ``embeds`` [1, 1, hidden] after a prefill's outputs."""
    past = prefill[cfg.present_names(0)[0]].shape[2]
    feeds = {
        cfg.inputs_embeds: np.ascontiguousarray(embeds),
        cfg.attention_mask: np.ones((1, past + 1), np.int64),
    }
    for layer in range(cfg.num_hidden_layers):
        for name, present in zip(cfg.past_names(layer), cfg.present_names(layer), strict=True):
            feeds[name] = prefill[present]
    return feeds


def decoder_worker(spec: dict) -> dict:
    """Load the decoder, warm up, time a prefill of ``positions`` and then a decode step."""
    cfg = load_config(spec["model"]).decoder
    positions = spec["positions"]
    rng = np.random.default_rng(positions)
    embeds = rng.standard_normal((1, positions + 1, cfg.hidden_size)) * EMBED_SCALE
    embeds = embeds.astype(np.float32)
    report: dict = {}
    saved: dict[str, np.ndarray] = {}
    try:
        started = time.perf_counter()
        first, second, report["settings"] = load(
            Path(spec["path"]), spec["runtime"], spec["threads"]
        )
        report.update(load_s=time.perf_counter() - started, loaded_mib=_peak_mib())
        first(prefill_feeds(cfg, embeds[:, :WARMUP_POSITIONS]))
        outputs, report["prefill_s"] = _timed(first, prefill_feeds(cfg, embeds[:, :positions]))
        report["prefill_peak_mib"] = _peak_mib()
        saved["prefill"] = np.array(outputs[cfg.logits][0, -1])  # a copy: buffers get reused
        if spec["runtime"] != "fast":
            feeds = decode_feeds(cfg, embeds[:, positions:], outputs)
            second(feeds)
            steps = [_timed(second, feeds) for _ in range(DECODE_STEPS)]
            report["decode_s"] = statistics.median(seconds for _, seconds in steps)
            report["peak_mib"] = _peak_mib()
            saved["decode"] = np.array(steps[-1][0][cfg.logits][0, -1])
    except Exception as err:  # the runtime's own exception types: recorded, not raised
        report.update(error=error_summary(err), error_text=str(err))
    np.savez(spec["scratch"], **saved)
    return report


# --- the vision model --------------------------------------------------------------------------


def tile_grid(crops: int) -> tuple[int, int]:
    """(rows, columns) of tiles for ``crops`` entries of pixel_values (one is the global view):
    as square as the count allows, wider than tall (12 tiles: 3 x 4, as a 1344x1008 photo)."""
    tiles = crops - 1
    columns = math.ceil(math.sqrt(tiles))
    while tiles % columns:
        columns += 1
    return tiles // columns, columns


def vision_feeds(spec: dict, crops: int) -> dict[str, np.ndarray]:
    """Random pixel values of ``crops`` crops and the image size of their tile grid."""
    rows, columns = tile_grid(crops)
    pixels = np.random.default_rng(crops).standard_normal((1, crops, 3, TILE, TILE))
    return {
        spec["pixel_values"]: pixels.astype(np.float32),
        spec["image_sizes"]: np.array([[rows * TILE, columns * TILE]], np.int64),
    }


def _vision_call(spec: dict, report: dict) -> Callable[[dict], tuple[np.ndarray, float]]:
    """(features, seconds timed) for one call: the whole file, or OpenVINO's parts around the
    Loop with the Loop on onnxruntime (its time in ``report["loop_s"]``, not in the seconds)."""
    runtime, threads, features = spec["runtime"], spec["threads"], spec["features"]
    try:
        whole, _, report["settings"] = load(Path(spec["path"]), runtime, threads)
    except Exception as err:
        if not spec.get("parts"):
            raise
        report["whole_file_error"] = error_summary(err)
        report["whole_file_error_text"] = str(err)
    else:

        def whole_file(feeds):
            outputs, seconds = _timed(whole, feeds)
            return outputs[features], seconds

        return whole_file
    parts = spec["parts"]
    encoder, _, report["settings"] = load(Path(parts["encoder"]["path"]), runtime, threads)
    layout, _, _ = load(Path(parts["layout"]["path"]), "exact", threads)
    projection, _, _ = load(Path(parts["projection"]["path"]), runtime, threads)

    def call(feeds):
        merged, first = _timed(encoder, feeds)
        rows, between = _timed(layout, {**feeds, **merged})
        result, last = _timed(projection, rows)
        report.setdefault("loop_s", []).append(between)
        return result[features], first + last

    return call


def vision_worker(spec: dict) -> dict:
    """Load the vision model (or OpenVINO's parts of it), warm up, time each crop count."""
    report: dict = {"crops": {}}
    saved: dict[str, np.ndarray] = {}
    try:
        started = time.perf_counter()
        call = _vision_call(spec, report)
        report.update(load_s=time.perf_counter() - started, loaded_mib=_peak_mib())
        call(vision_feeds(spec, WARMUP_CROPS))
        report.pop("loop_s", None)
        for crops in spec["crops"]:
            features, seconds = call(vision_feeds(spec, crops))
            report["crops"][str(crops)] = {"seconds": seconds, "peak_mib": _peak_mib()}
            saved[f"crops{crops}"] = np.array(features)  # a copy: the next call reuses buffers
    except Exception as err:  # the runtime's own exception types: recorded, not raised
        report.update(error=error_summary(err), error_text=str(err))
    np.savez(spec["scratch"], **saved)
    return report


# --- cutting vision.onnx at its Loop -----------------------------------------------------------


def cut_at_loop(source: Path, folder: Path) -> dict[str, dict] | None:
    """Split the model at ``source`` around its one ``Loop`` into three files in ``folder``:
    ``encoder`` (the graph inputs -> the tensors the Loop reads), ``layout`` (those tensors and
    the graph inputs -> the Loop's output) and ``projection`` (the Loop's output -> the graph
    outputs). Each part: its ``path``, ``inputs`` and ``outputs``. None when there is no Loop."""
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(str(source), load_external_data=False))
    graph = model.graph
    loops = [node for node in graph.node if node.op_type == "Loop"]
    if not loops:
        return None
    if len(loops) > 1:
        raise ValueError(f"{source} has {len(loops)} Loops; the cut expects one")
    loop = loops[0]
    produced = {name for node in graph.node for name in node.output}
    read = [name for name in _node_inputs(loop) if name in produced]
    graph_inputs = [value.name for value in graph.input]
    outputs = [value.name for value in graph.output]
    cuts = {
        "encoder": (graph_inputs, read),
        "layout": (read + graph_inputs, [loop.output[0]]),
        "projection": ([loop.output[0]], outputs),
    }
    parts = {}
    for part, (inputs, part_outputs) in cuts.items():
        path = folder / f"{part}.onnx"
        cut = subgraph(model, inputs, part_outputs, loop)
        _save(cut, source.parent, path)
        names = [value.name for value in cut.graph.input]
        parts[part] = {"path": str(path), "inputs": names, "outputs": part_outputs}
    return parts


def _node_inputs(node) -> list[str]:
    """The names ``node`` reads: its inputs and what its subgraphs read from outer scopes."""
    import onnx

    names = [name for name in node.input if name]
    for attribute in node.attribute:
        bodies = [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else attribute.graphs
        for body in bodies:
            local = {v.name for v in body.input} | {t.name for t in body.initializer}
            for inner in body.node:
                names += [name for name in _node_inputs(inner) if name not in local]
                local.update(inner.output)
    return list(dict.fromkeys(names))


def subgraph(model, inputs: list[str], outputs: list[str], loop):
    """The nodes of ``model`` that compute ``outputs`` from ``inputs`` (and initializers)."""
    import onnx

    graph = model.graph
    needed, kept, stop = set(outputs), [], set(inputs)
    for node in reversed(graph.node):
        if any(name in needed and name not in stop for name in node.output):
            kept.append(node)
            needed.update(_node_inputs(node))
    initializers = [tensor for tensor in graph.initializer if tensor.name in needed]
    used_inputs = [name for name in inputs if name in needed or name in outputs]
    part = onnx.helper.make_graph(
        list(reversed(kept)),
        graph.name,
        [_value_info(model, name, loop) for name in used_inputs],
        [_value_info(model, name, loop) for name in outputs],
        initializers,
    )
    cut = onnx.helper.make_model(part, opset_imports=model.opset_import)
    cut.ir_version = model.ir_version
    return cut


def _value_info(model, name: str, loop):
    """The type of tensor ``name``: declared, inferred, or (for the Loop's output, whose shape
    inference leaves unranked) the Loop body's carried output."""
    graph = model.graph
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if value.name == name and value.type.tensor_type.HasField("shape"):
            return value
    if name in loop.output:
        body = next(a.g for a in loop.attribute if a.name == "body")
        carried = body.output[1 + list(loop.output).index(name)]
        copy = type(carried)()
        copy.CopyFrom(carried)
        copy.name = name
        return copy
    raise ValueError(f"no type for {name!r} in the vision model; cannot cut it there")


def _save(model, source_folder: Path, target: Path) -> None:
    """Write ``model`` with its weights (read from ``source_folder``) as external data."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    load_external_data_for_model(model, str(source_folder))
    onnx.save_model(model, str(target), save_as_external_data=True, location=target.name + ".data")


# --- the run -----------------------------------------------------------------------------------


def fast_copies(model: Path) -> Path | None:
    """The folder of the model's integer-GEMM copies (the newest complete one), or None."""
    found = [p.parent for p in (model / ".phi3v-cache").glob("fast-*/manifest.json")]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def run_one(spec: dict, model: Path) -> dict:
    """One worker process; a crash (say, killed for memory) becomes the run's error."""
    try:
        return run_worker(__file__, spec, "--model", str(model))
    except subprocess.CalledProcessError as err:
        lines = (err.stderr or "").strip().splitlines()
        cause = f"signal {-err.returncode}" if err.returncode < 0 else f"exit {err.returncode}"
        last = lines[-1] if lines else "no error text"
        return {"error": f"the worker process ended with {cause}: {last}", "error_text": err.stderr}


def specs(args, scratch: Path, parts: dict | None) -> list[dict]:
    """The worker specs of every (task, runtime) pair, in the order of one round."""
    config = load_config(args.model)
    fast = fast_copies(args.model)
    threads = args.threads
    files = {
        "decoder": config.path(config.decoder.filename),
        "vision": config.path(config.vision.filename),
    }
    found = []
    for task, path in files.items():
        for runtime in args.runtimes:
            source = fast / path.name if runtime == "fast" and fast else path
            spec = {
                "task": task,
                "runtime": runtime,
                "model": str(args.model),
                "path": str(source),
                "threads": threads,
                "scratch": str(scratch / f"{task}-{runtime}.npz"),
                "skip": NO_FAST_COPIES if runtime == "fast" and not fast else None,
            }
            if task == "decoder":
                spec["positions"] = args.positions
            else:
                spec.update(
                    crops=args.crops,
                    pixel_values=config.vision.pixel_values,
                    image_sizes=config.vision.image_sizes,
                    features=config.vision.features,
                    parts=parts if runtime == "openvino" else None,
                )
            found.append(spec)
    return found


def measure(args) -> dict:
    """Run every worker ``repeats`` times, alternated; gather the runs and the comparisons."""
    report = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": "python bench/openvino_peer.py " + shlex.join(sys.argv[1:]),
        "model": str(args.model),
        "cpu": describe_cpu(),
        "threads": args.threads,
        "versions": versions(),
        "positions": args.positions,
        "crops": args.crops,
        "repeats": args.repeats,
        "fast_copies": str(fast_copies(args.model) or ""),
        "loadavg_start": _loadavg(),
    }
    with tempfile.TemporaryDirectory(prefix="openvino-peer-") as tmp:
        scratch = Path(tmp)
        config = load_config(args.model)
        wanted = "openvino" in args.runtimes  # the cut is OpenVINO's fallback only
        report["vision_cut"] = _cut(config.path(config.vision.filename), scratch) if wanted else {}
        parts = report["vision_cut"].get("parts")
        plan = specs(args, scratch, parts)
        runs: dict[tuple[str, str], list[dict]] = {(s["task"], s["runtime"]): [] for s in plan}
        for _ in range(args.repeats):
            for spec in plan:
                done = runs[spec["task"], spec["runtime"]]
                if spec["skip"] or any("error" in run for run in done):
                    continue  # a failure repeats itself: recorded once
                done.append(run_one(spec, args.model))
                print(spec["task"], spec["runtime"], _brief(done[-1]), flush=True)
        outputs = {key: _outputs(scratch / f"{key[0]}-{key[1]}.npz") for key in runs}
    report["loadavg_end"] = _loadavg()
    report["runs"] = {f"{task} {runtime}": done for (task, runtime), done in runs.items()}
    report["rows"] = rows(args, runs, outputs)
    return report


def _cut(vision: Path, folder: Path) -> dict:
    try:
        parts = cut_at_loop(vision, folder)
    except Exception as err:  # onnx's own errors: recorded; OpenVINO then runs the file only
        return {"error": error_summary(err)}
    return {"parts": parts} if parts else {}


def _outputs(path: Path) -> dict[str, np.ndarray]:
    if not path.exists():
        return {}
    with np.load(path) as data:
        return {name: data[name] for name in data.files}


def _brief(run: dict) -> str:
    keep = ("error", "load_s", "prefill_s", "decode_s", "crops", "peak_mib")
    return json.dumps({k: run[k] for k in keep if k in run})[:300]


def rows(args, runs: dict, outputs: dict) -> list[dict]:
    """One row per (measurement, runtime): median seconds or why it did not run, peak RSS and
    the output's difference from exact's."""
    measurements = [("decoder", "prefill", None), ("decoder", "decode", None)]
    measurements += [("vision", "vision", crops) for crops in args.crops]
    found = []
    for task, what, crops in measurements:
        for runtime in args.runtimes:
            done = runs[task, runtime]
            key = what if crops is None else f"crops{crops}"
            row = {
                "measurement": _measurement_name(what, crops, args.positions),
                "runtime": runtime,
                "timed": _timed_part(task, runtime, done),
            }
            row.update(_result(done, what, crops, runtime))
            row["difference_from_exact"] = _difference(outputs, task, runtime, key)
            found.append(row)
    return found


def _measurement_name(what: str, crops: int | None, positions: int) -> str:
    if what == "prefill":
        return f"prefill, {positions:,} positions"
    if what == "decode":
        return f"decode step after {positions:,}"
    rows, columns = tile_grid(crops)
    return f"vision, {crops} crops ({rows}x{columns} tiles + global)"


def _timed_part(task: str, runtime: str, done: list[dict]) -> str:
    if task == "decoder":
        return "decoder file" if runtime != "fast" else "fast prompt copy of the decoder"
    cut = any("whole_file_error" in run for run in done)
    if cut:
        return "encoder and projection: the Loop cut out (below)"
    return "vision file" if runtime != "fast" else "fast copy of the vision file"


def _result(done: list[dict], what: str, crops: int | None, runtime: str) -> dict:
    if what == "decode" and runtime == "fast":
        return {"skipped": FAST_HAS_NO_DECODE}
    if not done:
        return {"skipped": NO_FAST_COPIES}
    measured = [_measured(run, what, crops) for run in done]
    failed = next((run for run, m in zip(done, measured, strict=True) if m is None), None)
    if failed:  # a run that stopped before this measurement: its error is this row's
        return {"error": failed.get("error", "no result")}
    result = {
        "seconds": [seconds for seconds, _ in measured],
        "median_s": statistics.median(seconds for seconds, _ in measured),
        "peak_rss_mib": max(peak for _, peak in measured),
        "load_s": statistics.median(run["load_s"] for run in done),
        "settings": done[0].get("settings", {}),
    }
    if crops is not None and "loop_s" in done[0]:
        index = list(done[0]["crops"]).index(str(crops))
        result["loop_on_onnxruntime_s"] = statistics.median(run["loop_s"][index] for run in done)
    return result


def _measured(run: dict, what: str, crops: int | None) -> tuple[float, float] | None:
    """(seconds, peak RSS MiB) of one measurement in a worker's report, None if it has none."""
    if crops is not None:
        found = run.get("crops", {}).get(str(crops))
        return (found["seconds"], found["peak_mib"]) if found else None
    if what == "prefill":
        return (run["prefill_s"], run["prefill_peak_mib"]) if "prefill_s" in run else None
    return (run["decode_s"], run["peak_mib"]) if "peak_mib" in run else None


def _difference(outputs: dict, task: str, runtime: str, key: str) -> float | None:
    """Relative L2 difference of a runtime's output from exact's (None where either is absent)."""
    mine, exact = outputs.get((task, runtime), {}), outputs.get((task, "exact"), {})
    if key not in mine or key not in exact or mine[key].shape != exact[key].shape:
        return None
    reference = exact[key].astype(np.float64)
    return float(np.linalg.norm(mine[key] - reference) / np.linalg.norm(reference))


def versions() -> dict:
    """The packages' versions and the phi3v commit."""
    found = {}
    for package in PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    found["phi3v_commit"] = commit()
    return found


def _loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def markdown(report: dict) -> str:
    """The results file: what ran, the table, what did not run and why."""
    settings = next(
        (r["settings"] for r in report["rows"] if r["runtime"] == "openvino" and r.get("settings")),
        {},
    )
    lines = [
        "# OpenVINO beside onnxruntime on the same ONNX files",
        "",
        f"{report['date']}; `{report['command']}`",
        "",
        f"- CPU: {report['cpu']}; threads: {report['threads']} (every runtime)",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
        f"- model: `{report['model']}`; fast copies: `{report['fast_copies'] or 'none'}`",
        f"- load average {report['loadavg_start']} -> {report['loadavg_end']}",
        "- OpenVINO CPU plugin settings: "
        + (", ".join(f"{k} {v}" for k, v in settings.items()) or "none (it did not load)"),
        f"- one process per runtime, task and repeat, runtimes alternated; median of "
        f"{report['repeats']}; decode: median of {DECODE_STEPS} steps in each process; peak RSS "
        "is the process's (`ru_maxrss`) when the call ended",
        "",
        tables.openvino_peer(report["rows"]),
        "",
        "## What did not run, and why",
        "",
    ]
    lines += _notes(report)
    return "\n".join(lines) + "\n"


def _notes(report: dict) -> list[str]:
    notes = []
    for row in report["rows"]:
        if row.get("error"):
            notes.append(f"- {row['measurement']}, {row['runtime']}: failed: {row['error']}")
        elif row.get("skipped"):
            notes.append(f"- {row['measurement']}, {row['runtime']}: {row['skipped']}")
    whole = next(
        (run for run in report["runs"].get("vision openvino", []) if "whole_file_error" in run),
        None,
    )
    if whole:
        parts = report["vision_cut"]["parts"]
        notes.append(
            f"- OpenVINO could not read the vision file: {whole['whole_file_error']}. "
            "It ran the file cut at its Loop instead, timing the two parts around it: "
            f"{_part(parts['encoder'])} (the CLIP encoder and the 2x2 merge) and "
            f"{_part(parts['projection'])} (img_projection). The Loop between them "
            f"({_part(parts['layout'])}: the HD layout, reshapes and copies) ran on onnxruntime, "
            "untimed in OpenVINO's figure; its time is given beside it."
        )
    if report["vision_cut"].get("error"):
        notes.append(
            f"- cutting the vision file at its Loop failed: {report['vision_cut']['error']}"
        )
    return notes or ["- everything ran."]


def _part(part: dict) -> str:
    return f"`{', '.join(part['inputs'])}` -> `{', '.join(part['outputs'])}`"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a model folder")
    parser.add_argument("--positions", type=int, default=DEFAULT_POSITIONS)
    parser.add_argument("--crops", default=DEFAULT_CROPS, help="comma-separated crop counts")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="default: cores")
    parser.add_argument("--runtimes", default=",".join(RUNTIMES))
    parser.add_argument("--results", type=Path, default=RESULTS, help="where openvino.* go")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        report_result(decoder_worker(spec) if spec["task"] == "decoder" else vision_worker(spec))
        return
    args.crops = [int(n) for n in args.crops.split(",")]
    args.runtimes = args.runtimes.split(",")
    if any(crops < WARMUP_CROPS for crops in args.crops):
        parser.error(f"--crops: each count must be at least {WARMUP_CROPS} (global + one tile)")
    report = measure(args)
    save("openvino", report, markdown(report), args.results)
    print(markdown(report))


if __name__ == "__main__":
    main()
