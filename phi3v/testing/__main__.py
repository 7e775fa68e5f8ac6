"""``python -m phi3v.testing OUT_DIR``: write a random-weight Phi-3-vision model set."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from phi3v.testing.model_builder import DEFAULT_OUTLIER_GAIN, LAYOUTS, build_model
from phi3v.testing.sizes import SIZES, WEIGHT_FORMATS


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m phi3v.testing",
        description="Write a random-weight Phi-3-vision ONNX model set with the real release's "
        "interface: tiny (tests, the app offline) or real size (benchmarks, ~3 GB in int4).",
    )
    parser.add_argument("out_dir", type=Path, help="folder to write the set into (never commit it)")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny", help="default: tiny")
    parser.add_argument(
        "--weights",
        choices=WEIGHT_FORMATS,
        help="float: fp32 MatMul; int4: MatMulNBits block 32 as the cpu-int4 release "
        "(default: float for tiny, int4 for real)",
    )
    parser.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="redesigned",
        help="redesigned: Sep 2024, what onnxruntime-genai 0.18 runs (default); legacy: June 2024 "
        "(Phi-3-vision-128k-instruct-onnx-cpu)",
    )
    parser.add_argument("--seed", type=int, default=1234, help="random seed (default: 1234)")
    parser.add_argument(
        "--outlier-channels",
        type=int,
        default=0,
        metavar="N",
        help="amplify N channels of every norm feeding a linear layer (default: 0)",
    )
    parser.add_argument(
        "--outlier-gain",
        type=float,
        default=DEFAULT_OUTLIER_GAIN,
        help=f"factor for those channels (default: {DEFAULT_OUTLIER_GAIN:g})",
    )
    args = parser.parse_args(argv)
    size = SIZES[args.size]
    weights = args.weights or size.default_weights
    started = time.perf_counter()
    try:
        out_dir = build_model(
            args.out_dir,
            size=size,
            weights=weights,
            layout=args.layout,
            seed=args.seed,
            outlier_channels=args.outlier_channels,
            outlier_gain=args.outlier_gain,
        )
    except ValueError as error:
        parser.error(str(error))
    seconds = time.perf_counter() - started
    files = sorted(path for path in out_dir.iterdir() if path.is_file())
    total = sum(path.stat().st_size for path in files)
    outliers = f", {args.outlier_channels} outlier channels" if args.outlier_channels else ""
    print(
        f"wrote a {size.name} {args.layout} Phi-3-vision set with {weights} weights{outliers} "
        f"(seed {args.seed}) to {out_dir}: {total / 1e6:,.1f} MB in {seconds:.1f} s"
    )
    for path in files:
        print(f"  {path.stat().st_size / 1e6:>10,.1f} MB  {path.name}")


if __name__ == "__main__":
    main()
