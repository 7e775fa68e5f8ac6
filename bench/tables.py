"""Markdown tables of the results files, one function per kind of result.

Each benchmark writes its own ``results/<name>.md`` with these, and the generated documents
(``report.py`` -> docs/PERFORMANCE.md, ``reliability.py`` -> docs/RELIABILITY.md) quote the same
tables, so a figure reads the same wherever it appears.
"""

from __future__ import annotations


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def projection_speed(forms: dict) -> str:
    """``prefill_forms.py``: one projection's time, ms, by row count and form (results from
    converter version 3 also hold a form with one scale per tensor)."""
    names = {"int4": "int4 MatMulNBits (released) ms", "tensor": "int8, one scale per tensor ms"}
    names["row"] = "int8, per-row scales ms"
    present = [form for form in names if form in forms["speed"][0]]
    return _table(
        ["rows", *[names[form] for form in present], "per-row vs int4"],
        [
            [
                f"{r['rows']}",
                *[f"{r[form]:.2f}" for form in present],
                f"{r['int4'] / r['row']:.1f}x",
            ]
            for r in forms["speed"]
        ],
    )


def projection_error(forms: dict) -> str:
    """``prefill_forms.py``: each form's error against a float64 product."""
    return _table(
        ["activations (512 rows)", "form", "relative error (Frobenius)", "max abs error"],
        [
            [
                r["activations"],
                r["form"],
                f"{r['relative_error']:.2e}",
                f"{r['max_abs_error']:.3g}",
            ]
            for r in forms["error"]
        ],
    )


def prefill_threshold(forms: dict) -> str:
    """``prefill_forms.py --model``: seconds to prefill S positions on each decoder."""
    return _table(
        ["S", "int4 decoder s", "integer-GEMM decoder s", "int4 / integer GEMM"],
        [
            [
                f"{r['positions']}",
                f"{r['int4']:.3f}",
                f"{r['integer GEMM']:.3f}",
                f"{r['int4'] / r['integer GEMM']:.2f}",
            ]
            for r in forms["suffixes"]
        ],
    )


def memory(report: dict) -> str:
    """``memory.py``: peak RSS by prompt length."""
    return _table(
        [
            "prompt tokens",
            "precision",
            "RSS after load MiB",
            "peak RSS MiB",
            "peak - loaded MiB",
            "KV cache MiB",
            "one chunk's logits MiB",
        ],
        [
            [
                f"{r['length']:,}",
                r["precision"],
                f"{r['loaded_mib']:,.0f}",
                f"{r['peak_mib']:,.0f}",
                f"{r['peak_mib'] - r['loaded_mib']:,.0f}",
                f"{r['kv_mib']:,.0f}",
                f"{r['chunk_logits_mib']:,.0f}",
            ]
            for r in report["rows"]
        ],
    )


