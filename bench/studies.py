"""The measured studies in docs/PERFORMANCE.md, as prose generated from their results: prefill
attention forms (issue 16, ``bench/attention_forms.py``), where the fast vision copy's error
comes from (issue 15, ``bench/vision_attribution.py`` and ``bench/vision_speed.py``) and the
decoder proxy against issue 15's targets (``bench/accuracy.py``).

Each function takes the loaded results and returns Markdown; ``report.py`` places it.
"""

from __future__ import annotations

from dataclasses import asdict

import tables
from paired import MARGINS, NEAR_TIE

from phi3v import integer_gemm
from phi3v.convert import DEFAULT_NUMERICS

DEFAULT_VISION = DEFAULT_NUMERICS.vision

FORM_MEANINGS = """\
* **GroupQueryAttention**: the fast decoder's attention as it runs, onnxruntime's fused fp32
  kernel with its tiled ("flash") path: online softmax over key blocks sized from the L2 cache,
  stopping at the first fully masked block.
* **tiled path off**: the same kernel materializing each chunk's scores
  (`ORT_GQA_DISABLE_FLASH_ATTENTION=1`, read when the session is made).
* **MultiHeadAttention, no mask**: the same chunks without the causal mask, so its outputs are
  wrong (the error column); it is here for its rate, onnxruntime's fastest fp32 attention.
* **block-causal fp32**: plain `MatMul`, `Add` (mask), `Softmax`, `MatMul` per block of 256 (or
  128) query rows over the keys up to the block's end: exact, and it skips more masked work.
* **products only**: the 256 form's two `MatMul`s alone, no mask, no softmax: the least any
  plain-ops form pays.
* **int8 QK**: SageAttention's Q·Kᵀ: K minus the first chunk's mean key (exact under softmax),
  int8 per key token; Q int8 per head and query block; `MatMulIntegerToFloat` batched over heads
  (AMX where the CPU has it), both scales and 1/sqrt(96) folded into its per-column scale.
* **int8 QK and PV**: also P·V on the integer GEMM: P uint8 per row, V int8 per head and
  channel.
* **fused causal (our kernel)**: `phi3v/kernels/attention.c`, called through ctypes (not an
  onnxruntime operator), in the same chunks of the same cache as GroupQueryAttention: blocks of
  query rows meet blocks of 64 keys only up to their last row, scores stay in cache, online
  softmax. **fp32**: AVX-512, blocks of 32 rows, or AVX2 + FMA, blocks of 16. **AMX bf16**: Q·Kᵀ
  and P·V on the tiles (`_tile_dpbf16ps`, fp32 accumulation), Q, K, V and the weights rounded to
  bf16, the softmax in fp32; blocks of 16 rows; each chunk's K and V converted once, into bf16
  copies (K as is, V transposed) that the later chunks read. It refuses to run where AMX is refused
  ("not run")."""


