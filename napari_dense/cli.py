"""The ``napari-dense`` command line.

Every expected failure prints one line, ``napari-dense: error: <what> <fix>``, and exits with
status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import numpy as np
import torch

from .errors import NapariDenseError

__all__ = ["main"]

RANDOM_WEIGHTS_NOTE = (
    "Note: the network has random (untrained) weights: this table measures speed and "
    "exactness, not biology."
)


def _builtin_net(name: str) -> tuple[torch.nn.Module, int, int]:
    from .models import BENCHMARK_NETS

    if name not in BENCHMARK_NETS:
        raise NapariDenseError(
            f"unknown network {name!r}; choose one of {', '.join(BENCHMARK_NETS)}"
        )
    factory, patch, channels = BENCHMARK_NETS[name]
    torch.manual_seed(0)
    return factory().eval(), patch, channels


def _parse_sampling(text: str) -> str | dict[str, str]:
    """``all``, ``none``, ``advanced``, ``simple`` or ``layer=all,layer=none``."""
    aliases = {"advanced": "all", "simple": "none"}
    if "=" not in text:
        return aliases.get(text, text)
    pairs = [item.split("=", 1) for item in text.split(",") if item]
    return {name.strip(): aliases.get(value.strip(), value.strip()) for name, value in pairs}


def _cmd_explain(args: argparse.Namespace) -> None:
    from .convert import explain

    model, patch, _ = _builtin_net(args.net)
    plan = explain(model, args.patch or patch, sampling=_parse_sampling(args.sampling))
    print(json.dumps(plan.as_dict(), indent=2) if args.json else plan.to_markdown())


def _cmd_demo(args: argparse.Namespace) -> None:
    from skimage import color, data

    from .compare import compare_modes
    from .convert import explain

    model, patch, channels = _builtin_net(args.net)
    image = data.immunohistochemistry()[: args.size, : args.size].astype(np.float32) / 255
    if channels == 1:
        image = color.rgb2gray(image).astype(np.float32)
    first_layer = explain(model, patch).layers[0].name
    print(
        f"napari-dense demo: the {args.net} benchmark net on scikit-image's "
        f"immunohistochemistry image {image.shape[0]}x{image.shape[1]} "
        f"({'grey' if channels == 1 else 'RGB'}, scaled to 0-1)\n"
    )
    print(explain(model, patch).to_markdown(), "\n")
    comparison = compare_modes(
        image,
        model,
        patch,
        channel_axis=None if channels == 1 else -1,
        device=args.device,
        modes=("simple", {first_layer: "all"}, "shift-and-stitch", "advanced"),
    )
    print(f"Modes on {comparison.device} (custom 1 = only layer {first_layer} densified):\n")
    print(comparison.to_markdown())
    print()
    print(RANDOM_WEIGHTS_NOTE)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (documented in README)."""
    parser = argparse.ArgumentParser(
        prog="napari-dense",
        description="Exact dense (per-pixel) inference for PyTorch patch classifiers.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True)

    explain = commands.add_parser("explain", help="the striding layers of a network and costs")
    explain.add_argument("net", help="built-in network: 15x15, 32x32 or 64x64")
    explain.add_argument("--patch", type=int, help="patch size (default: the network's)")
    explain.add_argument(
        "--sampling", default="all", help="all | none | advanced | simple | layer=all,layer=none"
    )
    explain.add_argument("--json", action="store_true", help="print JSON instead of a table")
    explain.set_defaults(run=_cmd_explain)

    demo = commands.add_parser("demo", help="compare the modes on a real microscopy image")
    demo.add_argument("--net", default="32x32", help="built-in network (default 32x32)")
    demo.add_argument("--size", type=int, default=512, help="crop of the image (default 512)")
    demo.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1 | mps")
    demo.set_defaults(run=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except KeyboardInterrupt:
        print("napari-dense: interrupted", file=sys.stderr)
        return 130
    except (NapariDenseError, ValueError, OSError) as err:
        if args.debug:
            raise
        message = " ".join(str(err).split())
        print(f"napari-dense: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
