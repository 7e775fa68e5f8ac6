"""Time phi3v against onnxruntime-genai 0.18 on one model folder, one process per timed run.

    python bench/bench.py --model /tmp/scale [--runs 3] [--cases text,image] [--name NAME]

Cases (greedy, 32 new tokens):

* ``text``: ``<|user|>\\nDescribe the image.<|end|>\\n<|assistant|>\\n`` (12 ids with genai 0.18);
* ``image``: the same with ``<|image_1|>\\n`` and a generated 1344x1008 PNG (12 crops, 1921 image
  tokens, 1935 ids).

Runtimes: genai with the folder's released config (``genai-A``), genai with
``intra_op_num_threads: 2`` in every model's session options (``genai-B``, a temporary copy of the
folder whose big files are symlinks), and ``phi3v`` with its default threads. phi3v is fed the
very ids genai's processor produced (``input_ids=``), so their generated ids can be compared.

Every timed run is its own process, so load time and peak RSS (``ru_maxrss``) are per run. An
untimed genai process first tokenizes the cases (and warms the page cache). Runs are interleaved
(A, B, phi3v, A, B, phi3v, ...) so slow drifts hit every runtime alike. While a run is going, the
CPU time other processes use is measured from /proc/stat; a run during which others used more
than 15 % of the machine is marked busy and repeated (up to twice), and the medians use only the
last attempt of each run.

Writes ``bench/results/<name>.json`` (raw runs, machine, versions, load averages) and
``bench/results/<name>.md`` (medians with [min-max] and phi3v / genai ratios).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np
from provenance import save

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent

NEW_TOKENS = 32
PROMPTS = {
    "text": "<|user|>\nDescribe the image.<|end|>\n<|assistant|>\n",
    "image": "<|user|>\n<|image_1|>\nDescribe the image.<|end|>\n<|assistant|>\n",
}
IMAGE_SIZE = (1344, 1008)  # 4 x 3 tiles of 336: 12 crops, 1921 image tokens
CONFIGS = ("genai-A", "genai-B", "phi3v", "phi3v-fast", "phi3v-fast-gqa", "phi3v-fast-kernel")
CONFIGS += ("phi3v-fast-kernel-bf16", "phi3v-fast-4k")
# phi3v configs and their precision. phi3v-fast runs as a user's default does; phi3v-fast-gqa
# with PHI3V_FUSED_ATTENTION=0 (the prompt copy whole, GroupQueryAttention), phi3v-fast-kernel
# with it =1 (the copy in layers with the fused attention kernel, phi3v/layered.py) and
# phi3v-fast-kernel-bf16 with it =bf16 (the kernel in bf16). phi3v-fast-4k is fast with
# PHI3V_HUGE_PAGES=0: the weights left on the 4 KB pages onnxruntime allocated them on; the
# others move them onto 2 MB pages (=1), as the app does.
PRECISION = {
    "phi3v": "exact",
    "phi3v-fast": "fast",
    "phi3v-fast-gqa": "fast",
    "phi3v-fast-kernel": "fast",
    "phi3v-fast-kernel-bf16": "fast",
    "phi3v-fast-4k": "fast",
}
# PHI3V_FUSED_ATTENTION, else unset
FUSED = {"phi3v-fast-gqa": "0", "phi3v-fast-kernel": "1", "phi3v-fast-kernel-bf16": "bf16"}
# PHI3V_HUGE_PAGES: the phi3v configs run as the app does, weights on 2 MB pages, but one
PAGES = {config: "0" if config == "phi3v-fast-4k" else "1" for config in PRECISION}
B_THREADS = 2  # genai-B: the machine's cores (genai's default uses half the hardware threads)
BUSY_SHARE = 0.15  # others using more than this share of all cores makes a run "busy"
MAX_ATTEMPTS = 3
QUIET_WAIT_S = 240  # before each run, wait up to this long for others to go quiet
RUN_TIMEOUT_S = 900


# ---------------------------------------------------------------------------------------------
# Worker side: one timed run in this process


def genai_run(model_dir: str, case: str, image: str | None) -> dict:
    """Load genai, preprocess, generate NEW_TOKENS greedily; time each stage."""
    import onnxruntime_genai as og

    started = time.perf_counter()
    model = og.Model(og.Config(model_dir))
    og.Tokenizer(model)  # part of what an application loads
    processor = model.create_multimodal_processor()
    load = time.perf_counter() - started
    rss_loaded = _rss_mib()

    started = time.perf_counter()
    images = og.Images.open(image) if image else None
    inputs = processor(PROMPTS[case], images=images)
    preprocess = time.perf_counter() - started
    input_ids = inputs["input_ids"].as_numpy()[0].tolist()

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(input_ids) + NEW_TOKENS, do_sample=False, top_k=1)
    generator = og.Generator(model, params)
    started = time.perf_counter()
    generator.set_inputs(inputs)  # in 0.18 the prompt pass (vision too) runs in here
    generator.generate_next_token()
    ttft = time.perf_counter() - started
    steps = []
    while not generator.is_done():
        started = time.perf_counter()
        generator.generate_next_token()
        steps.append(time.perf_counter() - started)
    tokens = generator.get_sequence(0)[len(input_ids) :].tolist()
    return {
        "load_s": load,
        "preprocess_s": preprocess,
        "ttft_s": ttft,
        "decode_s": sum(steps),
        "decode_steps": len(steps),
        "rss_loaded_mib": rss_loaded,
        "input_ids": input_ids,
        "token_ids": tokens,
    }


def phi3v_run(
    model_dir: str, case: str, image: str | None, input_ids: list[int], precision: str
) -> dict:
    """Load phi3v.Pipeline, generate from genai's ``input_ids``; read its Timings."""
    from phi3v import Pipeline

    started = time.perf_counter()
    pipe = Pipeline.load(model_dir, precision=precision)
    load = time.perf_counter() - started
    attention = pipe.sessions.prefill_attention
    pages = pipe.sessions.huge_pages
    rss_loaded = _rss_mib()

    result = pipe.generate(
        PROMPTS[case],
        images=[image] if image else [],
        max_new_tokens=NEW_TOKENS,
        input_ids=input_ids,
    )
    t = result.timings
    produced = len(result.token_ids) + (result.stop_reason == "eos")
    decode_steps = produced - 1
    return {
        "load_s": load,
        "preprocess_s": t.preprocess,
        # phi3v's time_to_first_token counts from the call, preprocessing included; genai's
        # clock starts after its processor, so compare without it.
        "ttft_s": t.time_to_first_token - t.preprocess,
        "ttft_incl_preprocess_s": t.time_to_first_token,
        "vision_s": t.vision,
        "prefill_s": t.prefill,
        "decode_s": decode_steps / t.decode_tokens_per_second if decode_steps else 0.0,
        "decode_steps": decode_steps,
        "rss_loaded_mib": rss_loaded,
        "input_ids": result.input_ids,
        "token_ids": result.token_ids,
        "stop_reason": result.stop_reason,
        "prefill_attention": attention,
        "memory_pages": pages.describe(),
        "huge_pages_s": pages.seconds,
        "phi3v_source": phi3v_source_digest(),
    }


