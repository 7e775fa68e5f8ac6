"""How much the "fast" precision changes a trained network's answers: the numbers behind
``phi3v.convert.DEFAULT_NUMERICS``.

Random weights cannot show it (their activations have no outlier channels), so this runs on
trained proxies built from registry packages (:mod:`phi3v.testing.proxies`):

* decoder: SmolLM2-135M-Instruct written as a Phi-3-V int4 decoder (``MatMulNBits`` block 32,
  accuracy level 4, GroupQueryAttention). For each evaluation text (bench/texts/), a prompt of
  600-1200 tokens and its next ``--answer-tokens`` (256), teacher-forced. Paths: **truth** (the
  same int4 weights with fp32 activations), **exact** (the file as released: onnxruntime-genai's
  numbers) and each **fast** variant (the prompt on its integer-GEMM copy, the answer on the
  int4 decoder, as the engine runs them). Per path against truth: top-1 agreement, mean KL, KL
  at the first answer token. Each fast variant against exact on the same positions (paired):
  the top-1 difference, the KL ratios, how often the two pick the same token, with intervals
  from a bootstrap over documents (bench/paired.py). The ``tune`` texts chose the default; the
  ``held_out`` texts were never looked at while choosing and are reported beside them.
* vision: DINOv2 ViT-S/14 with its MatMuls as int4 ``MatMulNBits`` on real photographs: the
  relative error of each path's features to truth's, as a multiple of exact's, pooled over
  ``--draws`` draws of the rounding noise (bench/vision_proxy.py says why one run is not enough),
  with an interval from a bootstrap over photos.

Speed beside it: one decoder layer's four projections (the real model's sizes, 512 rows: one
prefill chunk) in each form, alternated, median of ``--repeats``; on this CPU as it is, and with
AMX refused to the process (bench/noamx.c), which is what a VNNI-only CPU runs.

    python bench/accuracy.py               # -> bench/results/accuracy.{json,md}

``--weights`` stores the copies' int8 weights as the product does on this CPU (the default:
uint8 for onnxruntime's u8u8 GEMM where the CPU has neither VNNI nor AMX), or as int8 or uint8
everywhere, to show what the u8s8 kernel's saturation does without VNNI; ``--name`` writes
``bench/results/<name>.{json,md}`` instead (a run on another CPU); ``--vision`` measures the
vision part again into an existing results file (its variants, stored as it says).
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import native
import numpy as np
import onnxruntime as ort
import paired
import tables
import vision_proxy
from onnx import TensorProto
from provenance import RESULTS, commit, save

from phi3v import convert, integer_gemm, machine
from phi3v.config import TOKENIZER, load_config
from phi3v.fast_check import kl_divergence, teacher_forced_logits
from phi3v.sessions import Sessions, SessionSettings, open_session
from phi3v.testing import proxies
from phi3v.testing.onnx_graph import Graph, WeightFile, rng, value
from phi3v.tokenizer import PromptTokenizer

REPO = Path(__file__).resolve().parent.parent
PROMPT_TOKENS = (600, 1200)  # a prompt takes as much of a text as fits in this range
# Teacher-forced answer tokens per text: 256 x 10 tuning texts = 2,560 positions per path, so a
# top-1 share has a standard error near 0.4 points (64 gave 640 positions and 0.8 points).
ANSWER_TOKENS = 256
N = integer_gemm.Numerics
# The forms compared. "per group" keeps K whole in one batched GEMM whose [G, rows, N] partial
# products are summed; "hadamard" rotates each input online in blocks (weights at conversion);
# "int4 <role>" leaves those projections as MatMulNBits. Sizes that do not divide a projection's
# K shrink to the largest power of two that does (SmolLM2's 576 = 9 x 64).
VARIANTS = {
    "per row": N(),
    "per group 32": N(group=32),
    "per group 128": N(group=128),
    "hadamard 32": N(rotation=32),
    "hadamard 64": N(rotation=64),
    "hadamard 128": N(rotation=128),
    "int4 mlp_out": N(keep_int4=("mlp_out",)),
    "int4 attention_in, mlp_out": N(keep_int4=("attention_in", "mlp_out")),
    "hadamard 64, int4 mlp_out": N(rotation=64, keep_int4=("mlp_out",)),
    "hadamard 128, per group 32": N(rotation=128, group=32),
    "hadamard 32, remainder qkv+out": N(
        rotation=32, fine_weights=("attention_in", "attention_out")
    ),
    # Every projection of the last two layers, and attention_out everywhere (fine_layers).
    "hadamard 32, remainder last 2 layers+out": N(
        rotation=32, fine_weights=("attention_out",), fine_layers=(-2, -1)
    ),
}
# One real decoder layer's projections (Phi-3-mini: hidden 3072, MLP 8192), K -> N.
LAYER = {
    "attention_in": (3072, 9216),
    "attention_out": (3072, 3072),
    "mlp_in": (3072, 16384),
    "mlp_out": (8192, 3072),
}
SPEED_ROWS = 512
# How the copies store their int8 weights (integer_gemm.Numerics.unsigned_weights).
WEIGHTS = ("this CPU", "int8", "uint8")


def stored(numerics: integer_gemm.Numerics, weights: str) -> integer_gemm.Numerics:
    if weights == "this CPU":
        return convert.stored_for_this_cpu(numerics)
    return replace(numerics, unsigned_weights=weights == "uint8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--variants",
        nargs="*",
        choices=list(VARIANTS),
        help="the numerics to measure (default: all); with --vision, added to the results' own",
    )
    parser.add_argument(
        "--answer-tokens",
        type=int,
        default=ANSWER_TOKENS,
        help="teacher-forced answer tokens per evaluation text (default %(default)s)",
    )
    parser.add_argument(
        "--weights",
        choices=WEIGHTS,
        default="this CPU",
        help="how the copies store their int8 weights: as the product does on this CPU (uint8 "
        "for the u8u8 GEMM where it lacks VNNI and AMX), or forced (default: %(default)s)",
    )
    parser.add_argument(
        "--name", default="accuracy", help="results file stem (default: %(default)s)"
    )
    parser.add_argument("--skip-speed", action="store_true", help="accuracy only")
    parser.add_argument(
        "--vision", action="store_true", help="re-measure the vision into the existing results"
    )
    vision_proxy.add_draws_argument(parser)
    parser.add_argument(
        "--speed", action="store_true", help="re-measure the speed into the existing results"
    )
    parser.add_argument(
        "--markdown", action="store_true", help="rewrite accuracy.md from accuracy.json only"
    )
    parser.add_argument("--speed-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    named = args.variants or list(VARIANTS)
    variants = {name: stored(VARIANTS[name], args.weights) for name in named}
    results = RESULTS / args.name
    if args.speed_only:  # the child process of the VNNI-only run
        print(json.dumps(layer_speed(variants, args.repeats)))
        return
    if args.markdown:  # after a change to tables.py: nothing is measured
        _write(json.loads(results.with_suffix(".json").read_text()), results)
        return
    if args.vision:  # the same variants, stored the same way, as the results' decoder part
        result = json.loads(results.with_suffix(".json").read_text())
        names = [name for name in result["decoder"]["tune"]["paths"] if name != "exact"]
        names += [name for name in args.variants or [] if name not in names]
        weights = result.get("weights", "this CPU")  # older results: as the product stored them
        variants = {name: stored(VARIANTS[name], weights) for name in names}
        with tempfile.TemporaryDirectory() as work:
            result["vision"] = vision_fidelity(Path(work), variants, args.draws)
        result["vision"]["measured"] = {
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "commit": commit(),
            "cpu": machine.describe_cpu(),
        }
        _write(result, results)
        return
    if args.speed:
        result = json.loads(results.with_suffix(".json").read_text())
        result["speed"] = measure_speed(variants, args)
        result["speed_load"] = os.getloadavg()
        _write(result, results)
        return
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        result = {
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "commit": commit(),
            "cpu": machine.describe_cpu(),
            "command": "python bench/accuracy.py " + " ".join(sys.argv[1:]),
            "weights": args.weights,
            "load_before": os.getloadavg(),
            "decoder": decoder_fidelity(work / "decoder", variants, args.answer_tokens),
            "vision": vision_fidelity(work / "vision", variants, args.draws),
        }
    if not args.skip_speed:
        result["speed"] = measure_speed(variants, args)
    result["load_after"] = os.getloadavg()
    _write(result, results)


def measure_speed(variants: dict[str, integer_gemm.Numerics], args) -> dict:
    """Layer speed on this CPU, and with AMX refused where it has AMX."""
    speed = {"this CPU": layer_speed(variants, args.repeats)}
    if machine.has_amx():
        speed["AMX refused (VNNI only)"] = _speed_without_amx(args)
    return speed


def _write(result: dict, stem: Path) -> None:
    save(stem.name, result, tables.fidelity_report(result))
    print(tables.fidelity_report(result))


# --- decoder -------------------------------------------------------------------------------------


def decoder_fidelity(
    folder: Path, variants: dict[str, integer_gemm.Numerics], answer_tokens: int
) -> dict:
    """Per split: each path against truth over every teacher-forced answer position, and each
    fast variant against exact on the same positions (bench/paired.py)."""
    proxies.build_decoder_proxy(folder)
    config = load_config(folder)
    tokenizer = PromptTokenizer(config.path(TOKENIZER))
    exact = Sessions(config)
    decoder_file = config.path(config.decoder.filename)
    truth = _with_decoders(exact, open_session(decoder_file, exact.options, fp32_activations=True))
    paths = {"exact": exact}
    for name, numerics in variants.items():
        target = folder / "copies" / f"{len(paths)}.onnx"
        target.parent.mkdir(exist_ok=True)
        convert.convert_model(
            decoder_file, target, numerics, last_position_output=config.decoder.logits
        )
        paths[name] = _with_decoders(exact, exact.decoder, open_session(target, exact.options))
    vocab = min(config.vocab_size, tokenizer.vocab_size)
    report = {}
    for split in ("tune", "held_out"):
        texts = proxies.evaluation_texts(split)
        pairs = _prompts(tokenizer, texts, answer_tokens)
        started = time.perf_counter()
        truth_logits = [teacher_forced_logits(truth, *pair)[:, :vocab] for pair in pairs]
        print(f"{split} truth: {time.perf_counter() - started:.1f} s", file=sys.stderr)
        totals = _documents_against_truth(paths, pairs, truth_logits, vocab, split)
        weights = paired.document_weights(len(pairs))
        report[split] = {
            "documents": len(pairs),
            "names": [text.name for text in texts],
            "prompt_tokens": [int(p.shape[1]) for p, _ in pairs],
            "answer_tokens": answer_tokens,
            "resamples": paired.RESAMPLES,
            "paths": {path: paired.path_summary(docs, weights) for path, docs in totals.items()},
            "paired": {
                path: paired.paired_summary(totals["exact"], docs, weights)
                for path, docs in totals.items()
                if path != "exact"
            },
            "per_document": totals,
        }
    report["near_tie"] = paired.NEAR_TIE
    report["numerics"] = {name: asdict(numerics) for name, numerics in variants.items()}
    return report


def _documents_against_truth(
    paths: dict[str, Sessions], pairs: list[tuple], truth: list[np.ndarray], vocab: int, split: str
) -> dict[str, list[dict]]:
    """Per path and document, its totals against truth and exact (paired.document_totals). Exact
    runs first; each path's logits are reduced to choices and KL as they come (256 answer
    positions of a 49k vocabulary are 50 MB a document)."""
    choices: dict[str, list[np.ndarray]] = {"truth": [t.argmax(axis=-1) for t in truth]}
    margins = [paired.top_two_margin(t.astype(np.float64)) for t in truth]
    totals: dict[str, list[dict]] = {}
    for path, sessions in paths.items():
        started = time.perf_counter()
        choices[path], totals[path] = [], []
        for number, (pair, reference) in enumerate(zip(pairs, truth, strict=True)):
            logits = teacher_forced_logits(sessions, *pair)[:, :vocab]
            choices[path].append(logits.argmax(axis=-1))
            chosen = (choices[name][number] for name in ("truth", "exact", path))
            kl = kl_divergence(reference, logits)
            totals[path].append(paired.document_totals(*chosen, kl, margins[number]))
        print(f"{split} {path}: {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return totals


def _with_decoders(sessions: Sessions, decoder, prefill=None) -> Sessions:
    both = copy.copy(sessions)
    both.decoder, both.prefill_decoder = decoder, prefill or decoder
    return both


def _prompts(
    tokenizer: PromptTokenizer, texts: list[proxies.EvaluationText], answer_tokens: int
) -> list[tuple]:
    """(prompt [1, P], answer [1, A]) per text: BOS, as much of the text as fits in
    ``PROMPT_TOKENS`` while leaving the next ``answer_tokens`` for the answer."""
    pairs = []
    for text in texts:
        ids = tokenizer.encode_text(text.text)
        length = min(PROMPT_TOKENS[1], len(ids) - answer_tokens)
        if length < PROMPT_TOKENS[0]:
            raise SystemExit(
                f"evaluation text {text.name} has {len(ids)} tokens; a {PROMPT_TOKENS[0]}-token "
                f"prompt and {answer_tokens} answer tokens need {PROMPT_TOKENS[0] + answer_tokens}:"
                " use fewer --answer-tokens"
            )
        prompt = np.array([[tokenizer.bos_id, *ids[:length]]], np.int64)
        answer = np.array([ids[length : length + answer_tokens]], np.int64)
        pairs.append((prompt, answer))
    return pairs


# --- vision --------------------------------------------------------------------------------------


def vision_fidelity(
    folder: Path, variants: dict[str, integer_gemm.Numerics], draws: int = vision_proxy.DRAWS
) -> dict:
    """Each path's relative feature error to truth, as a multiple of exact's, pooled over the
    photos and ``draws`` draws of the rounding noise (bench/vision_proxy.py)."""
    proxy = vision_proxy.VisionProxy(folder, draws)
    paths = {"exact": {"mean_error": proxy.exact_error, "ratio": 1.0}}
    for index, (name, numerics) in enumerate(variants.items()):
        target = folder / "copies" / f"{index}.onnx"
        target.parent.mkdir(exist_ok=True)
        convert.convert_model(proxy.source, target, numerics)
        paths[name] = proxy.ratio(proxy.errors(proxy.session(target)))
    numerics = {name: asdict(n) for name, n in variants.items()}
    return {**proxy.describe(), "paths": paths, "numerics": numerics}


# --- speed ---------------------------------------------------------------------------------------


def layer_speed(variants: dict[str, integer_gemm.Numerics], repeats: int) -> dict:
    """ms for one real-size decoder layer's four projections at 512 rows, per form, alternated."""
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        source = _layer_model(work)
        models = {"int4 (exact)": source}
        for name, numerics in variants.items():
            models[name] = work / f"{len(models)}.onnx"
            convert.convert_model(source, models[name], numerics)
        settings = SessionSettings()
        sessions = {name: open_session(path, settings) for name, path in models.items()}
        x = np.random.default_rng(0).standard_normal((1, SPEED_ROWS, 3072)).astype(np.float32)
        z = np.random.default_rng(1).standard_normal((1, SPEED_ROWS, 8192)).astype(np.float32)
        feeds = {"x": x, "z": z}
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for _ in range(repeats + 1):  # the first round warms up
            for name, session in sessions.items():
                started = time.perf_counter()
                session.run(None, feeds)
                times[name].append(time.perf_counter() - started)
        return {name: 1000 * statistics.median(t[1:]) for name, t in times.items()}


