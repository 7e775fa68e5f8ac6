"""How far the "fast" precision is from "exact": first-step logits, teacher-forced agreement.

For each model set and prompt: exact (the model files as they are) generates 64 greedy tokens;
then each fast variant prefills the same prompt on its integer-GEMM copy and is fed exact's tokens
one by one (teacher forcing, so one early flip does not hide the rest). Reported: max and mean
|logit difference| of the first step (relative to the mean |logit| too), and the share of the 64
steps whose argmax equals exact's. Random-weight models have none of a trained model's outlier
structure beyond what ``--outlier-channels`` injects, so these numbers bound the arithmetic error,
not the answer quality of the real model.

A control puts the numbers in scale: the same int4 weights computed at accuracy level 0 (fp32
activations instead of int8 blocks of 32), which is as valid a reading of the model files as
exact's. Where the control is as far from exact as fast is, the distance is a property of the
(random) network amplifying rounding differences, not of the fast path.

    python bench/accuracy.py                       # tiny sets (built here) -> results/accuracy.md
    python bench/accuracy.py --real /tmp/scale     # also the real-size set (~10 min)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import tables

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


VARIANTS = {  # name -> what it is, as the tables say
    "row": "fast, per-row activation scales",
    "tensor": "fast, one activation scale per tensor",
    "acc0": "control: exact's int4 weights at accuracy level 0 (fp32 arithmetic)",
}


def accuracy_level_copy(model: Path, out: Path, level: int) -> Path:
    """``model`` with every MatMulNBits at ``accuracy_level`` ``level``: the same int4 weights
    computed another, equally valid way (fp32 instead of int8 activations). The weight files are
    hard links (onnxruntime refuses external data behind a symlink that leaves the folder), so
    the copy costs only the graphs; it must be on the model's file system."""
    import onnx

    out.mkdir(parents=True, exist_ok=True)
    for path in model.iterdir():
        if path.is_file() and not (out / path.name).exists():
            os.link(path, out / path.name)
    for name in ("vision", "text"):
        source = next(model.glob(f"*-{name}.onnx"))
        graph = onnx.load(str(source), load_external_data=False)
        for node in graph.graph.node:
            for attribute in node.attribute:
                if node.op_type == "MatMulNBits" and attribute.name == "accuracy_level":
                    attribute.i = level
        (out / source.name).unlink()
        (out / source.name).write_bytes(graph.SerializeToString())
    return out


def compare(model: Path, cases, variants, scratch: Path) -> list[dict]:
    """Each variant against exact on ``model``: first-step logits, teacher-forced top-1."""
    rows = []
    exact = Pipeline.load(model, precision="exact")
    references = {name: forced_logits(exact, *case, None) for name, case in cases.items()}
    del exact
    for variant in variants:
        if variant == "acc0":
            other = Pipeline.load(
                accuracy_level_copy(model, scratch / model.name, 0), precision="exact"
            )
        else:
            convert.ACTIVATION_SCALES = variant
            other = Pipeline.load(model, precision="fast")
        for name, case in cases.items():
            first, greedy = references[name]
            logits, chosen = forced_logits(other, *case, greedy)
            error = np.abs(logits - first)
            rows.append(
                {
                    "model": model.name,
                    "case": name,
                    "variant": VARIANTS[variant],
                    "max_abs_logit_diff": float(error.max()),
                    "mean_abs_logit_diff": float(error.mean()),
                    "mean_abs_logit": float(np.abs(first).mean()),
                    "top1_agreement": sum(a == b for a, b in zip(chosen, greedy, strict=True))
                    / STEPS,
                    "first_token_equal": chosen[0] == greedy[0],
                }
            )
            print(rows[-1], flush=True)
        del other
    convert.ACTIVATION_SCALES = "row"
    return rows


def markdown(rows: list[dict], date: str) -> str:
    return (
        "# fast vs exact: numerical agreement\n\n"
        f"{date}; `python bench/accuracy.py` ({STEPS} teacher-forced greedy steps per case).\n\n"
        f"{tables.accuracy(rows, STEPS)}\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--real",
        type=Path,
        help="also a real-size int4 set (fast with row scales, and the control)",
    )
    args = parser.parse_args()
    date = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    text = (TEXT, [], None)
    image = (f"<|image_1|>\n{TEXT}", [str(IMAGE)], 4)
    rows = []
    cases = {"text": text, "image (4 crops)": image}
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        tiny = build_model(scratch / "tiny-int4", weights="int4")
        outliers = build_model(scratch / "tiny-int4-outliers", weights="int4", outlier_channels=3)
        for model in (tiny, outliers):
            rows += compare(model, cases, ("row", "tensor", "acc0"), scratch / "controls")
        if args.real:
            rows += compare(args.real, cases, ("row", "acc0"), scratch / "controls")
    RESULTS.mkdir(exist_ok=True)
    record = {"date": date, "steps": STEPS, "rows": rows}
    (RESULTS / "accuracy.json").write_text(json.dumps(record, indent=1))
    (RESULTS / "accuracy.md").write_text(markdown(rows, date))
    print(markdown(rows, date))


if __name__ == "__main__":
    main()