def phi3v_source_digest() -> str:
    """A short hash of phi3v/*.py and the attention kernel as this run imported them: others may
    commit while we run."""
    digest = hashlib.sha256()
    for path in sorted((REPO / "phi3v").glob("*.py")) + [REPO / "phi3v/kernels/attention.c"]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def worker_main(spec: dict) -> None:
    for name, key in (("PHI3V_FUSED_ATTENTION", "fused_attention"), ("PHI3V_HUGE_PAGES", "pages")):
        if spec.get(key) is not None:
            os.environ[name] = spec[key]
        else:
            os.environ.pop(name, None)
    if spec["runtime"] == "genai":
        result = genai_run(spec["model"], spec["case"], spec["image"])
    else:
        result = phi3v_run(
            spec["model"], spec["case"], spec["image"], spec["input_ids"], spec["precision"]
        )
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def tokenize_main(spec: dict) -> None:
    """Untimed: genai's input ids for every case (and a warm page cache for the timed runs)."""
    import onnxruntime_genai as og

    model = og.Model(og.Config(spec["model"]))
    processor = model.create_multimodal_processor()
    ids = {}
    for case in spec["cases"]:
        images = og.Images.open(spec["image"]) if case == "image" else None
        ids[case] = processor(PROMPTS[case], images=images)["input_ids"].as_numpy()[0].tolist()
    print("RESULT " + json.dumps(ids))


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ---------------------------------------------------------------------------------------------
# Driver side


