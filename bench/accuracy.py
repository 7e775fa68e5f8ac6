"""How far the "fast" precision is from "exact": first-step logits, teacher-forced agreement.

For each model set and prompt: exact (the model files as they are) generates 64 greedy tokens;
then each fast variant prefills the same prompt on its integer-GEMM copy and is fed exact's tokens
one by one (teacher forcing, so one early flip does not hide the rest). Reported: max and mean
|logit difference| of the first step (relative to the mean |logit| too), and the share of the 64
steps whose argmax equals exact's. Random-weight models have none of a trained model's outlier
structure beyond what ``--outlier-channels`` injects, so these numbers bound the arithmetic error,
not the answer quality of the real model.

    python bench/accuracy.py                       # tiny sets (built here) -> results/accuracy.md
    python bench/accuracy.py --real /tmp/scale     # also the real-size set (fast only, ~5 min)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import tempfile
from pathlib import Path

import numpy as np

import phi3v.convert as convert
import phi3v.engine as engine
from phi3v import Pipeline, preprocess_image
from phi3v.testing import build_model

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
STEPS = 64
TEXT = "Tell me, in a few words, what the history of computing machines looks like. " * 3
IMAGE = REPO / "data" / "examples" / "bar_chart.png"


def forced_logits(pipe: Pipeline, prompt: str, images, num_crops, forced: list[int] | None):
    """First-step logits and the argmax of every step, feeding ``forced`` (or greedy) tokens."""
    stream = pipe.stream(prompt, images, max_new_tokens=1, num_crops=num_crops)
    ids = np.array([stream.input_ids])
    stream.close()
    processed = tuple(preprocess_image(i, num_crops or 16) for i in images)
    cache = pipe._new_cache(ids.shape[1] + STEPS + 1)
    run = engine._RunState(0.0)
    logits = pipe._prefill(cache, pipe._read_images(ids, processed, run), run)
    limit = pipe.vocab_limit
    first = logits[:limit].copy()
    chosen = []
    for step in range(STEPS):
        chosen.append(int(np.argmax(logits[:limit])))
        token = forced[step] if forced else chosen[-1]
        logits = cache.run(pipe.sessions.decoder, pipe.sessions.embed_token(token))
    cache.close()
    return first, chosen


def compare(model: Path, cases, variants) -> list[dict]:
    rows = []
    exact = Pipeline.load(model, precision="exact")
    references = {name: forced_logits(exact, *case, None) for name, case in cases.items()}
    del exact
    for variant in variants:
        convert.ACTIVATION_SCALES = variant
        fast = Pipeline.load(model, precision="fast")
        for name, case in cases.items():
            first, greedy = references[name]
            logits, chosen = forced_logits(fast, *case, greedy)
            error = np.abs(logits - first)
            rows.append(
                {
                    "model": model.name,
                    "case": name,
                    "activation_scales": variant,
                    "max_abs_logit_diff": float(error.max()),
                    "mean_abs_logit_diff": float(error.mean()),
                    "mean_abs_logit": float(np.abs(first).mean()),
                    "top1_agreement": sum(a == b for a, b in zip(chosen, greedy, strict=True))
                    / STEPS,
                    "first_token_equal": chosen[0] == greedy[0],
                }
            )
            print(rows[-1], flush=True)
        del fast
    convert.ACTIVATION_SCALES = "row"
    return rows


def markdown(rows: list[dict], date: str) -> str:
    lines = [
        "# fast vs exact: numerical agreement",
        "",
        f"{date}; `python bench/accuracy.py` ({STEPS} teacher-forced greedy steps per case).",
        "",
        "| model set | case | activation scales | max abs logit diff | mean abs logit diff "
        "| mean abs logit diff / mean abs logit | top-1 agreement | first token equal |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['case']} | {r['activation_scales']} "
            f"| {r['max_abs_logit_diff']:.3f} | {r['mean_abs_logit_diff']:.4f} "
            f"| {r['mean_abs_logit_diff'] / r['mean_abs_logit']:.1%} "
            f"| {r['top1_agreement']:.0%} | {'yes' if r['first_token_equal'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", type=Path, help="also a real-size int4 set (fast, row scales)")
    args = parser.parse_args()
    date = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    text = (TEXT, [], None)
    image = (f"<|image_1|>\n{TEXT}", [str(IMAGE)], 4)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tiny = build_model(Path(tmp) / "tiny-int4", weights="int4")
        outliers = build_model(Path(tmp) / "tiny-int4-outliers", weights="int4", outlier_channels=3)
        for model in (tiny, outliers):
            rows += compare(model, {"text": text, "image (4 crops)": image}, ("row", "tensor"))
    if args.real:
        rows += compare(args.real, {"text": text, "image (4 crops)": image}, ("row",))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "accuracy.json").write_text(json.dumps({"date": date, "rows": rows}, indent=1))
    (RESULTS / "accuracy.md").write_text(markdown(rows, date))
    print(markdown(rows, date))


if __name__ == "__main__":
    main()