def fidelity_report(result: dict) -> str:
    """``accuracy.py``: each path's agreement with fp32-activation truth on the trained proxies,
    beside the speed of one real-size decoder layer's projections in its form; then each fast
    variant against exact on the same tokens, with intervals (bench/paired.py)."""
    decoder, vision = result["decoder"], result["vision"]
    tune, held = decoder["tune"], decoder["held_out"]
    speed = result.get("speed", {})
    base = tune["paths"]["exact"]["mean_kl"]
    columns = list(speed)
    clear = "top1_clear" in tune["paths"]["exact"]  # results before near ties were counted lack it
    header = [
        "path",
        "top-1 (tune)",
        "mean KL (tune)",
        "KL / exact",
        "first-token KL",
        *([f"top-1 where truth leads by {decoder['near_tie']:g}+ (tune)"] if clear else []),
        "top-1 (held out)",
        "mean KL (held out)",
        "vision error / exact",
        *[f"layer ms, {name}" for name in columns],
    ]
    vision_base = vision["paths"]["exact"]["mean_error"]
    draws = vision.get("draws", 1)  # results before the draws (bench/vision_proxy.py) had one
    rows = []
    for path, numbers in tune["paths"].items():
        out = held["paths"][path]
        speed_name = "int4 (exact)" if path == "exact" else path
        rows.append(
            [
                path,
                _share(numbers),
                f"{numbers['mean_kl']:.4f}",
                f"{numbers['mean_kl'] / base:.2f}x",
                f"{numbers['first_kl']:.4f}",
                *([f"{numbers['top1_clear']:.1%}"] if clear else []),
                _share(out),
                f"{out['mean_kl']:.4f}",
                f"{_vision_ratio(vision, path):.2f}x",
                *[f"{speed[name].get(speed_name, float('nan')):.1f}" for name in columns],
            ]
        )
    lines = [
        f"{result['date']}; phi3v {result['commit']}; {result['cpu']}; `{result['command']}`; "
        f"load average {result['load_before'][0]:.2f} -> {result['load_after'][0]:.2f}"
        + (
            f"; speed measured apart, load average {result['speed_load'][0]:.2f} after"
            if "speed_load" in result
            else ""
        )
        + (
            f"; vision measured again apart ({vision['measured']['date']}, phi3v "
            f"{vision['measured']['commit']}"
            + (f", {vision['measured']['cpu']}" if "cpu" in vision["measured"] else "")
            + ")."
            if "measured" in vision
            else "."
        ),
        "",
        f"Decoder proxy: {tune['documents']} tuning and {held['documents']} held-out documents, "
        f"prompts of {min(tune['prompt_tokens'] + held['prompt_tokens'])}-"
        f"{max(tune['prompt_tokens'] + held['prompt_tokens'])} tokens, "
        f"{tune['answer_tokens']} teacher-forced answer tokens each. Vision proxy: "
        f"{len(vision['photos'])} photographs"
        + (f" x {draws} draws of the rounding noise" if draws > 1 else ", one draw")
        + f", relative feature error (exact: {vision_base:.4f}). Layer: one decoder layer's "
        "four projections at 512 rows."
        + (
            f" Truth leads by {decoder['near_tie']:g}+ where its likeliest token's probability "
            f"is at least {decoder['near_tie']:g} above the second's."
            if clear
            else ""
        ),
        "",
        _table(header, rows),
    ]
    if "paired" in tune:
        lines += ["", _paired_note(tune, held), "", fidelity_paired(decoder)]
    if draws > 1:
        lines += ["", _vision_note(vision), "", fidelity_vision(vision)]
    return "\n".join(lines)


def _vision_ratio(vision: dict, path: str) -> float:
    numbers = vision["paths"][path]
    return numbers.get("ratio", numbers["mean_error"] / vision["paths"]["exact"]["mean_error"])


def fidelity_vision(vision: dict) -> str:
    """Each fast variant's vision error against exact's, pooled over photos and draws."""
    rows = [
        [
            path,
            _estimate({"value": n["ratio"], "interval": n["interval"]}, ".2f", "x"),
            "{:.2f}x-{:.2f}x".format(*n["draw_range"]),
            f"{n['worst_ratio']:.2f}x",
        ]
        for path, n in vision["paths"].items()
        if path != "exact"
    ]
    header = ["path", "vision error / exact", "single draws", "worst photo"]
    return _table(header, rows)


def _vision_note(vision: dict) -> str:
    return (
        f"The vision proxy's error, pooled over {len(vision['photos'])} photographs and "
        f"{vision['draws']} draws of the rounding noise (each draw moves the input values by "
        f"{vision['jitter']:.1e} of themselves, which changes where a quantized path rounds "
        "and not truth: bench/vision_proxy.py). In brackets: 95 % intervals from a bootstrap "
        'over photos; "single draws": the lowest and highest ratio of one draw alone, what a '
        'single run could have shown; "worst photo": its mean error over the draws.'
    )


def fidelity_paired(decoder: dict) -> str:
    """Each fast variant against exact on the same teacher-forced tokens, tune and held out."""
    header = [
        "path",
        "top-1 minus exact's, points (tune)",
        "right where exact is not / exact right where it is not (tune)",
        "same top-1 as exact (tune)",
        "KL / exact (tune)",
        "first-token KL / exact (tune)",
        "top-1 minus exact's, points (held out)",
        "KL / exact (held out)",
    ]
    tune, held = decoder["tune"]["paired"], decoder["held_out"]["paired"]
    rows = [
        [
            path,
            _estimate(numbers["top1_difference"], "+.1f"),
            f"{numbers['only_path_right']} / {numbers['only_exact_right']}",
            _estimate(numbers["same_as_exact"], ".1%"),
            _estimate(numbers["kl_ratio"], ".2f", "x"),
            _estimate(numbers["first_kl_ratio"], ".2f", "x"),
            _estimate(held[path]["top1_difference"], "+.1f"),
            _estimate(held[path]["kl_ratio"], ".2f", "x"),
        ]
        for path, numbers in tune.items()
    ]
    return _table(header, rows)


