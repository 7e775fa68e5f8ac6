"""Command line: ``python -m phi3v --model DIR [--image PATH]... --prompt TEXT``.

Streams the answer to stdout, or prints the result object with ``--json``. ``--check`` says which
precision runs and why, with the fast copies' self-check (``--precision fast --check`` makes and
checks the copies) and, in fast, what computes the prompt's attention. Errors end the program
with one readable line on stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from phi3v.engine import DEFAULT_MAX_NEW_TOKENS, Pipeline
from phi3v.errors import Phi3VError
from phi3v.precision import PRECISIONS
from phi3v.results import Progress
from phi3v.sampling import OFFERED_MAX_TEMPERATURE


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default where it has one the help does not already name."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, []) or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def temperature(text: str) -> float:
    """``--temperature``'s text -> its number, from 0 to OFFERED_MAX_TEMPERATURE; argparse names the
    option and the value in its error line if it is anything else."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value <= OFFERED_MAX_TEMPERATURE:  # NaN fails this too
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number from 0 to {OFFERED_MAX_TEMPERATURE:g}"
        )
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m phi3v",
        description="Ask Phi-3 Vision about images, on the CPU with onnxruntime.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument(
        "--model",
        required=True,
        metavar="DIR",
        help="model folder holding genai_config.json and the .onnx files",
    )
    parser.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="PATH",
        help="an image file; repeat for several (<|image_N|> in the prompt)",
    )
    parser.add_argument("--prompt", help="the question or instruction")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=DEFAULT_MAX_NEW_TOKENS,
        help="at most this many tokens in the answer",
    )
    parser.add_argument(
        "--temperature",
        type=temperature,
        default=0.0,
        help=f"0 to {OFFERED_MAX_TEMPERATURE:g}: 0 is greedy decoding; higher samples more freely",
    )
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold")
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    parser.add_argument(
        "--num-crops",
        type=int,
        default=None,
        help="image detail, 1-16 tiles of 336 px (default: the model's, 16)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="onnxruntime intra-op threads (default: one per physical core)",
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="exact: the model files as they are (what onnxruntime-genai computes); fast: "
        "read images and prompts on integer-GEMM copies made and self-checked once per model "
        "folder; auto: fast where this CPU has AMX/VNNI, the memory for the copies, and the "
        "self-check passed",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="instead of answering: say which precision runs and why, with the fast copies' "
        "self-check against fp32 activations (made and run first if missing)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the result as JSON (text, token ids, input ids, stop reason, "
        "timings) instead of streaming",
    )
    return parser


def _show_progress(progress: Progress) -> None:
    """One status line on stderr while the fast copies are made (once per model folder)."""
    end = "\n" if progress.total and progress.done == progress.total else ""
    print(f"\r{progress.stage}: {progress.done}/{progress.total}", end=end, file=sys.stderr)


def _print_precision(pipe: Pipeline, as_json: bool) -> None:
    choice = pipe.precision_choice
    fast = choice.precision == "fast"
    attention = pipe.sessions.prefill_attention if fast else None
    vision = pipe.sessions.vision_attention if fast else None
    if as_json:
        check = choice.check.to_json() if choice.check else None
        report = {"precision": choice.precision, "reason": choice.reason, "self_check": check}
        if fast:
            report["prompt_attention"] = attention
            report["vision_attention"] = vision
        report["memory_pages"] = pipe.sessions.huge_pages.describe()
        print(json.dumps(report))
        return
    print(f"precision: {choice.precision} ({choice.reason})")
    if fast:
        print(f"prompt attention: {attention}")
        print(f"vision attention: {vision}")
    print(f"memory pages: {pipe.sessions.huge_pages.describe()}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.check and args.prompt is None:
        parser.error("--prompt is required (or --check)")
    options = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        num_crops=args.num_crops,
    )
    try:
        pipe = Pipeline.load(
            args.model,
            num_threads=args.threads,
            precision=args.precision,
            progress=_show_progress,
        )
        if args.check:
            _print_precision(pipe, args.json)
            return 0
        if args.json:
            result = pipe.generate(args.prompt, args.image, **options)
            print(json.dumps(result.to_dict(), ensure_ascii=False))
            return 0
        with pipe.stream(args.prompt, args.image, **options) as stream:
            for delta in stream:
                sys.stdout.write(delta)
                sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    except Phi3VError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (``| head``): stop quietly. Standard output now leads nowhere,
        # so that Python's own flush at exit does not fail on it again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