def attention_section(report: dict, fidelity: dict | None = None) -> str:
    """Issue 16's attention study: the forms, the target, the reasons, the next step; with
    ``fidelity`` (attention_fidelity.json), what the trained proxy says of their numerics."""
    speed = report["speed"]["this CPU"]
    pairs, shape, goal = report["pairs"], report["shape"], report.get("target")
    ms = {name: entry["median_ms"] for name, entry in speed.items() if entry["median_ms"]}
    gqa = ms["GroupQueryAttention"]
    causal, chunked, blocked = pairs["causal"], pairs["chunked"], pairs["block"]
    scores_mb = blocked * shape["heads"] * 4 / 1e6
    products = ms["products only fp32, 256 (no softmax, no mask)"]
    plain = ms["block-causal fp32, 256"]
    int8 = "int8 QK (SageAttention-style), 256"
    vnni = report["speed"].get("AMX refused (VNNI only)", {}).get(int8, {}).get("median_ms")
    synthetic = report["error"]["synthetic"]["forms"]
    causal_forms = [n for n in ms if "MultiHeadAttention" not in n and "products" not in n]
    ours = set(tables.KERNEL_FORMS.values())
    graphs = [n for n in causal_forms if "GroupQueryAttention" not in n and n not in ours]
    fastest = min(graphs, key=ms.get)  # the fastest causal form in plain onnxruntime ops
    reasons = [
        f"* **Chunking already skips most of the masked work.** In chunks of {shape['chunk']}, "
        f"GroupQueryAttention's queries meet {chunked / causal:.2f}x the causal minimum of "
        f"(query, key) pairs (the full square is {pairs['full'] / causal:.2f}x); query blocks of "
        f"{shape['block']} bring it to {blocked / causal:.2f}x, so skipping more can win at most "
        f"{chunked / blocked:.2f}x, before any cost of doing it.",
        f"* **Plain ops pay for materializing.** The {shape['block']}-row form writes and reads "
        f"the scores of every computed pair, {scores_mb:.0f} MB of fp32 per layer, and again as "
        f"probabilities; its two products alone take {products:.0f} ms "
        f"({products / gqa:.2f}x GroupQueryAttention's {gqa:.0f} ms), and with the mask and "
        f"softmax {plain:.0f} ms. The fused kernels keep their tiles in cache.",
    ]
    if vnni and vnni < 1.2 * ms[int8]:
        reasons.append(
            f"* **int8 on the matrix unit does not pay here.** The int8 Q·Kᵀ form takes "
            f"{ms[int8]:.0f} ms with AMX and {vnni:.0f} ms with AMX refused: the multiply-adds "
            f"are not what costs. Its GEMM has an inner dimension of only {shape['head']} (one "
            "head), so each fp32 score it writes took few operations; writing the scores and "
            "the quantization passes around the GEMM (absolute maxima, scales, codes) set the "
            f"time, and it adds error ({synthetic[int8]['relative_error']:.0e} relative, "
            "synthetic inputs)."
        )
    elif vnni:
        reasons.append(
            f"* **int8 on the matrix unit helps the product, not the form.** AMX makes the int8 "
            f"Q·Kᵀ form {vnni / ms[int8]:.2f}x faster than VNNI alone, yet it takes "
            f"{ms[int8] / gqa:.2f}x GroupQueryAttention's time: the scores are still written in "
            "fp32 and read back, and the quantization passes come on top; it adds error "
            f"({synthetic[int8]['relative_error']:.0e} relative, synthetic inputs)."
        )
    tiled_off = ms["GroupQueryAttention, tiled path off"]
    tiled = (
        f"GroupQueryAttention's tiled path is in use and pays: without it the same kernel takes "
        f"{tiled_off:.0f} ms ({tiled_off / gqa:.2f}x)."
        if tiled_off > gqa
        else f"GroupQueryAttention without its tiled path takes {tiled_off:.0f} ms "
        f"({gqa / tiled_off:.2f}x faster than with it): worth setting "
        "`ORT_GQA_DISABLE_FLASH_ATTENTION` for the fast prefill after a whole-prefill check."
    )
    verdict = (
        "No causal form in plain ops beats GroupQueryAttention here: the fastest, "
        f"{fastest}, takes {ms[fastest]:.0f} ms ({gqa / ms[fastest]:.2f}x its speed). {tiled}"
        if ms[fastest] >= gqa
        else f"{fastest} is faster than GroupQueryAttention ({gqa / ms[fastest]:.2f}x) at a "
        f"relative error of {synthetic[fastest]['relative_error']:.1e} on synthetic inputs; "
        "before it replaces GroupQueryAttention in the fast copy, judge it with the trained "
        "proxy's KL/top-1 (bench/accuracy.py), since only the attention output's error was "
        f"measured here. {tiled}"
    )
    parts = [
        "From `bench/results/attention_forms.md`: issue 16 asks for prefill attention at no more "
        "than 25 % of prefill time (the profile above: about half). Each form below is one "
        "layer's attention over the photo's prompt, as a small ONNX graph (or, for our kernel, "
        "a compiled function) timed in its own process; its error is the attention output's "
        "against float64 (the trained proxy's real Q/K/V give a tensor error too; KL and top-1 "
        "in a real decoder are `bench/attention_fidelity.py`'s, in the section after this one).",
        FORM_MEANINGS,
        tables.attention_header(report),
        tables.attention_table(report),
    ]
    if goal:
        parts.append(tables.attention_target(report))
    parts += [
        "Why the plain-ops forms cannot reach it:",
        "\n".join(reasons),
        verdict,
    ]
    if goal:
        allowed = goal["allowed_ms_per_layer"]
        best = min(causal_forms, key=ms.get)
        parts.append(
            (
                "**A measured form fits the budget, in this study only** (the fast copy still "
                "runs GroupQueryAttention, so the target itself is not met yet): "
                if ms[best] <= allowed
                else "**The target is missed**: "
            )
            + f"{allowed:.0f} ms per layer needs {gqa / allowed:.1f}x GroupQueryAttention's speed; "
            f"the best causal form measured, {best}, takes {ms[best]:.0f} ms."
        )
        parts.append(kernel_paragraph(report, fidelity))
    return "\n\n".join(parts)