def prepare_fast(model: Path) -> dict:
    """Make the fast copies and run their self-check (once per folder, as a user's first
    start does); their one-time cost, timed apart."""
    from phi3v import Pipeline, convert, load_config

    started = time.perf_counter()
    convert.fast_models(load_config(model))
    converted = time.perf_counter()
    pipe = Pipeline.load(model, precision="fast")
    check = pipe.precision_choice.check
    return {
        "conversion_s": round(converted - started, 1),
        "check_s": check.seconds if check else None,
        "check": check.to_json() if check else None,
        "numerics": {
            "vision": convert.numerics_for_this_cpu().vision.describe(),
            "decoder": convert.numerics_for_this_cpu().decoder.describe(),
        },
    }


def make_image(path: Path) -> Path:
    """A seeded 1344x1008 RGB PNG: smooth colour ramps plus noise, so it is not trivially flat."""
    from PIL import Image

    width, height = IMAGE_SIZE
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width]
    ramps = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], -1)
    pixels = np.clip(ramps + rng.normal(0, 24, ramps.shape), 0, 255).astype(np.uint8)
    Image.fromarray(pixels, "RGB").save(path)
    return path


def make_config_b(model_dir: Path, out_dir: Path) -> Path:
    """A copy of the folder whose genai_config.json asks for B_THREADS intra-op threads in every
    model's session; every other file is a symlink to the original."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for item in model_dir.iterdir():
        if item.name != "genai_config.json":
            (out_dir / item.name).symlink_to(item.resolve())
    config = json.loads((model_dir / "genai_config.json").read_text())
    for part in ("decoder", "embedding", "vision"):
        if part in config["model"]:
            options = config["model"][part].setdefault("session_options", {})
            options["intra_op_num_threads"] = B_THREADS
    (out_dir / "genai_config.json").write_text(json.dumps(config, indent=4) + "\n")
    return out_dir


def _cpu_busy_s() -> float:
    """Non-idle CPU seconds of the whole machine since boot (all cores, from /proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def wait_for_quiet(window_s: float = 3.0) -> float:
    """Wait (up to QUIET_WAIT_S) until the machine's CPU use over ``window_s`` is below
    BUSY_SHARE; we run nothing meanwhile, so all of it is other people's. Returns seconds waited."""
    started = time.perf_counter()
    while time.perf_counter() - started < QUIET_WAIT_S:
        before = _cpu_busy_s()
        time.sleep(window_s)
        if (_cpu_busy_s() - before) / (window_s * os.cpu_count()) < BUSY_SHARE:
            break
    return time.perf_counter() - started


def run_process(args: list[str]) -> tuple[dict, dict]:
    """Run this script as a child; return its RESULT and what the machine did meanwhile."""
    load_before = os.getloadavg()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy_before, started = _cpu_busy_s(), time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), *args],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    wall = time.perf_counter() - started
    busy = _cpu_busy_s() - busy_before
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = (after.ru_utime - children.ru_utime) + (after.ru_stime - children.ru_stime)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"worker failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    others = max(busy - own, 0.0)
    machine = {
        "wall_s": wall,
        "cpu_s": own,
        "others_cpu_s": others,
        "others_share": others / (wall * os.cpu_count()),
        "loadavg_before": load_before,
    }
    return json.loads(lines[-1][len("RESULT ") :]), machine