def _paired_note(split: dict, held: dict) -> str:
    return (
        "Each fast variant against exact on the same positions (paired). In brackets: 95 % "
        f"intervals from a bootstrap over documents ({split['resamples']:,} resamples of the "
        "texts, each resample pooling its texts' positions), because the positions of one text "
        "are not independent; an interval that contains 0 (or 1.00x) means these texts cannot "
        f"tell the two apart. The held-out split has {held['documents']} texts: its resamples "
        "can only recombine those, so its intervals are too narrow to trust."
    )


def _share(numbers: dict) -> str:
    """A top-1 share, with its interval where the results have one."""
    if "top1_interval" not in numbers:
        return f"{numbers['top1']:.1%}"
    return _estimate({"value": numbers["top1"], "interval": numbers["top1_interval"]}, ".1%")


def _estimate(numbers: dict, spec: str, unit: str = "") -> str:
    """``value [low, high]`` of a pooled estimate and its interval, e.g. ``-0.4 [-1.1, +0.4]``."""
    low, high = numbers["interval"]
    return f"{numbers['value']:{spec}}{unit} [{low:{spec}}, {high:{spec}}]"


def openvino_peer(rows: list[dict]) -> str:
    """``openvino_peer.py``: each runtime's median time, its ratio to exact, peak RSS, load time
    and output difference from exact, by measurement; failures and skips say so."""
    exact = {r["measurement"]: r.get("median_s") for r in rows if r["runtime"] == "exact"}
    body = []
    for r in rows:
        if "median_s" not in r:
            status = "failed" if r.get("error") else "not run"
            body.append([r["measurement"], r["runtime"], r["timed"], status, "", "", "", ""])
            continue
        each = ", ".join(f"{s:.3g}" for s in r["seconds"])
        reference = exact.get(r["measurement"])
        loop = r.get("loop_on_onnxruntime_s")
        timed = r["timed"] + (f"; Loop on onnxruntime {loop * 1e3:.0f} ms" if loop else "")
        difference = r.get("difference_from_exact")
        body.append(
            [
                r["measurement"],
                r["runtime"],
                timed,
                f"{r['median_s']:.3g} [{each}]",
                f"{r['median_s'] / reference:.2f}" if reference else "",
                f"{r['peak_rss_mib']:,.0f}",
                f"{r['load_s']:.1f}",
                f"{difference:.1e}" if difference is not None else "",
            ]
        )
    return _table(
        [
            "measurement",
            "runtime",
            "what was timed",
            "median s [each run]",
            "/ exact",
            "peak RSS MiB",
            "load s",
            "output vs exact (rel. L2)",
        ],
        body,
    )


def fast_profile(report: dict) -> str:
    """``prefill_profile.py``: the fast copies' vision and prefill of a photo, by configuration."""
    rows = []
    for row in report["rows"]:
        numerics = {
            "default": report["default_numerics"]["decoder"],
            "per row": "per row",
            "before": "per row, converter v3 (before)",  # the results of Dec 6, morning
        }.get(row["numerics"], row["numerics"])
        top = ", ".join(f"{op} {s:.2f}" for op, s in list(row["prefill_ops"].items())[:5])
        vision = ", ".join(f"{op} {s:.2f}" for op, s in list(row["vision_ops"].items())[:5])
        rows.append(
            [
                numerics,
                f"{row['chunk']}",
                "on" if row["flash"] else "off",
                f"{row['vision']:.2f}",
                f"{row['prefill']:.2f}",
                f"{row['vision'] + row['prefill']:.2f}",
                f"{row['attention_share']:.0%}",
                top,
                vision,
            ]
        )
    header = [
        "decoder numerics",
        "prefill chunk",
        "GQA tiled path",
        "vision s (13 crops)",
        "prefill s (1935)",
        "sum s",
        "GroupQueryAttention share of prefill",
        "largest prefill operators, profiled run (s)",
        "largest vision operators, profiled run (s)",
    ]
    return "\n".join(
        [
            f"{report['date']}; phi3v {report['commit']}; {report['cpu']}; `{report['command']}`; "
            f"median of {report['runs']} processes per row, alternated; load average "
            f"{report['load_before'][0]:.2f} -> {report['load_after'][0]:.2f}. Vision numerics: "
            f"{report['default_numerics']['vision']} (default) vs per row.",
            "",
            _table(header, rows),
        ]
    )