def kernel_paragraph(report: dict, fidelity: dict | None = None) -> str:
    """What our fused kernel measured against GroupQueryAttention, the target and the estimates,
    what the trained proxy says of its numerics (``fidelity``: attention_fidelity.json), and what
    it would take to put it in the product."""
    speed, goal, estimates = report["speed"], report["target"], report["estimates"]
    gqa = speed["this CPU"]["GroupQueryAttention"]["median_ms"]
    allowed, layers = goal["allowed_ms_per_layer"], report["shape"]["layers"]
    synthetic = report["error"]["synthetic"]["forms"]
    proxy = report["error"].get("proxy")
    found = []
    for estimate, name in tables.KERNEL_FORMS.items():
        entry = speed["this CPU"].get(name, {})
        if not entry.get("median_ms"):
            found.append(f"{name}: not run here ({entry.get('not_run', 'no result')}).")
            continue
        ms = entry["median_ms"]
        total = ms * layers / 1000
        share = total / (total + goal["other_s"])
        error = synthetic[name].get("relative_error")
        worst = (
            max(layer["forms"][name].get("relative_error", 0) for layer in proxy["layers"].values())
            if proxy
            else None
        )
        refused = speed.get("AMX refused (VNNI only)", {}).get(name, {})
        found.append(
            f"**{name}: {ms:.0f} ms per layer**, {gqa / ms:.2f}x GroupQueryAttention's speed "
            f"({gqa:.0f} ms); 32 layers {total:.1f} s, attention {share:.0%} of the prefill, "
            + ("**within** " if ms <= allowed else "**short of** ")
            + f"the {allowed:.0f} ms budget (estimated beforehand: "
            f"{estimates[estimate]['ms_per_layer']:.0f} ms). Error {error:.1e} relative on the "
            "synthetic inputs"
            + (f", at most {worst:.1e} on the proxy's layers" if worst is not None else "")
            + (
                f"; with AMX refused {refused['median_ms']:.0f} ms."
                if refused.get("median_ms")
                else "; with AMX refused: not run (it needs the tiles)."
                if refused
                else "."
            )
        )
    bf16 = synthetic.get(tables.KERNEL_FORMS["fused AMX bf16"], {}).get("relative_error")
    int8 = synthetic.get("int8 QK (SageAttention-style), 256", {}).get("relative_error")
    if bf16 and int8:
        found.append(
            f"The bf16 error ({bf16:.1e} on the synthetic inputs) is {int8 / bf16:.1f}x smaller "
            f"than the int8 Q·Kᵀ form's ({int8:.1e}); most of it comes from rounding Q and K "
            "to bf16 (8 significant bits; V and the weights add less), which the outlier "
            "channels and the sink make large scores of. Subtracting the mean key first (exact "
            "under softmax) takes only part of it away; splitting Q and K into two bf16 parts "
            "(three products) or keeping Q·Kᵀ in fp32 would trade speed for the rest."
        )
    return (
        "Our fused kernel, measured in the same rounds (the estimates above were made before it "
        "existed and stay as context): "
        + " ".join(found)
        + " Both time the same chunked run as GroupQueryAttention, including writing each "
        "chunk's keys and values into the cache (done here by numpy), but not rotary: "
        "GroupQueryAttention's time here excludes it too, while inside the profiled prefill "
        f"GroupQueryAttention took {goal['attention_s'] * 1000 / layers / gqa:.1f}x its isolated "
        "time. **What the product would need**: the kernel inside the fast decoder's graph, as "
        "a custom operator (C++, loaded with `SessionOptions.register_custom_ops_library`; phi3v "
        "would ship compiled code per platform for the first time) or as an onnxruntime "
        "contribution to GroupQueryAttention's tiled path (key blocks that follow the diagonal, "
        "bf16 tiles on AMX), which every user of the released model would get. Either way it "
        "must also do what GroupQueryAttention does around the products: rotate Q and K with "
        "the model's rotary caches, write the chunk's K and V into the shared past/present "
        "buffer that decode reads (the int4 decode path unchanged), keep the AMX variant's bf16 "
        "copies of every layer's keys and values for the length of the prefill (or hold the "
        "cache itself in bf16, which decode would then read), take `seqlens_k` and "
        "`total_sequence_length`, and choose AMX or the fp32 path at run time. " + judged(fidelity)
    )


