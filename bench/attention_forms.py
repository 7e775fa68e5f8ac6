"""Prefill attention forms for one decoder layer (issue 16): speed, error, the 25 % target.

One layer of the real model's attention (32 heads of 96, 32 key/value heads) over a photo's
1,935 prompt positions, in each form of ``attention_graphs.py``: GroupQueryAttention as the fast
decoder runs it (chunks of ``PREFILL_CHUNK``, with and without its tiled path), MultiHeadAttention
without a mask (not causal: its rate only), block-causal forms in plain ONNX ops (fp32, the
products alone, SageAttention-style int8 Q·Kᵀ, int8 Q·Kᵀ and P·V), and our own fused causal
kernel (``phi3v/kernels/attention.c``, fp32 on AVX-512 or else AVX2, bf16 on AMX tiles and bf16
on AVX-512 BF16 dot products, in the same chunks as GQA).

* **Speed**: each form in its own process (threads = 2), forms alternated over ``--rounds``,
  ``--repeats`` runs each after a warm-up; median over all. A process during which other
  processes kept the CPUs busy (``/proc/stat``) is repeated. Where the CPU has AMX, again with AMX
  refused to the process (``noamx.c``): what a VNNI-only CPU runs (our AMX form: "not run").
* **Error**: each form's output against a float64 numpy reference of causal attention, on
  synthetic Q/K/V with the structure trained models have (outlier channels, a key bias, an
  attention sink) and, with ``--proxy``, on the real rotated Q/K/V of the trained decoder proxy
  (SmolLM2-135M, ``phi3v/testing/proxies.py``) on a real text. Tensor error only: KL and top-1
  of these numerics in a real decoder are ``attention_fidelity.py``'s.
* **The target**: from ``results/prefill_profile.json`` (the fast prefill's operator times), the
  attention time per layer that would make attention 25 % of prefill, beside each form.

    python bench/attention_forms.py [--rounds 3] [--repeats 5] [--proxy]

Writes ``bench/results/attention_forms.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import attention_kernel
import native
import numpy as np
import tables
from provenance import RESULTS, commit, save
from workers import MARK, parse_or_serve

HEADS, HEAD = 32, 96  # Phi-3-mini: 32 query heads of 96, as many key/value heads
POSITIONS = 1935  # a 1344x1008 photo at 16 crops and its question
LAYERS = 32
BLOCK = 256  # query rows per block of the block-causal forms
FLASH_OFF = "ORT_GQA_DISABLE_FLASH_ATTENTION"
TARGET_SHARE = 0.25  # issue 16: prefill attention <= 25 % of prefill time
# A timed process is repeated (up to RETRIES times) when other processes kept more than this
# share of the CPUs busy while it ran: with 2 threads on 2 cores, any such load distorts it.
DISTURBED, RETRIES = 0.05, 4
QUIET_PATIENCE = 600  # seconds to wait for idle CPUs before each timed process
# The CPU flags that decide which kernels run: matrix tiles, vector widths, dot products.
FLAGS = {"amx_bf16", "amx_int8", "amx_tile", "avx2", "avx512f", "avx512_bf16", "avx512_vnni"}
FLAGS |= {"avx512_fp16", "avx_vnni"}
# name -> (graph, query block, environment): "gqa" and our kernels run in chunks, the rest in
# one run.
FORMS = {
    "GroupQueryAttention": ("gqa", 0, {}),
    "GroupQueryAttention, tiled path off": ("gqa", 0, {FLASH_OFF: "1"}),
    "MultiHeadAttention, no mask (not causal)": ("mha", 0, {}),
    "block-causal fp32, 256": ("fp32", BLOCK, {}),
    "block-causal fp32, 128": ("fp32", 128, {}),
    "products only fp32, 256 (no softmax, no mask)": ("products", BLOCK, {}),
    "int8 QK (SageAttention-style), 256": ("int8 qk", BLOCK, {}),
    "int8 QK and PV, 256": ("int8 qk pv", BLOCK, {}),
    "fused causal fp32 (our kernel)": ("kernel fp32", 0, {}),
    "fused causal AMX bf16 (our kernel)": ("kernel amx", 0, {}),
    "fused causal bf16, AVX-512 (our kernel)": ("kernel bf16", 0, {}),
}
# kind -> attention_kernel's variant
KERNELS = {"kernel fp32": "fp32", "kernel amx": "amx", "kernel bf16": "bf16"}


def chunk_size() -> int:
    from phi3v.kv_cache import PREFILL_CHUNK

    return PREFILL_CHUNK


# --- models and runs -----------------------------------------------------------------------------


def build_models(folder: Path, heads: int, kv_heads: int, head: int, positions: int) -> dict:
    """Each form's graph for these shapes, saved in ``folder``: {form: path}."""
    import attention_graphs as graphs

    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for index, (name, (kind, block, _)) in enumerate(FORMS.items()):
        if kind in KERNELS:  # no graph: what open_form needs to call the kernel
            paths[name] = folder / f"form{index}.json"
            paths[name].write_text(json.dumps({"variant": KERNELS[kind], "head": head}))
            continue
        if kind == "gqa":
            model = graphs.gqa_model(heads, kv_heads, head)
        elif kind == "mha":
            model = graphs.mha_model(heads, head, positions, chunk_size())
        else:
            model = graphs.block_causal_model(kind, heads, head, positions, block, chunk_size())
        paths[name] = folder / f"form{index}.onnx"
        paths[name].write_bytes(model.SerializeToString())
    return paths