def timed_run(config: str, model: Path, case: str, image: Path | None, ids: list[int]) -> dict:
    """One run of ``config`` on ``case``, repeated while the machine was busy; all attempts kept."""
    spec = {
        "runtime": "phi3v" if config in PRECISION else "genai",
        "precision": PRECISION.get(config),
        "fused_attention": FUSED.get(config),
        "pages": PAGES.get(config),
        "model": str(model),
        "case": case,
        "image": str(image) if image else None,
        "input_ids": ids,
    }
    attempts = []
    for _ in range(MAX_ATTEMPTS):
        waited = wait_for_quiet()
        result, machine = run_process(["--worker", json.dumps(spec)])
        result.update(machine, busy=machine["others_share"] > BUSY_SHARE, waited_s=waited)
        attempts.append(result)
        status = "BUSY, retrying" if result["busy"] else "ok"
        print(
            f"  {case:5} {config:7} load {result['load_s']:6.2f} s  TTFT {result['ttft_s']:7.2f} s"
            f"  decode {ms_per_token(result):7.1f} ms/tok  peak {result['peak_rss_mib']:6.0f} MiB"
            f"  others {machine['others_share']:.0%} (waited {waited:.0f} s)  {status}",
            flush=True,
        )
        if not result["busy"]:
            break
    return {"case": case, "config": config, "attempts": attempts}


def ms_per_token(run: dict) -> float:
    """A run's decode time per generated token after the first (NaN when it made only one)."""
    return 1000 * run["decode_s"] / run["decode_steps"] if run["decode_steps"] else float("nan")