def judged(fidelity: dict | None) -> str:
    """What the trained proxy's KL/top-1 says of the bf16 and int8 attention numerics
    (bench/attention_fidelity.py), or that it is still to be measured."""
    if not fidelity:
        return (
            "Before it replaces GroupQueryAttention, the bf16 variant's error must be judged by "
            "the trained proxy's KL/top-1 in a real decoder, not by the tensor error here."
        )
    paths = fidelity["tune"]["paths"]
    exact = paths["exact"]["mean_kl"]

    def kl(path: str) -> str:
        return f"{paths[path]['mean_kl'] / exact:.3g}x"

    return (
        "**Judged on the trained proxy** (`bench/attention_fidelity.py`, the section below: "
        "each numerics emulated in ONNX operators inside a real decoder, KL and top-1 against "
        f"truth): bf16 attention alone adds {kl('fp32 activations: bf16')} exact's own KL "
        f"(top-1 {paths['fp32 activations: bf16']['top1']:.1%} against truth), and the fast "
        f"copy with it has {kl('fast copy: bf16')} exact's KL, against "
        f"{kl('fast copy: fp32')} with fp32 attention: within the fidelity limit of 1.5x. "
        f"int8 Q·Kᵀ with smoothed keys is as safe ({kl('fast copy: int8 QK, K smoothed')}); "
        f"int8 P·V is not ({kl('fast copy: int8 QK and PV')}, and "
        f"{paths['fast copy: int8 QK and PV']['first_kl'] / paths['exact']['first_kl']:.1f}x "
        "exact's first-token KL)."
    )


def first_answer_costs(speed: dict, run: dict) -> dict[str, float]:
    """Each candidate's first answer about the photo as a multiple of the baseline's, on this
    CPU: its vision-time ratio applied to the vision part of bench.py's measured first answer
    (whose own vision copy is taken out first, by its ratio, where the run names its numerics)."""
    fast = run["summary"]["image"]["phi3v-fast"]
    vision, total = fast["vision_s"], fast["ttft_s"]["median"]
    times, base = speed["speed"]["this CPU"], speed["baseline"]
    ratio = {name: times[name] / times[base] for name in times}
    used = (run.get("fast_setup") or {}).get("numerics", {}).get("vision")
    described = {name: _numerics(n).describe() for name, n in speed["numerics"].items()}
    ran = next((name for name, d in described.items() if d == used), base)
    base_vision = vision / ratio[ran]
    base_total = total - vision + base_vision
    return {name: (base_total + base_vision * (r - 1)) / base_total for name, r in ratio.items()}


def _numerics(values: dict) -> integer_gemm.Numerics:
    return integer_gemm.Numerics(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    )


def _as_dict(numerics: integer_gemm.Numerics) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(numerics).items()}