def _layer_model(folder: Path) -> Path:
    """The four projections of one decoder layer as int4 MatMulNBits, as the release has them."""
    path = folder / "layer.onnx"
    with WeightFile(folder / "layer.onnx.data") as weights:
        graph = Graph(weights, rng(0, 0), weight_format="int4")
        outputs = []
        for role, (k, n) in LAYER.items():
            name = {"attention_in": "qkv_proj", "attention_out": "o_proj"}.get(role)
            name = name or {"mlp_in": "gate_up_proj", "mlp_out": "down_proj"}[role]
            graph.linear(f"layers.0.{name}", "z" if k == 8192 else "x", k, n, output=role)
            outputs.append(value(role, TensorProto.FLOAT, [1, SPEED_ROWS, n]))
        model = graph.model(
            "layer",
            [
                value("x", TensorProto.FLOAT, [1, SPEED_ROWS, 3072]),
                value("z", TensorProto.FLOAT, [1, SPEED_ROWS, 8192]),
            ],
            outputs,
        )
    path.write_bytes(model.SerializeToString())
    return path


def _speed_without_amx(args) -> dict:
    """The same measurement in a child process that the kernel refuses AMX tile state."""
    command = [native.noamx_launcher(), sys.executable, __file__, "--speed-only", "--repeats"]
    command += [str(args.repeats), "--weights", args.weights, "--variants", *args.variants]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    ort.set_default_logger_severity(3)
    main()
