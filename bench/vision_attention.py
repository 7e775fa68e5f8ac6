"""The vision encoder's attention on the fused kernel: accuracy on the trained proxy beside speed
at real size (issue 16, item 2: "the same for the vision encoder's MultiHeadAttention (full, not
causal: precision is the lever)").

**Accuracy** (any CPU): the DINOv2 ViT-S/14 int4 proxy (``bench/vision_proxy.py``: relative
feature error to truth, the same int4 weights with fp32 activations, pooled over photos and draws
of the rounding noise, as a multiple of exact's). Its attention is plain MatMul / Softmax /
MatMul, not MultiHeadAttention, so the kernel cannot run in it; bf16 attention is **emulated**:
the four operands of its two activation-by-activation products (Q, Kᵀ, the softmax's weights, V)
are rounded to bf16 and back (two Casts each), the products and the softmax stay fp32, which is
the kernel's arithmetic up to where the 1/sqrt(d) scale is applied before rounding. Rows: the
emulation alone in truth's graph, and in the product's fast vision copy (paired with the same
copy in fp32). The kernel's fp32 numerics are onnxruntime's to 1e-6 (``tests``), nothing to
measure here.

**Speed** (this CPU): the product's fast vision copy of the real-size set on bench.py's
1344x1008 photo at 16 crops (13 run), whole (onnxruntime's MultiHeadAttention) and in layers with
the kernel in fp32 and in bf16 (``phi3v.layered.LayeredVision``), alternated in one process,
median of ``--repeats`` after a warm-up; the features' distance to the whole copy's. On an AMX
CPU also in a process refused AMX (``bench/noamx.c``), which runs what a VNNI-only CPU with
AVX-512 BF16 runs.

    python bench/vision_attention.py --model /tmp/scale   # ~10 min -> results/vision_attention.*
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import paired
import vision_proxy
from onnx import TensorProto, helper
from provenance import save
from workers import parse_or_serve, run_worker, stamp

from phi3v import attention, convert, load_config, machine
from phi3v.image import preprocess_image
from phi3v.layered import LayeredVision
from phi3v.sessions import SessionSettings, open_session

CROPS = 16
FLAGS = {"amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx512_vnni", "avx2"}
WHOLE = "MultiHeadAttention (onnxruntime), whole copy"


# --- accuracy: bf16 attention emulated on the trained proxy ---------------------------------


def with_bf16_attention(source: Path, target: Path) -> Path:
    """The model at ``source`` with both operands of every activation-by-activation MatMul (the
    attention's Q.Kᵀ and P.V) rounded to bf16 and back; written to ``target`` (weights stay in
    ``source``'s data file, which ``target`` must sit beside)."""
    model = onnx.load(str(source), load_external_data=False)
    weights = {t.name for t in model.graph.initializer}
    nodes, rounded = [], 0
    for node in model.graph.node:
        if node.op_type == "MatMul" and not any(name in weights for name in node.input):
            for index, name in enumerate(node.input):
                low, back = f"{name}/bf16/{rounded}.{index}", f"{name}/rounded/{rounded}.{index}"
                nodes.append(helper.make_node("Cast", [name], [low], to=TensorProto.BFLOAT16))
                nodes.append(helper.make_node("Cast", [low], [back], to=TensorProto.FLOAT))
                node.input[index] = back
            rounded += 1
        nodes.append(node)
    if rounded == 0:
        raise ValueError(f"{source.name} has no activation-by-activation MatMul to round")
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save(model, str(target))
    return target


def accuracy(draws: int) -> dict:
    """Truth with bf16 attention, and the fast copy with and without it, on the vision proxy."""
    with tempfile.TemporaryDirectory() as work:
        proxy = vision_proxy.VisionProxy(Path(work) / "int4", draws)
        numerics = convert.stored_for_this_cpu(convert.DEFAULT_NUMERICS.vision)
        copy = Path(work) / "int4" / "fast.onnx"  # beside the source: its data file too
        convert.convert_model(proxy.source, copy, numerics)
        rounded_truth = with_bf16_attention(proxy.source, copy.with_name("truth-bf16.onnx"))
        rounded_copy = with_bf16_attention(copy, copy.with_name("fast-bf16.onnx"))
        truth_bf16 = open_session(rounded_truth, proxy.settings, fp32_activations=True)
        errors = {
            "attention alone: truth with bf16 attention": proxy.errors(truth_bf16),
            "fast copy, fp32 attention": proxy.errors(proxy.session(copy)),
            "fast copy, bf16 attention": proxy.errors(proxy.session(rounded_copy)),
        }
        rows = {name: proxy.ratio(e) for name, e in errors.items()}
        base, bf16 = errors["fast copy, fp32 attention"], errors["fast copy, bf16 attention"]
        rows["fast copy, bf16 attention"]["vs_fp32_attention"] = paired.pooled_ratio(
            proxy.weights, bf16.sum(axis=1), base.sum(axis=1)
        )
        return {"proxy": proxy.describe(), "numerics": numerics.describe(), "rows": rows}


# --- speed: the real-size vision copy whole and in layers -----------------------------------


def timing(model: str, image: str, threads: int, repeats: int) -> dict:
    """In a worker: seconds per photo of each path, alternated; the features' distance."""
    config = load_config(model)
    fast = convert.fast_models(config)
    settings = SessionSettings(num_threads=threads)
    paths, skipped = {WHOLE: open_session(fast.vision, settings)}, {}
    for numerics in attention.NUMERICS:
        try:
            kernel = attention.kernel(threads, numerics)
            paths[f"kernel, {kernel.arithmetic}"] = LayeredVision(fast.vision, settings, kernel)
        except attention.KernelUnavailable as error:
            skipped[f"kernel, {numerics}"] = str(error)
    photo = preprocess_image(image, CROPS)
    feeds = {
        config.vision.pixel_values: photo.pixel_values[None, : photo.used_crops],
        config.vision.image_sizes: np.array([photo.image_size], np.int64),
    }
    outputs = [config.vision.features]
    features = {name: path.run(outputs, feeds)[0] for name, path in paths.items()}  # warm-up
    runs: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(repeats):
        for name, path in paths.items():
            started = time.perf_counter()
            path.run(outputs, feeds)
            runs[name].append(time.perf_counter() - started)
            print(f"{name}: {runs[name][-1]:.2f} s", file=sys.stderr, flush=True)
    whole = features[WHOLE]
    return {
        "crops": photo.used_crops,
        "seconds": {name: statistics.median(times) for name, times in runs.items()},
        "runs": runs,
        "distance": {
            name: float(np.linalg.norm(f - whole) / np.linalg.norm(whole))
            for name, f in features.items()
        },
        "skipped": skipped,
    }


# --- the report -----------------------------------------------------------------------------


def report(result: dict) -> str:
    head = (
        f"# The vision encoder's attention on the fused kernel\n\n{result['date']}; phi3v "
        f"{result['commit']}; {result['cpu']} (`{', '.join(result['flags'])}`); "
        f"`{result['command']}`; load average {result['load_before'][0]:.2f} -> "
        f"{result['load_after'][0]:.2f}."
    )
    parts = [head]
    acc = result["accuracy"]
    proxy = acc["proxy"]
    lines = [
        f"**Accuracy, bf16 attention emulated** (Casts to bf16 and back on the operands of the "
        f"two attention products) on the trained DINOv2 ViT-S/14 int4 proxy, "
        f"{len(proxy['photos'])} photos x {proxy['draws']} draws; the fast copy in "
        f"{acc['numerics']}. Error to truth as a multiple of exact's (int4 weights, fp32 "
        f"activations), pooled, 95 % interval over photos:",
        "",
        "| path | error / exact's | interval | single draws | worst photo |",
        "|---|---|---|---|---|",
    ]
    for name, row in acc["rows"].items():
        low, high = row["interval"]
        lines.append(
            f"| {name} | {row['ratio']:.3f}x | [{low:.3f}, {high:.3f}] | "
            f"{row['draw_range'][0]:.3f}-{row['draw_range'][1]:.3f} | {row['worst_ratio']:.3f}x |"
        )
    paired_row = acc["rows"]["fast copy, bf16 attention"]["vs_fp32_attention"]
    low, high = paired_row["interval"]
    lines += [
        "",
        f"The fast copy with bf16 attention against the same copy with fp32 attention, paired: "
        f"**{paired_row['value']:.3f}x** its error [{low:.3f}, {high:.3f}].",
    ]
    parts.append("\n".join(lines))
    for where, speed in result["speed"].items():
        whole = speed["seconds"][WHOLE]
        rows = [
            f"**Speed, {where}**: the real-size fast vision copy on the 1344x1008 photo, "
            f"{speed['crops']} crops, {result['threads']} threads, median of "
            f"{result['repeats']} alternated runs after a warm-up.",
            "",
            "| path | s | whole / path | features' distance to the whole copy's |",
            "|---|---|---|---|",
        ]
        for name, seconds in speed["seconds"].items():
            rows.append(
                f"| {name} | {seconds:.2f} | {whole / seconds:.2f}x | "
                f"{speed['distance'][name]:.1e} |"
            )
        rows += [f"\nNot run: {name}: {why}" for name, why in speed["skipped"].items()]
        parts.append("\n".join(rows))
    return "\n\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a real-size set (python -m phi3v.testing)")
    parser.add_argument("--image", type=Path, help="a photo (default: bench.py's 1344x1008 PNG)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="vision_attention")
    vision_proxy.add_draws_argument(parser)
    args = parse_or_serve(parser, timing)
    if args is None:
        return
    load_before = os.getloadavg()
    result = {"threads": args.threads, "repeats": args.repeats}
    result["accuracy"] = accuracy(args.draws)
    result["speed"] = {}
    if args.model:
        from bench import make_image

        convert.fast_models(load_config(args.model))  # made once, before anything is timed
        image = args.image or make_image(Path("/tmp/phi3v-bench-photo.png"))
        spec = {"model": str(args.model.resolve()), "image": str(image)}
        spec |= {"threads": args.threads, "repeats": args.repeats}
        result["speed"]["this CPU"] = run_worker(__file__, spec)
        if machine.has_amx():
            refused = run_worker(__file__, spec, without_amx=True)
            result["speed"]["AMX refused (AVX-512 BF16)"] = refused
    command = "python bench/vision_attention.py " + " ".join(sys.argv[1:])
    result |= stamp(command, FLAGS, load_before)
    text = report(result)
    save(args.name, result, text)
    print(text)


if __name__ == "__main__":
    main()
