"""Check that a model set gives the same greedy tokens in onnxruntime-genai 0.18 and in phi3v.

Run it on the real-size random-weight set after changing the builder or the engine:

    python -m phi3v.testing /tmp/scale --size real     # ~3 GB, seconds
    python bench/check_scale_tokens.py /tmp/scale       # a few minutes (the image prompt)

For a text prompt and for one 1344x1008 PNG (16 crops, 1,935 prompt ids), genai generates
``--new-tokens`` tokens greedily with 2 intra-op threads per session, then phi3v generates from
genai's own input ids in its "exact" precision. Prints both token lists and exits with 1 if any
differ.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

PROMPTS = {
    "text": "<|user|>\nDescribe the image.<|end|>\n<|assistant|>\n",
    "image": "<|user|>\n<|image_1|>\nDescribe the image.<|end|>\n<|assistant|>\n",
}
IMAGE_SIZE = (1344, 1008)  # width, height: a 4:3 photo at full detail, 3x4 tiles
GENAI_THREADS = 2


def genai_tokens(model_dir: Path, prompt: str, image: Path | None, count: int):
    """Greedy tokens from onnxruntime-genai, and the input ids its processor made."""
    import onnxruntime_genai as og

    config = og.Config(str(model_dir))
    options = {"session_options": {"intra_op_num_threads": GENAI_THREADS}}
    config.overlay(
        json.dumps({"model": dict.fromkeys(("decoder", "embedding", "vision"), options)})
    )
    model = og.Model(config)
    images = og.Images.open(str(image)) if image else None
    inputs = model.create_multimodal_processor()(prompt, images=images)
    input_ids = inputs["input_ids"].as_numpy()[0].tolist()
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(input_ids) + count, do_sample=False, top_k=1)
    generator = og.Generator(model, params)
    generator.set_inputs(inputs)
    while not generator.is_done():
        generator.generate_next_token()
    tokens = generator.get_sequence(0)[len(input_ids) :].tolist()
    del generator, model
    gc.collect()
    return input_ids, tokens


def phi3v_tokens(model_dir: Path, prompt: str, image: Path | None, input_ids, count: int):
    from phi3v import Pipeline

    pipe = Pipeline.load(model_dir, precision="exact")  # "fast" is not meant to match genai
    result = pipe.generate(
        prompt, images=[image] if image else [], input_ids=input_ids, max_new_tokens=count
    )
    del pipe
    gc.collect()
    return list(result.token_ids)


def write_photo(path: Path) -> Path:
    """A deterministic 1344x1008 PNG: colour ramps with noise."""
    width, height = IMAGE_SIZE
    y, x = np.mgrid[0:height, 0:width]
    ramps = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], -1)
    noise = np.random.default_rng(0).normal(0, 24, ramps.shape)
    Image.fromarray(np.clip(ramps + noise, 0, 255).astype(np.uint8), "RGB").save(path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path, help="the model set (e.g. /tmp/scale)")
    parser.add_argument("--new-tokens", type=int, default=8, help="tokens per prompt (default 8)")
    parser.add_argument("--cases", default="text,image", help="text, image or both (default)")
    args = parser.parse_args(argv)
    all_same = True
    with tempfile.TemporaryDirectory() as tmp:
        photo = write_photo(Path(tmp) / "photo.png")
        for case in args.cases.split(","):
            image = photo if case == "image" else None
            started = time.perf_counter()
            ids, expected = genai_tokens(args.model_dir, PROMPTS[case], image, args.new_tokens)
            genai_s = time.perf_counter() - started
            started = time.perf_counter()
            got = phi3v_tokens(args.model_dir, PROMPTS[case], image, ids, args.new_tokens)
            phi3v_s = time.perf_counter() - started
            same = got == expected
            all_same &= same
            print(f"{case}: {len(ids)} input ids; {'identical' if same else 'DIFFERENT'} tokens")
            print(f"  genai {genai_s:6.1f} s: {expected}")
            print(f"  phi3v {phi3v_s:6.1f} s: {got}", flush=True)
    return 0 if all_same else 1


if __name__ == "__main__":
    sys.exit(main())