def vision_error_section(attribution: dict, speed: dict | None, first_answer: dict | None) -> str:
    """Issue 15's vision target: what the fast copy's error is made of, and the candidates that
    buy it down, priced at real size (bench/vision_attribution.py, bench/vision_speed.py)."""
    part = {(r["part"], r["rotation"]): r["ratio"] for r in attribution["sources"]}
    default = attribution["default_rotation"]
    weights, acts = part["weights int8", default], part["activations per row", default]
    both = part["both (the fast copy)", default]
    whole = part["activations per row", "whole"]
    weights_range = [part["weights int8", r] for r in (0, 32, 64, 128, "whole") if r]
    roles = sorted(attribution["roles"], key=lambda r: -r["both"])
    alone = ", ".join(f"{r['role']} {r['both']:.2f}x" for r in roles)
    first, last = attribution["layers"][0], attribution["layers"][-1]
    squares = sum(r["both"] ** 2 for r in attribution["layers"])
    text = [
        f"From `bench/results/{attribution.get('file', 'vision_attribution.md')}` "
        f"({attribution['cpu']}): the fast vision copy on the DINOv2 proxy "
        f"({attribution['photos']} photographs), each source of its error alone, as a multiple "
        f"of exact's error (a float simulation that rounds where the integer GEMM rounds; "
        f"{_draws_note(attribution)}). At today's block-{default} "
        f"rotation the copy is **{both:.2f}x**; its int8 weights alone (fp32 activations) are "
        f"{weights:.2f}x and its activations alone (int4 weights) {acts:.2f}x, and the two add "
        f"about in quadrature (sqrt({weights:.2f}^2 + {acts:.2f}^2) = "
        f"{(weights**2 + acts**2) ** 0.5:.2f}). A larger rotation helps the activations (a "
        f"rotation of the whole K: {whole:.2f}x) but not the weights "
        f"({min(weights_range):.2f}x-{max(weights_range):.2f}x with any rotation): "
        "requantizing int4 blocks to one int8 scale per output channel costs resolution that "
        "no rotation gives back, so the weights alone use up the 1.5x target. No role "
        f"dominates (alone: {alone}). By layer the error grows toward the output: the last "
        f"layer alone is {last['both']:.2f}x, {last['both'] ** 2 / squares:.0%} of the sum of "
        "the layers' squares, the first "
        f"{first['both']:.2f}x ({first['both'] ** 2 / squares:.0%}); the layers add in "
        f"quadrature too (sqrt of the sum: {squares**0.5:.2f}x). {_remainder_note(attribution)}",
        tables.vision_attribution(attribution),
    ]
    if speed:
        costs = first_answer_costs(speed, first_answer) if first_answer else {}
        base = speed["baseline"]
        met = meets_both(speed, costs)
        chosen = [n for n, v in speed["numerics"].items() if v == _as_dict(DEFAULT_VISION)]
        verdict = (
            f"Meets both targets: **{', '.join(met)}**." if met else "**No candidate meets both.**"
        )
        if chosen:
            name = chosen[0]
            vision = " / ".join(
                f"{times[name] / times[base]:.2f}x ({column})"
                for column, times in speed["speed"].items()
            )
            worst = max(t[name] / t[base] for t in speed["speed"].values())
            verdict += (
                f" The copies use **{name}** (`DEFAULT_NUMERICS`): "
                f"{speed['accuracy'][name]['ratio']:.2f}x exact's error, the vision model "
                f"{vision} today's fast's time"
                + (f", the photo's first answer {costs[name]:.2f}x" if name in costs else "")
                + ". Without AMX the vision share of the first answer was not measured here; "
                f"its vision ratio keeps the first answer within 1.10x wherever the vision is "
                f"under {0.10 / max(worst - 1, 1e-9):.0%} of it."
                + (
                    " These error figures are single runs, and one run is one draw of the "
                    "rounding noise (`bench/vision_proxy.py`): pooled over draws, the copies' "
                    'numerics measure as in the section "On a CPU without VNNI".'
                    if speed.get("draws", 1) < 2
                    else ""
                )
            )
        text += [
            f"The candidates with a remainder weight (`Numerics.fine_weights`: w ~ q*s + r*s2, a "
            f"second int8 GEMM on the same quantized activations), on the proxy beside the "
            f"real-size vision model at {speed['crops']} crops (`bench/results/vision_speed.md`, "
            f"{speed['date'][:16]}, phi3v {speed['commit']}, {speed['cpu']}, "
            f"{speed['threads']} threads, median of {speed['repeats']} alternated runs). "
            "Targets (issue 15): error at most 1.5x exact's; the first answer about a photo at "
            "most 1.10x today's fast's, derived from each candidate's vision-time ratio and the "
            "vision share of a measured first answer (`bench/results/scale-amx.md`). " + verdict,
            tables.vision_speed(speed, 1.5, 1.10, costs),
        ]
    return "\n\n".join(text)


