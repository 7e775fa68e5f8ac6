"""The measurements behind two choices of the "fast" precision (``phi3v/convert.py``).

1. **The integer GEMM against int4.** One decoder-sized projection (K 3072 -> N 8192) as the
   release has it (``MatMulNBits`` int4, block 32, accuracy level 4) and as the converter rewrites
   it with per-row activation scales (``MatMulIntegerToFloat``), timed at several row counts, and
   its error against a float64 product of the same int4 weights, on Gaussian activations and on
   activations with outlier channels. (bench/accuracy.py compares the other numerics on trained
   proxies.)
2. **Which prompt length goes to the integer-GEMM decoder** (``FAST_PREFILL_FROM`` in
   ``phi3v/engine.py``): on a real-size set (``--model``), the time to prefill S new positions
   after a 64-position prefix on the int4 decoder and on its integer-GEMM copy.

Forms and sessions are timed alternately, median of ``--repeats``. Writes
``bench/results/prefill_forms.{json,md}``.

    python bench/prefill_forms.py [--model /tmp/scale] [--repeats 5]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import tempfile
import time
from pathlib import Path

import accuracy
import numpy as np
import onnxruntime as ort
import tables
from provenance import save

import phi3v.convert as convert
import phi3v.integer_gemm as integer_gemm
from phi3v import machine
from phi3v.testing.onnx_graph import projection_model

K, N = 3072, 8192  # Phi-3-mini's hidden size -> its MLP's gate+up width / 2
ROWS = (1935, 512, 32, 8, 1)  # a photo's prompt, a prefill chunk, short suffixes, one token
FORMS = ("int4", "row")
OUTLIER_CHANNELS, OUTLIER_GAIN = 8, 32.0
SUFFIXES = (1, 4, 8, 16, 32, 64, 128)
PREFIX = 64


def projection_models(folder: Path, weights: str) -> dict[str, Path]:
    """One MatMulNBits node as released, and its integer-GEMM rewrite with per-row scales, its
    weights stored as ``weights`` says (bench/accuracy.py's ``--weights``)."""
    source = projection_model(folder / "int4.onnx", "proj", K, N)
    row = folder / "row.onnx"
    convert.convert_model(source, row, accuracy.stored(integer_gemm.Numerics(), weights))
    return {"int4": source, "row": row}


def reference_weights(path: Path) -> np.ndarray:
    """The int4 weights [K, N] in float64, dequantized as MatMulNBits does."""
    model = convert._load_graph(path)
    node = next(n for n in model.graph.node if n.op_type == "MatMulNBits")
    initializers = {t.name: t for t in model.graph.initializer}
    reader = convert._TensorReader(path.parent)
    codes = reader.array(initializers[node.input[1]]).reshape(N, K // 32, 16)
    scales = reader.array(initializers[node.input[2]]).reshape(N, K // 32, 1).astype(np.float64)
    nibbles = np.stack([codes & 0x0F, codes >> 4], axis=-1).reshape(N, K // 32, 32)
    return ((nibbles.astype(np.float64) - convert.INT4_ZERO_POINT) * scales).reshape(N, K).T


def activations(rows: int, outliers: bool) -> np.ndarray:
    x = np.random.default_rng(rows).standard_normal((rows, K)).astype(np.float32)
    if outliers:
        x[:, :: K // OUTLIER_CHANNELS] *= OUTLIER_GAIN
    return x


def time_forms(paths: dict[str, Path], repeats: int) -> tuple[list[dict], list[dict]]:
    sessions = {form: ort.InferenceSession(str(p)) for form, p in paths.items()}
    weights = reference_weights(paths["int4"])
    speed, error = [], []
    for rows in ROWS:
        x = activations(rows, outliers=False)
        times: dict[str, list[float]] = {form: [] for form in FORMS}
        for form in FORMS:  # warm-up
            sessions[form].run(None, {"x": x})
        for _ in range(repeats):
            for form in FORMS:
                started = time.perf_counter()
                sessions[form].run(None, {"x": x})
                times[form].append(time.perf_counter() - started)
        speed.append({"rows": rows, **{f: statistics.median(t) * 1e3 for f, t in times.items()}})
        print(speed[-1], flush=True)
    for outliers in (False, True):
        x = activations(512, outliers)
        exact = x.astype(np.float64) @ weights
        for form in FORMS:
            (y,) = sessions[form].run(None, {"x": x})
            diff = np.abs(y - exact)
            error.append(
                {
                    "activations": f"{OUTLIER_CHANNELS} outlier channels x{OUTLIER_GAIN:g}"
                    if outliers
                    else "Gaussian",
                    "form": form,
                    "relative_error": float(np.linalg.norm(y - exact) / np.linalg.norm(exact)),
                    "max_abs_error": float(diff.max()),
                }
            )
            print(error[-1], flush=True)
    return speed, error


def time_suffixes(model: Path, repeats: int) -> list[dict]:
    """Seconds to prefill S positions after PREFIX cached ones, int4 decoder vs integer GEMM."""
    from phi3v import Pipeline

    pipe = Pipeline.load(model, precision="fast")
    hidden = pipe.config.decoder.hidden_size
    embeds = np.random.default_rng(0).standard_normal((1, PREFIX + max(SUFFIXES), hidden))
    embeds = (embeds * 0.02).astype(np.float32)
    cache = pipe._new_cache(PREFIX + max(SUFFIXES))
    cache.run(pipe.sessions.decoder, embeds[:, :PREFIX])
    decoders = {"int4": pipe.sessions.decoder, "integer GEMM": pipe.sessions.prefill_decoder}
    rows = []
    for size in SUFFIXES:
        chunk = np.ascontiguousarray(embeds[:, PREFIX : PREFIX + size])
        times: dict[str, list[float]] = {name: [] for name in decoders}
        for attempt in range(repeats + 1):  # the first round warms up
            for name, session in decoders.items():
                cache.rewind(PREFIX)
                started = time.perf_counter()
                cache.run(session, chunk)
                if attempt:
                    times[name].append(time.perf_counter() - started)
        rows.append({"positions": size, **{n: statistics.median(t) for n, t in times.items()}})
        print(rows[-1], flush=True)
    cache.close()
    return rows


def markdown(report: dict) -> str:
    cpu = f"; {report['cpu']}; integer-GEMM weights: {report['weights']}" if "cpu" in report else ""
    parts = [
        "# Prefill forms: activation scales and the integer-GEMM threshold",
        f"{report['date']}; `python bench/prefill_forms.py` (median of {report['repeats']}, "
        f"forms alternated; load average {report['loadavg_start']} -> {report['loadavg_end']})"
        + f"{cpu}.",
        f"## One projection, K {K} -> N {N}",
        tables.projection_speed(report),
        "Error against a float64 product of the same int4 weights:",
        tables.projection_error(report),
    ]
    if report.get("suffixes"):
        parts += [
            f"## Prefill of S new positions after {PREFIX} cached ones (`{report['model']}`)",
            tables.prefill_threshold(report),
        ]
    return "\n\n".join(parts) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a real-size int4 set for the threshold")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--weights",
        choices=accuracy.WEIGHTS,
        default="this CPU",
        help="how the integer GEMM's weights are stored (default: as the product does here)",
    )
    parser.add_argument(
        "--name", default="prefill_forms", help="results file stem (default: %(default)s)"
    )
    args = parser.parse_args()
    report = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": machine.describe_cpu(),
        "weights": args.weights,
        "repeats": args.repeats,
        "loadavg_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "model": str(args.model) if args.model else None,
    }
    with tempfile.TemporaryDirectory() as tmp:
        models = projection_models(Path(tmp), args.weights)
        report["speed"], report["error"] = time_forms(models, args.repeats)
    if args.model:
        report["suffixes"] = time_suffixes(args.model, min(args.repeats, 3))
    report["loadavg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    save(args.name, report, markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