def open_form(path: Path):
    """An onnxruntime session for a graph; for our kernel, a function of (q, k, v)."""
    if path.suffix == ".json":
        spec = json.loads(path.read_text())
        attention_kernel.library()  # builds it, or says why it cannot
        return functools.partial(attention_kernel.attention, chunk=chunk_size(), **spec)
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options)


def run_form(session, kind: str, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The form's output [1, S, heads * head]; GroupQueryAttention chunk by chunk, as the engine
    runs it: one past/present buffer per key and value, written in place. Our kernel does the same
    with its own cache."""
    if kind in KERNELS:
        return session(q, k, v)
    if kind != "gqa":
        return session.run(None, {"q": q, "k": k, "v": v})[0]
    import onnxruntime as ort

    positions = q.shape[1]
    _, kv_heads, _, head = session.get_inputs()[3].shape  # past_key [1, kv_heads, capacity, head]
    cache = [np.zeros((1, kv_heads, positions, head), np.float32) for _ in range(2)]
    cache = [ort.OrtValue.ortvalue_from_numpy(c) for c in cache]
    binding = session.io_binding()
    for name, value in zip(("past_key", "past_value"), cache, strict=True):
        binding.bind_ortvalue_input(name, value)
        binding.bind_ortvalue_output(name.replace("past", "present"), value)
    out = np.empty_like(q)
    chunk = chunk_size()
    for start in range(0, positions, chunk):
        end = min(start + chunk, positions)
        for name, x in (("q", q), ("k", k), ("v", v)):
            part = np.ascontiguousarray(x[:, start:end])
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(part))
        lengths = {"seqlens_k": np.array([end - 1], np.int32)}
        lengths["total_sequence_length"] = np.array(end, np.int32)
        for name, x in lengths.items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(x))
        rows = np.empty((1, end - start, q.shape[2]), np.float32)
        binding.bind_ortvalue_output("out", ort.OrtValue.ortvalue_from_numpy(rows))
        session.run_with_iobinding(binding)
        out[:, start:end] = rows
    return out


# --- inputs and the reference --------------------------------------------------------------------


def synthetic_inputs(positions: int, heads: int, head: int, seed: int = 0) -> dict:
    """Q/K/V [1, S, heads * head] with what trained models show: a few outlier channels in Q and
    K, a large per-channel key bias (what SageAttention's mean subtraction removes), an attention
    sink (every query leans towards one direction that the first key carries strongly, and the
    sink's value is small) and a few large value channels."""
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((heads, positions, head)) for _ in range(3))
    outliers = rng.choice(head, 4, replace=False)
    k[:, :, outliers] = 3 * k[:, :, outliers] + rng.normal(0, 6, (heads, 1, outliers.size))
    q[:, :, outliers] *= 2
    q *= 1.5
    sink = rng.standard_normal((heads, 1, head))
    sink /= np.linalg.norm(sink, axis=-1, keepdims=True)
    q += rng.uniform(2, 5, (heads, 1, 1)) * sink
    k[:, :1] += 20 * sink
    v[:, :1] *= 0.1
    v[:, :, rng.choice(head, 2, replace=False)] *= 5
    return {name: _flat(x) for name, x in (("q", q), ("k", k), ("v", v))}


def _flat(x: np.ndarray) -> np.ndarray:
    """[heads, S, head] -> [1, S, heads * head] float32."""
    return np.ascontiguousarray(x.transpose(1, 0, 2).reshape(1, x.shape[1], -1), np.float32)


def reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, heads: int) -> tuple[np.ndarray, float]:
    """Causal attention in float64 [1, S, heads * head], and the mean weight on the first key."""
    positions = q.shape[1]
    head = q.shape[2] // heads
    kv_heads = k.shape[2] // head
    out = np.empty((positions, heads, head))
    visible = np.tril(np.ones((positions, positions), bool))
    sink = []
    for h in range(heads):
        g = h * kv_heads // heads
        qh = q[0, :, h * head : (h + 1) * head].astype(np.float64)
        kh = k[0, :, g * head : (g + 1) * head].astype(np.float64)
        vh = v[0, :, g * head : (g + 1) * head].astype(np.float64)
        scores = np.where(visible, qh @ kh.T / math.sqrt(head), -np.inf)
        p = np.exp(scores - scores.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        out[:, h] = p @ vh
        sink.append(p[1:, 0].mean())
    return out.reshape(1, positions, -1), float(np.mean(sink))


def repeat_kv(x: np.ndarray, heads: int, kv_heads: int) -> np.ndarray:
    """[1, S, kv_heads * head] -> [1, S, heads * head], each key/value head shared as GQA does."""
    head = x.shape[2] // kv_heads
    split = x.reshape(1, x.shape[1], kv_heads, head)
    return np.ascontiguousarray(
        np.repeat(split, heads // kv_heads, axis=2).reshape(1, x.shape[1], -1)
    )


def errors(paths: dict, inputs: dict, heads: int) -> dict:
    """Per form: relative (Frobenius) and largest absolute error against the float64 reference."""
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    exact, sink = reference(q, k, v, heads)
    kv_heads = k.shape[2] * heads // q.shape[2]
    repeated = {"q": q, "k": repeat_kv(k, heads, kv_heads), "v": repeat_kv(v, heads, kv_heads)}
    result = {"sink_weight": sink, "forms": {}}
    for name, path in paths.items():
        kind, _, env = FORMS[name]
        feeds = inputs if kind == "gqa" or kind in KERNELS else repeated
        saved = {key: os.environ.get(key) for key in env}
        os.environ.update(env)  # the tiled path's switch is read when GQA runs
        try:
            out = run_form(open_form(path), kind, feeds["q"], feeds["k"], feeds["v"])
        except attention_kernel.KernelUnavailable as error:
            result["forms"][name] = {"not_run": str(error)}
            print(name, "not run:", error, flush=True)
            continue
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        result["forms"][name] = {
            "relative_error": float(np.linalg.norm(out - exact) / np.linalg.norm(exact)),
            "max_abs_error": float(np.abs(out - exact).max()),
        }
        print(name, result["forms"][name], flush=True)
    return result


# --- the trained proxy's real Q/K/V --------------------------------------------------------------


def proxy_inputs(folder: Path, layers: tuple[int, ...]) -> tuple[dict, dict]:
    """The rotated Q, K and V of ``layers`` of the SmolLM2 decoder proxy on a real text's first
    tokens (exact decoder, one prefill), and the proxy's shapes."""
    from proxy_attention import capture

    return capture(folder, layers)


# --- timing --------------------------------------------------------------------------------------


def worker(path: str, name: str, repeats: int, positions: int) -> dict:
    """In a fresh process: ``repeats`` timed runs of one form after a warm-up."""
    kind = FORMS[name][0]
    inputs = synthetic_inputs(positions, HEADS, HEAD)
    try:
        session = open_form(Path(path))
        run_form(session, kind, **inputs)
    except attention_kernel.KernelUnavailable as error:  # e.g. AMX refused
        return {"not_run": str(error), "others": 0.0}
    times = []
    busy, own, wall = _cpu_busy(), os.times(), time.perf_counter()
    for _ in range(repeats):
        started = time.perf_counter()
        run_form(session, kind, **inputs)
        times.append(time.perf_counter() - started)
    wall = time.perf_counter() - wall
    mine = sum(os.times()[:2]) - sum(own[:2])
    others = max(0.0, _cpu_busy() - busy - mine) / (wall * os.cpu_count())
    return {"times": times, "others": others}


def wait_for_quiet(patience: float = QUIET_PATIENCE) -> None:
    """Wait (up to ``patience`` seconds) until the CPUs sit idle for a second: a process
    started outside the benchmark lock would otherwise share the cores with the timed run."""
    deadline = time.monotonic() + patience
    while time.monotonic() < deadline:
        busy = _cpu_busy()
        time.sleep(1.0)
        if (_cpu_busy() - busy) / os.cpu_count() <= DISTURBED:
            return
    print("the CPUs did not go quiet; timing anyway (the run records the load)", flush=True)


def _cpu_busy() -> float:
    """Seconds every CPU has been busy since boot (/proc/stat), to see other processes' load."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _, _, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def measure(paths: dict, rounds: int, repeats: int, positions: int, launcher: list[str]) -> dict:
    """Median ms per form, forms alternated round by round, each run in its own process."""
    runs: dict[str, list[float]] = {name: [] for name in paths}
    others: dict[str, list[float]] = {name: [] for name in paths}
    not_run: dict[str, str] = {}
    for _ in range(rounds):
        for name, path in paths.items():
            env = {**os.environ, **FORMS[name][2]}
            spec = {"path": str(path), "name": name, "repeats": repeats, "positions": positions}
            command = [*launcher, sys.executable, __file__, "--worker", json.dumps(spec)]
            for _attempt in range(RETRIES):  # a run other processes disturbed is repeated
                wait_for_quiet()
                out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
                result = json.loads(out.stdout.split(MARK, 1)[1])
                others[name].append(result["others"])
                if result["others"] <= DISTURBED:
                    break
                print(f"{name}: others used {result['others']:.0%} of the CPUs, again", flush=True)
            if "not_run" in result:
                not_run[name] = result["not_run"]
                print(f"{name}: not run ({result['not_run']})", flush=True)
                continue
            runs[name] += result["times"]
            print(f"{name}: {1000 * statistics.median(runs[name]):.1f} ms", flush=True)
    return {
        name: {
            "median_ms": 1000 * statistics.median(t) if t else None,
            "runs_ms": [1000 * x for x in t],
            "others_cpu_share": others[name],
            **({"not_run": not_run[name]} if name in not_run else {}),
        }
        for name, t in runs.items()
    }


# --- the work each form does, and the target -----------------------------------------------------


def key_pairs(positions: int, chunk: int, block: int) -> dict:
    """(query, key) pairs computed: the causal minimum, in chunks (GQA, MHA), in query blocks,
    and by each form."""

    def blocked(size: int) -> int:
        return sum(
            (min(s + size, positions) - s) * min(s + size, positions)
            for s in range(0, positions, size)
        )

    return {
        "causal": positions * (positions + 1) // 2,
        "chunked": blocked(chunk),
        "block": blocked(block),
        "full": positions * positions,
        "forms": {
            name: attention_kernel.pairs(positions, chunk, KERNELS[kind])
            if kind in KERNELS
            else blocked(size or chunk)
            for name, (kind, size, _) in FORMS.items()
        },
    }


def target(profile: dict, chunk: int) -> dict:
    """From the fast prefill's profile at the engine's chunk: what 25 % attention allows."""
    row = next(
        r
        for r in profile["rows"]
        if r["numerics"] == "default" and r["chunk"] == chunk and r["flash"]
    )
    ops = row["prefill_ops"]
    attention = ops["GroupQueryAttention"]
    other = sum(ops.values()) - attention
    allowed = other * TARGET_SHARE / (1 - TARGET_SHARE)
    projections = ops.get("MatMulIntegerToFloat", 0.0)
    return {
        "source": f"bench/results/prefill_profile.json ({profile['date'][:10]}, {profile['cpu']})",
        "attention_s": attention,
        "other_s": other,
        "share": attention / (attention + other),
        "allowed_s": allowed,
        "allowed_ms_per_layer": 1000 * allowed / LAYERS,
        "projections_s": projections,
    }


def estimates(speed: dict, pairs: dict, goal: dict) -> dict:
    """What a fused block-causal kernel would take (estimates from measured rates, not runs).

    fp32: the causal minimum at MultiHeadAttention's measured rate (pairs per ms).
    AMX bf16: the two products at half the int8 AMX rate the projections reach in the profiled
    prefill (bf16 tiles do half the int8 operations), plus the softmax at the rate the plain-ops
    fp32 form spends on it (fp32 minus products only), scaled to the causal minimum.
    """
    mha = speed["MultiHeadAttention, no mask (not causal)"]["median_ms"]
    fp32_ms = mha * pairs["causal"] / pairs["chunked"]
    # One position through a layer's projections: qkv, o, gate_up (2 x 8192), down.
    macs = 3072 * 9216 + 3072 * 3072 + 2 * 3072 * 8192 + 8192 * 3072
    int8_ops = 2 * POSITIONS * macs * LAYERS / goal["projections_s"]
    product_ms = 1000 * 4 * HEAD * HEADS * pairs["causal"] / (int8_ops / 2)
    plain = speed["block-causal fp32, 256"]["median_ms"]
    softmax = plain - speed["products only fp32, 256 (no softmax, no mask)"]["median_ms"]
    softmax_ms = softmax * pairs["causal"] / pairs["block"]
    result = {}
    for name, ms in (("fused fp32", fp32_ms), ("fused AMX bf16", product_ms + softmax_ms)):
        total = ms * LAYERS / 1000
        result[name] = {
            "ms_per_layer": ms,
            "total_s": total,
            "share": total / (total + goal["other_s"]),
        }
    result["int8_tops_projections"] = int8_ops / 1e12
    return result


# --- main ----------------------------------------------------------------------------------------


def versions() -> dict:
    import onnx
    import onnxruntime as ort

    return {
        "onnxruntime": ort.__version__,
        "onnx": onnx.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "phi3v_commit": commit(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--proxy", action="store_true", help="also the error on the proxy's Q/K/V")
    parser.add_argument(
        "--name", default="attention_forms", help="results file stem (default: %(default)s)"
    )
    parser.add_argument("--positions", type=int, default=POSITIONS, help=argparse.SUPPRESS)
    if (args := parse_or_serve(parser, worker)) is None:
        return
    from phi3v import machine

    chunk, positions = chunk_size(), args.positions
    report = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": machine.describe_cpu(),
        "cpu_flags": sorted(machine.cpu_flags() & FLAGS),
        "command": "python bench/attention_forms.py " + " ".join(sys.argv[1:]),
        "versions": versions(),
        "shape": {
            "heads": HEADS,
            "kv_heads": HEADS,
            "head": HEAD,
            "positions": positions,
            "chunk": chunk,
            "block": BLOCK,
            "layers": LAYERS,
        },
        "rounds": args.rounds,
        "repeats": args.repeats,
        "load_before": os.getloadavg(),
        "pairs": key_pairs(positions, chunk, BLOCK),
    }
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        paths = build_models(work / "real", HEADS, HEADS, HEAD, positions)
        inputs = synthetic_inputs(positions, HEADS, HEAD)
        report["error"] = {"synthetic": errors(paths, inputs, HEADS)}
        if args.proxy:
            report["error"]["proxy"] = proxy_errors(work / "proxy")
        speed = report["speed"] = {}
        speed["this CPU"] = measure(paths, args.rounds, args.repeats, positions, [])
        if machine.has_amx():
            launcher = [native.noamx_launcher()]
            speed["AMX refused (VNNI only)"] = measure(
                paths, args.rounds, args.repeats, positions, launcher
            )
    report["load_after"] = os.getloadavg()
    profile = RESULTS / "prefill_profile.json"
    profile = json.loads(profile.read_text()) if profile.exists() else {}
    # The target comes from the fast prefill's profile, which holds only on the CPU it ran on.
    if profile.get("cpu") == report["cpu"] and positions == POSITIONS:
        report["target"] = target(profile, chunk)
        report["estimates"] = estimates(speed["this CPU"], report["pairs"], report["target"])
    save(args.name, report, tables.attention_forms(report))
    print(tables.attention_forms(report))


def proxy_errors(folder: Path) -> dict:
    """Per captured proxy layer: each form's error on its real Q/K/V (the proxy's own shapes)."""
    layers_inputs, shape = proxy_inputs(folder, (0, 14, 29))
    result = {"shape": shape, "layers": {}}
    for layer, inputs in layers_inputs.items():
        positions = inputs["q"].shape[1]
        paths = build_models(
            folder / f"forms{layer}", shape["heads"], shape["kv_heads"], shape["head"], positions
        )
        result["layers"][layer] = errors(paths, inputs, shape["heads"])
    return result


if __name__ == "__main__":
    main()