def meets_both(speed: dict, costs: dict[str, float]) -> list[str]:
    """The ``vision_speed.py`` candidates within issue 15's vision targets: error at most 1.5x
    exact's, and a derived first answer at most 1.10x today's fast's."""
    return [
        name
        for name, accuracy in speed["accuracy"].items()
        if accuracy["ratio"] <= 1.5 and costs.get(name, 99) <= 1.10
    ]


EARLIER_VISION = "hadamard 32, remainder qkv+out"  # the vision default before fine_layers


def vision_layers_section(speed: dict, first_answer: dict | None, file: str) -> str:
    """A ``vision_speed.py`` run with the remainder placed by layer (``Numerics.fine_layers``),
    on its own CPU: error on the proxy pooled over draws, the real-size vision time, and the
    photo's first answer derived from ``first_answer`` (bench.py on a CPU of the same kind)."""
    costs = first_answer_costs(speed, first_answer) if first_answer else {}
    accuracy, base = speed["accuracy"], speed["baseline"]
    met = meets_both(speed, costs)
    chosen = next(n for n, v in speed["numerics"].items() if v == _as_dict(DEFAULT_VISION))
    times = speed["speed"]["this CPU"]

    def summary(name: str) -> str:
        low, high = accuracy[name]["interval"]
        return (
            f"{accuracy[name]['ratio']:.2f}x exact's error (95 % interval {low:.2f}-{high:.2f}; "
            f"worst photo {accuracy[name]['worst_ratio']:.2f}x), the vision model "
            f"{times[name] / times[base]:.2f}x today's fast's time"
            + (f", the first answer {costs[name]:.2f}x" if name in costs else "")
        )

    text = (
        f"By layer (`Numerics.fine_layers`: every projection of the named layers, counted from "
        f"the last when negative, carries the remainder), on a real copy of the proxy with "
        f"{speed['draws']} draws of the rounding noise pooled per figure, beside the real-size "
        f"vision model (`bench/results/{file}`, {speed['date'][:16]}, phi3v {speed['commit']}, "
        f"{speed['cpu']}, {speed['threads']} threads, median of {speed['repeats']} alternated "
        f"runs; the first answer derived from `bench/results/scale.md`, the same kind of CPU). "
        f"The copies use **{chosen}** (`DEFAULT_NUMERICS`): {summary(chosen)}."
    )
    if EARLIER_VISION in accuracy and chosen != EARLIER_VISION:
        gap = abs(accuracy[chosen]["ratio"] - accuracy[EARLIER_VISION]["ratio"])
        width = min(
            accuracy[n]["interval"][1] - accuracy[n]["interval"][0]
            for n in (chosen, EARLIER_VISION)
        )
        text += (
            f" The earlier default, **{EARLIER_VISION}**: {summary(EARLIER_VISION)}; "
            + ("as accurate, as far as these photographs can tell, " if gap < width / 4 else "")
            + f"at {times[EARLIER_VISION] / times[chosen]:.2f}x the new default's vision time."
        )
    text += (
        (
            f" Meets both targets here: **{', '.join(met)}**."
            if met
            else " **No candidate meets both targets here.**"
        )
        + " The times are the real 23-layer encoder's, where the last two layers are a smaller "
        "share of the work than on the 12-layer proxy; the errors are the proxy's. How much of "
        "the real model's error the last layers' remainder buys is not measured here: the copies' "
        "self-check on the user's own weights (a picture question, fast against fp32 "
        "activations) is what sees it."
    )
    table = tables.vision_speed(speed, 1.5, 1.10, costs, derived_from=speed["cpu"].split(" (")[0])
    return f"{text}\n\n{table}"


