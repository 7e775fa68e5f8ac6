"""Time to first token of a follow-up question about the same image, with and without reuse of
the previous turn's KV cache.

A chat sends the whole conversation each turn. Without reuse, the second question pays the
image's vision + prefill again (what onnxruntime-genai's examples and a plain pipeline do: here a
pipeline that keeps neither KV caches nor image features); with the defaults only the new tokens
are computed. Each variant loads its own pipeline. In exact precision the answers must be the
same token for token; in fast they need not be: the follow-up's few new positions run on the
int4 decoder and the whole conversation, read afresh, on the integer-GEMM copy, whose numbers
differ a little (``docs/PERFORMANCE.md``, the accuracy section).

    python bench/follow_up.py --model /tmp/scale [--name follow_up]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
from PIL import Image
from provenance import commit, save

from phi3v import Pipeline
from phi3v.machine import describe_cpu

NEW_TOKENS = 32


def conversation(first_answer: str) -> list[dict]:
    return [
        {"role": "user", "content": "<|image_1|>\nDescribe the image."},
        {"role": "assistant", "content": first_answer},
        {"role": "user", "content": "What colours stand out?"},
    ]


def follow_up_ttft(pipe: Pipeline, image: str) -> dict:
    """Turn 1, then turn 2 on the same pipeline; the timings of turn 2."""
    first = pipe.generate("<|image_1|>\nDescribe the image.", [image], max_new_tokens=NEW_TOKENS)
    second = pipe.generate(conversation(first.text), [image], max_new_tokens=NEW_TOKENS)
    return {
        "first_ttft_s": first.timings.time_to_first_token,
        "ttft_s": second.timings.time_to_first_token,
        "vision_s": second.timings.vision,
        "prefill_s": second.timings.prefill,
        "prompt_tokens": len(second.input_ids),
        "reused_tokens": second.reused_tokens,
        "token_ids": second.token_ids,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model folder")
    parser.add_argument("--runs", type=int, default=1, help="repetitions of each variant")
    parser.add_argument("--name", default="follow_up", help="results file name")
    parser.add_argument(
        "--precision", default="auto", choices=("auto", "exact", "fast"), help="default: auto"
    )
    args = parser.parse_args()

    image = "/tmp/phi3v-follow-up-1344x1008.png"
    pixels = np.random.default_rng(0).integers(0, 256, (1008, 1344, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(image)
    runs: dict[str, list[dict]] = {"reuse": [], "no reuse": []}
    for _ in range(args.runs):
        for variant, reuse in (("reuse", True), ("no reuse", False)):
            keep = {} if reuse else {"reuse_prefix": False, "feature_cache_bytes": 0}
            pipe = Pipeline.load(args.model, precision=args.precision, **keep)
            precision = pipe.precision
            runs[variant].append(follow_up_ttft(pipe, image))
            del pipe
    same = runs["reuse"][0]["token_ids"] == runs["no reuse"][0]["token_ids"]
    median = {v: statistics.median(r["ttft_s"] for r in rs) for v, rs in runs.items()}
    lines = [
        f"# Follow-up question TTFT: `{args.name}`",
        "",
        f"* date: {time.strftime('%Y-%m-%dT%H:%M:%S%z')}; phi3v {commit()}; model "
        f"`{args.model}`; CPU: {describe_cpu()}; "
        f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        f"* a 1344x1008 PNG (1921 image tokens), turn 1 then turn 2 with the history; "
        f"{args.runs} run(s) per variant, greedy, {NEW_TOKENS} new tokens; median; "
        f"precision {precision} (`--precision {args.precision}`)",
        "",
        "| variant | turn-2 prompt tokens | reused from turn 1 | vision s | prefill s | TTFT s |",
        "|---|---|---|---|---|---|",
    ]
    for variant, rs in runs.items():
        r = rs[0]
        lines.append(
            f"| {variant} | {r['prompt_tokens']} | {r['reused_tokens']} | "
            f"{statistics.median(x['vision_s'] for x in rs):.2f} | "
            f"{statistics.median(x['prefill_s'] for x in rs):.2f} | {median[variant]:.2f} |"
        )
    lines += [
        "",
        f"Speed-up of the follow-up's TTFT: **{median['no reuse'] / median['reuse']:.0f}x**; "
        f"same answer tokens: **{'yes' if same else 'no'}**"
        + (
            "."
            if precision == "exact"
            else " (not required in fast: the follow-up's new positions ran on the int4 "
            "decoder, the conversation read afresh on the integer-GEMM copy)."
        ),
    ]
    save(args.name, runs, "\n".join(lines))
    print("\n".join(lines))
    if precision == "exact" and not same:
        raise SystemExit("exact precision answered otherwise with reuse than without: a bug")


if __name__ == "__main__":
    main()