def _form_pairs(report: dict, name: str) -> str:
    """The (query, key) pairs a form computes, as a multiple of the causal minimum."""
    pairs = report["pairs"]
    return f"{pairs['forms'][name] / pairs['causal']:.2f}x"


def attention_forms(report: dict) -> str:
    """``attention_forms.py``: the run, each form's time and error, and the target."""
    parts = [attention_header(report), attention_table(report)]
    if report.get("target"):
        parts.append(attention_target(report))
    return "\n\n".join(parts)


def attention_header(report: dict) -> str:
    """Where, when and how the attention forms were measured."""
    shape, errors = report["shape"], report["error"]
    proxy = errors.get("proxy")
    proxy_line = (
        f" Proxy: SmolLM2-135M's rotated Q/K/V ({proxy['shape']['heads']} heads of "
        f"{proxy['shape']['head']}, {proxy['shape']['kv_heads']} key/value heads) on "
        f"`{proxy['shape']['text']}`, layers {', '.join(map(str, proxy['layers']))}, weight on the "
        "first key "
        + "/".join(f"{layer['sink_weight']:.2f}" for layer in proxy["layers"].values())
        + "."
        if proxy
        else ""
    )
    return (
        f"{report['date']}; phi3v {report['versions']['phi3v_commit']}; {report['cpu']} "
        f"(`{', '.join(report['cpu_flags'])}`); onnxruntime {report['versions']['onnxruntime']}; "
        f"`{report['command']}`; median of {report['rounds']} processes x {report['repeats']} "
        f"runs per form, forms alternated, 2 threads; load average "
        f"{report['load_before'][0]:.2f} -> {report['load_after'][0]:.2f}.\n\n"
        f"One layer: {shape['heads']} heads of {shape['head']} ({shape['kv_heads']} key/value "
        f"heads), {shape['positions']:,} positions; GroupQueryAttention in chunks of "
        f"{shape['chunk']} as the fast prefill runs it. Error: against float64 causal attention; "
        f"synthetic Q/K/V with outlier channels, a key bias and a sink (mean weight on the first "
        f"key {errors['synthetic']['sink_weight']:.2f}).{proxy_line}"
    )


def attention_table(report: dict) -> str:
    """One row per form: pairs computed, ms and GQA's ratio per run, errors."""
    speed, errors = report["speed"], report["error"]
    base = "GroupQueryAttention"
    runs = list(speed)
    header = ["form", "pairs / causal minimum"]
    for run in runs:
        header += [f"ms, {run}", f"GQA / form, {run}"]
    header += ["relative error (synthetic)", "max abs error (synthetic)"]
    proxy = errors.get("proxy")
    if proxy:
        header.append(f"relative error, proxy layers {' / '.join(map(str, proxy['layers']))}")
    rows = []
    for name in speed[runs[0]]:
        row = [name, _form_pairs(report, name)]
        for run in runs:
            ms = speed[run][name]["median_ms"]
            ratio = f"{speed[run][base]['median_ms'] / ms:.2f}x" if ms else "–"
            row += [f"{ms:.0f}" if ms else "not run", ratio]
        synthetic = errors["synthetic"]["forms"][name]
        if "not_run" in synthetic:
            row += ["not run", "not run"]
        else:
            row += [f"{synthetic['relative_error']:.1e}", f"{synthetic['max_abs_error']:.2g}"]
        if proxy:
            row.append(
                " / ".join(
                    "not run"
                    if "not_run" in layer["forms"][name]
                    else f"{layer['forms'][name]['relative_error']:.1e}"
                    for layer in proxy["layers"].values()
                )
            )
        rows.append(row)
    notes = {
        note
        for run in runs
        for name, entry in speed[run].items()
        if (note := f"{name}, {run}: {entry['not_run']}" if entry.get("not_run") else "")
    }
    return _table(header, rows) + "".join(f"\n\nNot run: {n}." for n in sorted(notes))