def _draws_note(attribution: dict) -> str:
    """How far the simulation and the real copies can be compared, by the results' draws."""
    if attribution.get("draws", 1) < 2:
        return (
            "one draw of the rounding noise per figure, so a simulation and a real copy of the "
            "same numerics can differ by a fifth, last table"
        )
    return (
        f"{attribution['draws']} draws of the rounding noise pooled per figure, so the "
        "simulation and the real copies agree, last tables"
    )


def _remainder_note(attribution: dict) -> str:
    """Which remainder placements buy the most error per unit of added GEMM work."""
    default = attribution["default_rotation"]
    rows = [r for r in attribution["remainder"] if r["rotation"] == default]
    if not rows:
        return ""

    def name(r: dict) -> str:
        return f"{r['remainder']} (+{r['added_gemm_share']:.0%}) {r['ratio']:.2f}x"

    rows.sort(key=lambda r: (r["added_gemm_share"], r["ratio"]))
    within = [r for r in rows if round(r["ratio"], 2) <= 1.5]  # as the table shows it
    cheapest = f"; the least work within 1.5x: {name(within[0])}" if within else ""
    return (
        f"With remainder weights (simulated, block {default}), by the share of the GEMM work "
        "that carries them: "
        f"{'; '.join(name(r) for r in rows)}{cheapest}."
    )


# Issue 15's decoder targets: fast against fp32-activation truth, and against exact's own figures.
KL_TARGET, FIRST_KL_TARGET, TOP1_TARGET = 1.5, 2.0, 0.975


def decoder_targets(accuracy: dict, chosen: str) -> str:
    """Issue 15's decoder targets for the ``chosen`` fast numerics on the tuning texts, each
    with its interval (bench/paired.py), and whether fast's top-1 is distinguishable from
    exact's at all on these texts."""
    tune = accuracy["decoder"]["tune"]
    fast, exact = tune["paths"][chosen], tune["paths"]["exact"]
    pair = tune["paired"][chosen]
    kl, first = pair["kl_ratio"], pair["first_kl_ratio"]
    items = [
        f"**mean KL {kl['value']:.2f}x exact's** ({_range(kl, '.2f')}): target at most "
        f"{KL_TARGET}x {_verdict(kl, KL_TARGET, above=False)}.",
        f"**first-answer-token KL {first['value']:.2f}x exact's** ({_range(first, '.2f')}): "
        f"target at most {FIRST_KL_TARGET:.0f}x {_verdict(first, FIRST_KL_TARGET, above=False)}. "
        f"There is one first token per text, {tune['documents']} in all, so this figure is the "
        "least certain of the three.",
        f"**top-1 agreement with truth {fast['top1']:.1%}** ({_range(_top1(fast), '.1%')}): "
        f"target at least {TOP1_TARGET:.1%} {_verdict(_top1(fast), TOP1_TARGET, above=True)}. "
        f"{_exact_against_target(exact)}",
        _distinguishable(accuracy, chosen),
    ]
    if "near_tie_share" in fast:
        items.append(_near_ties(fast, exact))
    return (
        f"Against issue 15's decoder targets: **{chosen}** (the copies' default) on the "
        f"{tune['documents']} tuning texts, {tune['answer_tokens']} teacher-forced tokens each, "
        "intervals as in the second table:\n\n" + "\n".join(f"- {item}" for item in items)
    )


