"""Download a Phi-3 Vision ONNX model set into data/<name>: resumable and sha256-verified.

    python download_models.py                      # the default set into data/phi-3-vision-cpu
    python download_models.py --model phi-3.5-vision --dir /big/disk
    python download_models.py --list

Interrupt it at any time and run it again: it continues where it stopped.
"""

from __future__ import annotations

import argparse
import sys

from phi3v.download import (
    DEFAULT_ENDPOINT,
    DEFAULT_MODEL,
    MODELS,
    DiskSpaceError,
    EndpointError,
    FolderError,
    NetworkError,
    NotFoundError,
    ServerError,
    download_model,
    is_complete,
    model_folder,
)
from phi3v.errors import Phi3VError

# The package's errors say what to change in its own terms; this adds the flag that does it.
FLAG_HINTS: tuple[tuple[tuple[type[Phi3VError], ...], str], ...] = (
    ((FolderError, DiskSpaceError), "--dir DIR downloads into another folder"),
    ((NotFoundError,), "--model and --revision choose what to fetch, --list shows the known sets"),
    ((EndpointError, NetworkError, ServerError), "--endpoint URL chooses another Hub or mirror"),
)

EPILOG = """\
environment:
  HF_ENDPOINT  the Hub or mirror to download from (same as --endpoint)
  HF_TOKEN     a bearer token for private or gated repos, sent to the endpoint's host only
               (never to the CDN it redirects to); messages show URLs without credentials

Each file streams into NAME.part and is renamed into place only after its sha256 matched the
Hub's listing. Files already verified are skipped, so running again is cheap.
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Download a Phi-3 Vision ONNX model set from the Hugging Face Hub.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        metavar="NAME",
        help=f"model set to fetch: {', '.join(MODELS)} (default: {DEFAULT_MODEL})",
    )
    parser.add_argument(
        "--dir",
        default="data",
        metavar="DIR",
        help="root folder; the files go flat into DIR/NAME (default: data)",
    )
    parser.add_argument(
        "--revision",
        metavar="SHA",
        help="Hub commit (40 hex characters) or branch to fetch (default: the one pinned "
        "for the model set; see --list)",
    )
    parser.add_argument(
        "--endpoint",
        metavar="URL",
        help=f"Hub or mirror URL (default: $HF_ENDPOINT, else {DEFAULT_ENDPOINT})",
    )
    parser.add_argument(
        "--list",
        action="store_true",
        help="list the known model sets and whether each is complete under --dir, then exit",
    )
    return parser.parse_args(argv)


def list_models(root: str) -> None:
    for spec in MODELS.values():
        folder = model_folder(spec.name, root)
        state = "complete" if is_complete(folder) else "not downloaded"
        default = " (default)" if spec.name == DEFAULT_MODEL else ""
        print(f"{spec.name}{default}: {spec.repo} / {spec.folder} @ {spec.revision}")
        print(
            f"    layout {spec.layout}, about {spec.approx_bytes / 1e9:.1f} GB, {state} in {folder}"
        )


def with_flag_hint(error: Phi3VError) -> str:
    """The error's message, followed by the flag of this command that changes what it blames."""
    for kinds, hint in FLAG_HINTS:
        if isinstance(error, kinds):
            return f"{error} ({hint})"
    return str(error)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        list_models(args.dir)
        return 0
    try:
        folder = download_model(
            args.model,
            args.dir,
            revision=args.revision,
            endpoint=args.endpoint,
        )
    except Phi3VError as error:
        print(f"error: {with_flag_hint(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return 130
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