def machine_info() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model_name = next(
        (
            line.split(":", 1)[1].strip()
            for line in cpuinfo.splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    flags = next((line for line in cpuinfo.splitlines() if line.startswith("flags")), "").split()
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model_name,
        "simd": sorted(
            f for f in flags if f.startswith(("avx512f", "avx512_vnni", "avx_vnni", "amx", "avx2"))
        ),
        "mem_gib": round(mem_kib / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def versions() -> dict:
    found = {}
    for package in ("onnxruntime", "onnxruntime-genai", "onnx", "numpy", "tokenizers", "pillow"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    git = ["git", "-C", str(REPO)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    changes = subprocess.run(
        [*git, "status", "--porcelain", "--", "phi3v"], capture_output=True, text=True
    )
    found["phi3v_commit"] = commit.stdout.strip() or None
    found["phi3v_uncommitted_changes"] = bool(changes.stdout.strip())
    return found


# ---------------------------------------------------------------------------------------------
# Summaries


METRICS = (  # key, column title, how to read it from a run
    ("load_s", "load s", lambda r: r["load_s"]),
    ("preprocess_s", "preprocess s", lambda r: r["preprocess_s"]),
    ("ttft_s", "TTFT s", lambda r: r["ttft_s"]),
    ("decode_ms", "decode ms/token", ms_per_token),
    ("decode_tps", "decode tok/s", lambda r: 1000 / ms_per_token(r)),
    ("peak_rss_mib", "peak RSS MiB", lambda r: r["peak_rss_mib"]),
)
RATIO_METRICS = ("load_s", "ttft_s", "decode_ms", "peak_rss_mib")
RATIO_PAIRS = (
    ("phi3v", "genai-A"),
    ("phi3v", "genai-B"),
    ("phi3v-fast", "genai-B"),
    ("phi3v-fast", "phi3v"),
)


def summarize(runs: list[dict]) -> dict:
    """Median, min and max of each metric per (case, config), from each run's last attempt."""
    summary: dict = {}
    for run in runs:
        final = run["attempts"][-1]
        entry = summary.setdefault(run["case"], {}).setdefault(run["config"], {"_runs": []})
        entry["_runs"].append(final)
    for configs in summary.values():
        for config, entry in configs.items():
            finals = entry.pop("_runs")
            for key, _, read in METRICS:
                values = [read(r) for r in finals]
                entry[key] = {
                    "median": statistics.median(values),
                    "min": min(values),
                    "max": max(values),
                }
            entry["n"] = len(finals)
            entry["busy_final"] = sum(r["busy"] for r in finals)
            if config in PRECISION:
                for key in ("vision_s", "prefill_s"):
                    entry[key] = statistics.median(r[key] for r in finals)
    return summary


def _verdict(holds: bool | None) -> str:
    return "not run" if holds is None else "yes" if holds else "NO"


def token_equality(runs: list[dict]) -> dict:
    """Per case: are all runs' generated ids identical, and does phi3v equal genai A and B?"""
    report = {}
    for case in {run["case"] for run in runs}:
        by_config: dict[str, set] = {}
        for run in runs:
            if run["case"] == case:
                for attempt in run["attempts"]:
                    by_config.setdefault(run["config"], set()).add(tuple(_strip_eos(attempt)))
        genai_ids = by_config.get("genai-A", set()) | by_config.get("genai-B", set())
        phi3v_ids = by_config.get("phi3v", set())
        fast_ids = by_config.get("phi3v-fast", set())
        report[case] = {
            "genai_deterministic": len(genai_ids) == 1 if genai_ids else None,
            # None where phi3v exact did not run (a fast-only run compares nothing here)
            "phi3v_deterministic": len(phi3v_ids) == 1 if phi3v_ids else None,
            "phi3v_equals_genai": len(genai_ids | phi3v_ids) == 1
            if phi3v_ids and genai_ids
            else None,
            "tokens": {c: [list(t) for t in ids] for c, ids in by_config.items()},
        }
        if fast_ids and phi3v_ids:
            a, b = next(iter(phi3v_ids)), next(iter(fast_ids))
            report[case]["fast_agrees_with_exact_for"] = next(
                (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                min(len(a), len(b)),
            )
        if genai_ids and phi3v_ids and len(genai_ids | phi3v_ids) > 1:
            a, b = next(iter(genai_ids)), next(iter(phi3v_ids))
            report[case]["first_difference"] = next(
                (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                min(len(a), len(b)),
            )
    return report


def _strip_eos(run: dict) -> list[int]:
    """genai keeps the stop token in its sequence; phi3v leaves it out. Compare without it."""
    ids = list(run["token_ids"])
    return (
        ids[:-1]
        if run.get("stop_reason") != "length" and ids and ids[-1] in (32007, 32000)
        else ids
    )


def _cell(stat: dict, digits: int) -> str:
    median, low, high = (round(stat[k], digits) for k in ("median", "min", "max"))
    fmt = f"{{:.{digits}f}}"
    if low == high:
        return fmt.format(median)
    return f"{fmt.format(median)} [{fmt.format(low)}–{fmt.format(high)}]"


DIGITS = {
    "load_s": 2,
    "preprocess_s": 3,
    "ttft_s": 3,
    "decode_ms": 1,
    "decode_tps": 1,
    "peak_rss_mib": 0,
}


def markdown(report: dict) -> str:
    m, v, s = report["machine"], report["versions"], report["summary"]
    lines = [
        f"# Benchmark `{report['name']}`: phi3v vs onnxruntime-genai",
        "",
        f"* date: {report['date']}; model: `{report['model']}` ({report['model_gb']:.2f} GB)",
        *([f"* {report['note']}"] if report.get("note") else []),
        f"* machine: {m['nproc']} cores, {m['cpu_model']}, {m['mem_gib']} GiB, "
        f"SIMD {', '.join(m['simd'])}",
        "* versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"* load average (1/5/15 min): start {_load(report['loadavg_start'])}, end "
        f"{_load(report['loadavg_end'])}; runs repeated because the machine was busy: "
        f"{report['busy_attempts']}; final attempts still busy: {report.get('busy_final', '?')}",
        f"* phi3v sources imported by the runs (sha256/12 of phi3v/*.py): "
        f"{', '.join(report.get('phi3v_sources', [])) or '?'}",
        f"* {report['runs']} processes per case and runtime, greedy, {NEW_TOKENS} new tokens; "
        "median [min–max]. TTFT excludes preprocessing for both; decode = tokens 2..32.",
        "",
        "| case | runtime | " + " | ".join(title for _, title, _ in METRICS) + " |",
        "|---|---|" + "---|" * len(METRICS),
    ]
    for case, configs in s.items():
        for config in CONFIGS:
            if config in configs:
                cells = [_cell(configs[config][key], DIGITS[key]) for key, _, _ in METRICS]
                lines.append(
                    f"| {case} ({report['prompt_ids'][case]} ids) | {config} | "
                    + " | ".join(cells)
                    + " |"
                )
    lines += [
        "",
        "Ratios of medians (below 1 means the first is faster or smaller):",
        "",
        "| case | vs | load | TTFT | decode ms/token | peak RSS |",
        "|---|---|---|---|---|---|",
    ]
    for case, configs in s.items():
        for ours, base in RATIO_PAIRS:
            if base in configs and ours in configs:
                ratios = [
                    configs[ours][k]["median"] / configs[base][k]["median"] for k in RATIO_METRICS
                ]
                lines.append(
                    f"| {case} | {ours} / {base} | " + " | ".join(f"{r:.2f}" for r in ratios) + " |"
                )
    lines += ["", "phi3v's own breakdown (medians): "]
    for case, configs in s.items():
        for config in (c for c in PRECISION if c in configs):
            p = configs[config]
            lines.append(
                f"* {case}, {config}: preprocess {p['preprocess_s']['median']:.3f} s, "
                f"vision {p['vision_s']:.3f} s, "
                f"embedding + prefill {p['prefill_s']:.3f} s"
            )
    lines += ["", "Token equality (phi3v fed genai's input ids):", ""]
    for case, eq in report["token_equality"].items():
        lines.append(
            f"* {case}: phi3v == genai: **{_verdict(eq['phi3v_equals_genai'])}**; genai "
            f"deterministic across runs and configs: {eq['genai_deterministic']}; phi3v "
            f"deterministic: {eq['phi3v_deterministic']}"
            + (
                f"; first difference at token {eq['first_difference']}"
                if "first_difference" in eq
                else ""
            )
            + (
                f"; phi3v-fast's greedy tokens equal exact's for the first "
                f"{eq['fast_agrees_with_exact_for']} (random weights: see docs/PERFORMANCE.md)"
                if "fast_agrees_with_exact_for" in eq
                else ""
            )
        )
    return "\n".join(lines) + "\n"


def _load(values) -> str:
    return " ".join(f"{x:.2f}" for x in values)


# ---------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Time phi3v against onnxruntime-genai 0.18.")
    parser.add_argument("--model", type=Path, help="model folder (genai_config.json + onnx files)")
    parser.add_argument("--runs", type=int, default=3, help="timed processes per case and runtime")
    parser.add_argument("--cases", default="text,image", help="comma-separated: text,image")
    parser.add_argument("--name", help="results file name (default: the model folder's name)")
    parser.add_argument(
        "--configs",
        default="genai-B,phi3v,phi3v-fast",
        help=f"comma-separated, from {', '.join(CONFIGS)} (genai-A: the released config)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one timed run
    parser.add_argument("--tokenize", help=argparse.SUPPRESS)  # internal: genai's input ids
    parser.add_argument("--prepare-fast", help=argparse.SUPPRESS)  # internal: the fast copies
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(json.loads(args.worker))
    if args.tokenize:
        return tokenize_main(json.loads(args.tokenize))
    if args.prepare_fast:
        return print("RESULT " + json.dumps(prepare_fast(Path(args.prepare_fast))))
    if args.model is None:
        parser.error("--model is required")
    cases = [c for c in args.cases.split(",") if c]
    unknown = set(cases) - set(PROMPTS)
    if unknown:
        parser.error(f"unknown case(s) {sorted(unknown)}; choose from {sorted(PROMPTS)}")
    configs = [c for c in args.configs.split(",") if c]
    if set(configs) - set(CONFIGS):
        parser.error(f"unknown config(s) {sorted(set(configs) - set(CONFIGS))}")
    name = args.name or args.model.resolve().name
    run_benchmark(args.model.resolve(), args.runs, cases, name, configs)


def run_benchmark(model: Path, runs: int, cases: list[str], name: str, configs: list[str]) -> None:
    date = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    loadavg_start = os.getloadavg()
    versions_start = versions()  # phi3v's commit when the runs began
    print(
        f"{name}: {model}, {runs} runs x {cases}; load average {_load(loadavg_start)}", flush=True
    )
    with tempfile.TemporaryDirectory(prefix="phi3v-bench-") as tmp:
        tmp = Path(tmp)
        image = make_image(tmp / "bench-1344x1008.png")
        folders = {
            "genai-A": model,
            "genai-B": make_config_b(model, tmp / "config-b"),
            "phi3v": model,
            "phi3v-fast": model,
            "phi3v-fast-gqa": model,
            "phi3v-fast-kernel": model,
            "phi3v-fast-kernel-bf16": model,
            "phi3v-fast-4k": model,
        }
        fast_setup = None
        if set(PRECISION).difference({"phi3v"}) & set(configs):
            # The copies are made and checked once per folder, before any timed run.
            # In a child: a worker forked from a parent that had held the copies would inherit
            # its resident size in ru_maxrss (Linux keeps the high-water mark across exec).
            fast_setup, _ = run_process(["--prepare-fast", str(model)])
            print(f"  fast copies ready: {fast_setup}", flush=True)
        ids, _ = run_process(
            ["--tokenize", json.dumps({"model": str(model), "cases": cases, "image": str(image)})]
        )
        print("  prompt ids: " + ", ".join(f"{c} {len(ids[c])}" for c in cases), flush=True)
        results = []
        for case in cases:
            for _ in range(runs):
                for config in configs:
                    run = timed_run(
                        config, folders[config], case, image if case == "image" else None, ids[case]
                    )
                    results.append(run)
    for run in results:
        for attempt in run["attempts"]:
            if attempt["input_ids"] != ids[run["case"]]:
                raise RuntimeError(f"{run['config']} saw other input ids than the tokenizer run")
            del attempt["input_ids"]  # 1935 numbers per run add nothing to the record
    report = {
        "name": name,
        "date": date,
        "model": str(model),
        "model_gb": sum(f.stat().st_size for f in model.iterdir() if f.is_file()) / 1e9,
        "machine": machine_info(),
        "versions": versions_start,
        "phi3v_commit_end": versions()["phi3v_commit"],
        "runs": runs,
        "new_tokens": NEW_TOKENS,
        "prompts": {c: PROMPTS[c] for c in cases},
        "prompt_ids": {c: len(ids[c]) for c in cases},
        "input_ids": ids,
        "image": {"size": IMAGE_SIZE, "kind": "seeded ramps + noise PNG"},
        "fast_setup": fast_setup,
        "busy_share_threshold": BUSY_SHARE,
        "busy_attempts": sum(a["busy"] for r in results for a in r["attempts"]),
        "busy_final": sum(r["attempts"][-1]["busy"] for r in results),
        "phi3v_sources": sorted(
            {a["phi3v_source"] for r in results for a in r["attempts"] if "phi3v_source" in a}
        ),
        "loadavg_start": loadavg_start,
        "loadavg_end": os.getloadavg(),
        "summary": summarize(results),
        "token_equality": token_equality(results),
        "raw_runs": results,
    }
    save(name, report, markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