def _distinguishable(accuracy: dict, chosen: str) -> str:
    """The paired top-1 difference of the chosen numerics, tune and held out, and which of the
    other variants the texts do separate from exact."""
    tune, held = (accuracy["decoder"][split] for split in ("tune", "held_out"))
    difference = tune["paired"][chosen]["top1_difference"]
    low, high = difference["interval"]
    if low > 0 or high < 0:
        reading = (
            f"the interval excludes zero: on these texts fast's top-1 is distinguishably "
            f"{'below' if high < 0 else 'above'} exact's"
        )
    else:
        reading = (
            "the interval contains zero: these texts **cannot tell fast's top-1 from exact's**; "
            f"any difference from {low:+.1f} to {high:+.1f} points fits them"
        )
    comparison = tune["paired"][chosen]
    same = comparison["same_as_exact"]["value"]
    misses = sum(d["positions"] - d["top1_hits"] for d in tune["per_document"][chosen])
    shared = misses - comparison["only_exact_right"]
    lower = [p for p, c in tune["paired"].items() if c["top1_difference"]["interval"][1] < 0]
    higher = [p for p, c in tune["paired"].items() if c["top1_difference"]["interval"][0] > 0]
    held_difference = held["paired"][chosen]["top1_difference"]
    return (
        f"**fast's top-1 minus exact's: {difference['value']:+.1f} points** "
        f"({_range(difference, '+.1f')}), paired on the same positions: {reading}. Held out "
        f"({held['documents']} texts, too few for a firm interval): "
        f"{held_difference['value']:+.1f} ({_range(held_difference, '+.1f')}). Fast and exact "
        f"pick the same token at {same:.1%} of the positions; of fast's {misses} top-1 misses, "
        f"{shared} are exact's too. Distinguishably below exact's "
        "top-1 on the tuning texts: "
        f"{', '.join(lower) or 'none'}; above it: {', '.join(higher) or 'none'} (of "
        f"{len(tune['paired'])} variants, each interval at 95 %: about one in twenty excludes "
        "zero by chance alone)."
    )


def _near_ties(fast: dict, exact: dict) -> str:
    """Where the top-1 misses are: at positions where truth itself is nearly tied."""
    spread = "; ".join(
        f"below {bound:g}, {misses / max(fast['misses'], 1):.0%} of them "
        f"({positions / fast['positions']:.1%} of the positions)"
        for bound, misses, positions in zip(
            MARGINS, fast["misses_below_margins"], fast["positions_below_margins"], strict=True
        )
    )
    text = (
        f"**Where the misses are:** truth's two likeliest tokens are within {NEAR_TIE:g} of "
        f"probability of each other at {fast['near_tie_share']:.1%} of the positions, and "
        f"{fast['misses_at_near_ties']:.0%} of fast's top-1 misses fall there "
        f"({exact['misses_at_near_ties']:.0%} of exact's). At the other positions fast agrees "
        f"with truth at {fast['top1_clear']:.1%} and exact at {exact['top1_clear']:.1%}. "
        f"Fast's {fast['misses']} misses by truth's margin: {spread}."
    )
    if min(fast["misses_at_near_ties"], exact["misses_at_near_ties"]) > 0.5:
        text += (
            " Most top-1 misses are near ties that a small change of the logits may swap, so "
            "the top-1 figure is bounded by how many near ties the texts hold as much as by the "
            "numerics; KL weighs every position by how far its distribution moved."
        )
    return text


def _exact_against_target(exact: dict) -> str:
    """Whether exact itself (onnxruntime-genai's numbers) reaches the top-1 target here."""
    low, high = exact["top1_interval"]
    if high < TOP1_TARGET:
        where = "its whole interval lies below the target"
    elif low >= TOP1_TARGET:
        where = "its whole interval lies above the target"
    else:
        where = "its interval contains the target"
    text = (
        f"Exact itself, onnxruntime-genai's own numerics, agrees on {exact['top1']:.1%} "
        f"({_range(_top1(exact), '.1%')}): {where}."
    )
    if high < TOP1_TARGET:
        text += (
            " The issue set the target beside a higher figure for exact from its own first "
            "measurement; on these texts a fast copy would have to agree with truth better than "
            "the released model's own numerics do to reach it."
        )
    return text


def _top1(path: dict) -> dict:
    return {"value": path["top1"], "interval": path["top1_interval"]}


def _range(estimate: dict, spec: str) -> str:
    low, high = estimate["interval"]
    return f"95 % interval {low:{spec}} to {high:{spec}}"


def _verdict(estimate: dict, target: float, above: bool) -> str:
    """Met or missed by the point figure, and whether the interval settles it."""
    low, high = estimate["interval"]
    met = estimate["value"] >= target if above else estimate["value"] <= target
    settled = (low >= target or high < target) if above else (high <= target or low > target)
    word = "**met**" if met else "**missed**"
    return word + ("" if settled else f" (the interval reaches across {target:g})")