def attention_target(report: dict) -> str:
    """The arithmetic of issue 16's 25 % target, and the fused-kernel estimates."""
    goal, shape = report["target"], report["shape"]
    gqa = report["speed"]["this CPU"]["GroupQueryAttention"]["median_ms"]
    inside = 1000 * goal["attention_s"] / shape["layers"]  # ms per layer in the decoder
    lines = [
        f"From {goal['source']}: in the profiled fast prefill (chunk {shape['chunk']}) "
        f"GroupQueryAttention took {goal['attention_s']:.2f} s and every other operator "
        f"{goal['other_s']:.2f} s: attention is {goal['share']:.0%}. For attention to be 25 % it "
        f"may take a third of the rest, {goal['allowed_s']:.2f} s, "
        f"**{goal['allowed_ms_per_layer']:.0f} ms per layer**: "
        f"{gqa / goal['allowed_ms_per_layer']:.1f}x faster than GroupQueryAttention alone here "
        f"({gqa:.0f} ms), {inside / goal['allowed_ms_per_layer']:.1f}x faster than it ran inside "
        f"the profiled prefill ({inside:.0f} ms per layer, where it also rotates Q and K "
        "and runs under the profiler; the rest of that gap is not explained here).",
        "",
        "| fused causal kernel | estimated ms per layer | measured ms per layer (ours) | "
        "32 layers, s | attention share | within 25 %? |",
        "|---|---|---|---|---|---|",
    ]
    for name, e in report["estimates"].items():
        if not isinstance(e, dict):
            continue
        ms = report["speed"]["this CPU"].get(KERNEL_FORMS.get(name), {}).get("median_ms")
        if ms is None:
            lines.append(f"| {name} | {e['ms_per_layer']:.0f} | not run | | | |")
            continue
        total = ms * shape["layers"] / 1000
        share = total / (total + goal["other_s"])
        lines.append(
            f"| {name} | {e['ms_per_layer']:.0f} | {ms:.0f} | {total:.1f} | {share:.0%} | "
            f"{'yes' if ms <= goal['allowed_ms_per_layer'] else 'no'} |"
        )
    return "\n".join(lines)


# attention_forms.py's estimate -> the form that measures it (phi3v/kernels/attention.c)
KERNEL_FORMS = {
    "fused fp32": "fused causal fp32 (our kernel)",
    "fused AMX bf16": "fused causal AMX bf16 (our kernel)",
}


def _rotation_name(rotation) -> str:
    return {0: "none", "whole": "whole K"}.get(rotation, f"block {rotation}")


def vision_attribution(result: dict) -> str:
    """``vision_attribution.py``: the fast vision copy's error on the proxy, by source, role,
    layer and remainder weights, as multiples of exact's error."""
    rotations = list(dict.fromkeys(row["rotation"] for row in result["sources"]))
    parts = list(dict.fromkeys(row["part"] for row in result["sources"]))
    ratio = {(r["part"], r["rotation"]): r["ratio"] for r in result["sources"]}
    default = result["default_rotation"]
    head = (
        f"{result['date']}; phi3v {result['commit']}; {result['cpu']}; DINOv2 ViT-S/14 int4 on "
        f"{result['photos']} photographs"
        + (
            f" x {result['draws']} draws of the rounding noise (bench/vision_proxy.py)"
            if result.get("draws", 1) > 1
            else ", one draw"
        )
        + f"; exact's mean relative feature error {result['exact_error']:.4f}; every figure is "
        "a path's mean error / exact's."
    )
    sources = _table(
        ["rounded (every projection)", *[_rotation_name(r) for r in rotations]],
        [[part, *[f"{ratio[part, r]:.2f}x" for r in rotations]] for part in parts],
    )
    roles = _table(
        [
            "role alone, rotation " + _rotation_name(default),
            "share of the GEMM work",
            "weights int8",
            "activations",
            "both",
        ],
        [
            [
                r["role"],
                f"{r['flops_share']:.0%}",
                f"{r['weights']:.2f}x",
                f"{r['activations']:.2f}x",
                f"{r['both']:.2f}x",
            ]
            for r in result["roles"]
        ],
    )
    layers = _table(
        ["layer alone", *[str(r["layer"]) for r in result["layers"]]],
        [
            [part, *[f"{r[part]:.2f}" for r in result["layers"]]]
            for part in ("weights", "activations", "both")
        ],
    )
    remainder = _table(
        ["rotation", "remainder weights on", "GEMM work added", "error / exact", "worst photo"],
        [
            [
                _rotation_name(r["rotation"]),
                r["remainder"],
                f"+{r['added_gemm_share']:.0%}",
                f"{r['ratio']:.2f}x",
                f"{r['worst_ratio']:.2f}x",
            ]
            for r in result["remainder"]
        ],
    )
    apart = "apart" in result["copies"][0]  # results before the draws lack it
    copies = _table(
        ["numerics", "real copy", "simulated", *(["copy vs simulation"] if apart else [])],
        [
            [
                r["numerics"],
                f"{r['copy']:.2f}x",
                f"{r['simulated']:.2f}x",
                *([f"{r['apart']:.2f}x"] if apart else []),
            ]
            for r in result["copies"]
        ],
    )
    return "\n\n".join(
        [
            head,
            "By source and rotation:",
            sources,
            "By role:",
            roles,
            "By layer (error / exact with that layer alone rounded):",
            layers,
            "Remainder weights (the whole copy rounded, activations per row):",
            remainder,
            "The simulation against real integer-GEMM copies"
            + (
                ' ("copy vs simulation": how far apart their features are, in the same unit):'
                if apart
                else ":"
            ),
            copies,
            *(_divergence(result["divergence"]) if "divergence" in result else []),
        ]
    )


def _divergence(rows: list[dict]) -> list[str]:
    """``vision_attribution.py``'s real default copy against its simulation, layer by layer."""
    table = _table(
        ["after", "copy vs simulation", "copy vs truth", "simulation vs truth"],
        [
            [
                f"layer {r['layer']} {r['projection']}",
                f"{r['apart']:.1e}",
                f"{r['copy_error']:.1e}",
                f"{r['simulated_error']:.1e}",
            ]
            for r in rows
        ],
    )
    return [
        "The default copy and its simulation through the layers, on the photos as they are "
        "(relative differences of a projection's output): they agree to float rounding at the "
        "first projection and part as each layer rounds again what the last changed, until "
        "they are as far apart as each is from truth: two draws of the same rounding noise.",
        table,
    ]


def vision_speed(
    result: dict,
    target_error: float,
    target_time: float,
    first_answer: dict[str, float],
    derived_from: str = "AMX",
) -> str:
    """``vision_speed.py``: candidates' error on the proxy beside their vision time at 17 crops
    and what that makes of a photo's first answer (``first_answer``: a multiple of the
    baseline's), judged against the targets."""
    columns = list(result["speed"])
    base = result["baseline"]
    header = ["candidate", "vision error / exact (proxy)"]
    for column in columns:
        header += [f"s, {column}", f"vs {base}, {column}"]
    header += [f"first answer vs today's fast ({derived_from}, derived)", "meets both targets"]
    rows = []
    for name, accuracy in result["accuracy"].items():
        error = f"{accuracy['ratio']:.2f}x"
        if "interval" in accuracy:  # pooled over draws: the 95 % interval over the photos
            error += " [{:.2f}, {:.2f}]".format(*accuracy["interval"])
        row = [name, error]
        for column in columns:
            times = result["speed"][column]
            row += [f"{times[name]:.2f}", f"{times[name] / times[base]:.2f}x"]
        cost = first_answer.get(name)
        met = accuracy["ratio"] <= target_error and cost is not None and cost <= target_time
        row.append(f"{cost:.2f}x" if cost is not None else "")
        rows.append([*row, "**yes**" if met else "no"])
    return _table(header, rows)
