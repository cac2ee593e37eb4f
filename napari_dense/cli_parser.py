"""The ``napari-dense`` argument parser: subcommands, shared options, help with examples.

Options used by several subcommands are declared once, in parent parsers (model, image input,
device, non-finite policy, progress, overwrite). Help shows every default. Building the parser
imports neither torch nor the engine, so ``napari-dense --help`` and ``--version`` are instant.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

__all__ = ["build_parser"]

_MODEL_HELP = (
    "model file (.pt2, sidecar .yaml), demo model ihc_patchnet | ihc_selecsls, or built-in "
    "network (random weights) 15x15 | 32x32 | 64x64"
)
_SAMPLING_HELP = (
    "advanced (all layers densified, exact) | checkered | simple (none) | per layer: "
    "layer=all,layer=checkered,layer=none"
)
_DEVICE_HELP = "auto (CUDA, then MPS, then CPU) | cpu | cuda | cuda:1 | mps"


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Defaults in the help (where there is one to show); descriptions laid out as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = action.default not in (None, False, argparse.SUPPRESS)
        if shown and "(default" not in text and action.option_strings:
            text += " (default: %(default)s)"
        return text


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("napari-dense")
    except PackageNotFoundError:  # pragma: no cover - run from a source tree not installed
        from napari_dense import __version__

        return __version__


def _parents() -> dict[str, argparse.ArgumentParser]:
    """Option groups shared by the subcommands (each declared once)."""

    def parent() -> argparse.ArgumentParser:
        return argparse.ArgumentParser(add_help=False)

    model = parent()
    model.add_argument("model", help=_MODEL_HELP)
    model.add_argument("--patch", type=int, help="patch size (default: the model's)")
    model.add_argument(
        "--trust-code",
        action="store_true",
        help="allow a model whose sidecar names a python_file: that Python file runs (only for "
        "files you trust; a .pt2 runs no code)",
    )
    image = parent()
    image.add_argument("image", help="image: .zarr / OME-Zarr / .tif / .npy / .png ...")
    image.add_argument(
        "--channel-axis", type=int, help="channel axis of the image (default: from metadata)"
    )
    image.add_argument(
        "--non-finite",
        default="refuse",
        choices=["refuse", "zero"],
        help="NaN/infinite pixels: refuse them, or read them as 0",
    )
    region = parent()
    region.add_argument("--region", help="y0:y1,x0:x1 (default: the whole image)")
    device = parent()
    device.add_argument("--device", default="auto", help=_DEVICE_HELP)
    # One option for the per-layer sampling (explain once said --sampling, predict --mode).
    sampling = parent()
    sampling.add_argument(
        "--mode", "--sampling", dest="mode", default="advanced", help=_SAMPLING_HELP
    )
    quiet = parent()
    quiet.add_argument("--quiet", action="store_true", help="no progress bar")
    return {
        "model": model,
        "image": image,
        "region": region,
        "device": device,
        "sampling": sampling,
        "quiet": quiet,
    }


def build_parser(
    commands: dict[str, Callable[[argparse.Namespace], Any]],
) -> argparse.ArgumentParser:
    """The parser; ``commands`` maps each subcommand name to the function that runs it."""
    parser = argparse.ArgumentParser(
        prog="napari-dense",
        description="Exact dense (per-pixel) inference for PyTorch patch classifiers.",
        epilog="Errors print one line naming the fix: exit status 2 for bad arguments or "
        "input, 1 when a run fails; --debug shows the traceback.",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = _parents()

    def add(name: str, parents: list[str], summary: str, examples: str) -> argparse.ArgumentParser:
        command = sub.add_parser(
            name,
            parents=[p[key] for key in parents],
            help=summary,
            description=f"{summary}.\n\nexamples:\n{examples}",
            formatter_class=_Formatter,
        )
        command.set_defaults(run=commands[name])
        return command

    explain = add(
        "explain",
        ["model", "sampling"],
        "The striding layers of a model, what densifying each costs, and whether it is exact",
        "  napari-dense explain ihc_patchnet\n"
        "  napari-dense explain 15x15 --mode 2=all,5=none --json",
    )
    explain.add_argument("--json", action="store_true", help="print JSON instead of a table")

    predict = add(
        "predict",
        ["model", "image", "sampling", "device", "quiet"],
        "Predict an image, tile by tile, into an OME-Zarr probability map",
        "  napari-dense predict model.pt2 slide.zarr -o map.zarr\n"
        "  napari-dense predict model.pt2 slide.zarr -o map.zarr --resume   # after Ctrl-C\n"
        "  napari-dense predict model.pt2 slide.zarr -o map.zarr --scheduler local:4\n"
        "  napari-dense predict model.pt2 slide.zarr -o map.zarr --scheduler local-cuda",
    )
    predict.add_argument("-o", "--output", required=True, help="output .zarr directory")
    predict.add_argument("--tile", type=int, help="output pixels per tile side (default: auto)")
    predict.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="arithmetic of the network: auto = bfloat16 on CUDA GPUs that support it, else "
        "float32 (strict IEEE, TF32 off); bfloat16/float16 autocast: faster, less exact",
    )
    predict.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "float16", "uint8"],
        help="stored probabilities (uint8: round(p * 255))",
    )
    predict.add_argument(
        "--border",
        default="reflect",
        choices=["reflect", "edge", "constant"],
        help="how the image is extended so border pixels get a whole patch",
    )
    predict.add_argument(
        "--interpolation",
        default="bilinear",
        choices=["bilinear", "nearest"],
        help="how pixels between computed samples are filled (sampling other than advanced)",
    )
    predict.add_argument(
        "--memory-budget",
        type=_bytes,
        metavar="SIZE",
        help="host memory a tile may use, e.g. 2GiB or 512MiB (default: from free memory)",
    )
    predict.add_argument(
        "--class-names",
        type=_names,
        metavar="A,B,...",
        help="names of the output classes (default: the model's)",
    )
    predict.add_argument("--level", type=int, default=0, help="OME-Zarr / TIFF pyramid level")
    predict.add_argument(
        "--pyramid",
        type=_pyramid_levels,
        default=None,
        metavar="N|auto",
        help="extra 2x-downsampled levels, filled as tiles land; auto: down to about 512 px "
        "(default: none for a new map, a resumed map keeps its own)",
    )
    predict.add_argument("--resume", action="store_true", help="finish an interrupted run")
    predict.add_argument(
        "--overwrite", action="store_true", help="replace an existing napari-dense output"
    )
    predict.add_argument(
        "--scheduler",
        help="local:N (N worker processes), local-cuda (one worker per GPU) or a dask scheduler "
        "address (tcp://host:8786)",
    )
    predict.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the network (slow first tile, faster after)",
    )

    add(
        "compare",
        ["model", "image", "region", "device"],
        "Simple vs shift-and-stitch vs advanced on one image: time, memory, difference",
        "  napari-dense compare ihc_patchnet image.tif --region 0:512,0:512",
    )

    front = add(
        "frontier",
        ["model", "image", "region", "device", "quiet"],
        "Time vs error of every per-layer sampling, and the fastest within an error budget",
        "  napari-dense frontier ihc_patchnet image.tif --budget 0.01 --plot frontier.png",
    )
    front.add_argument(
        "--budget",
        type=float,
        default=0.01,
        help="largest error accepted, in the metric's unit (class_change: fraction of pixels)",
    )
    front.add_argument(
        "--metric",
        default="class_change",
        choices=["class_change", "mean_abs_diff", "p99_abs_diff"],
        help="error measure against advanced",
    )
    front.add_argument("--plot", default="frontier.png", help="PNG of time vs class change")
    front.add_argument("--repeats", type=int, default=3, help="timed runs per setting (median)")
    front.add_argument(
        "--max-exhaustive",
        type=int,
        default=4,
        help="most layer groups tried in every combination (more: a greedy path)",
    )
    front.add_argument("--overwrite", action="store_true", help="replace an existing plot")

    demo = add(
        "demo",
        ["device"],
        "The trained IHC demo model in napari (headless without a display)",
        "  napari-dense demo\n  napari-dense demo --headless --output demo_output",
    )
    demo.add_argument("--headless", action="store_true", help="no GUI, even with a display")
    demo.add_argument("--output", default=".", help="folder of the headless outputs")
    demo.add_argument("--overwrite", action="store_true", help="replace demo_output.zarr")
    return parser


def _pyramid_levels(text: str) -> int | str:
    """``--pyramid``: a number of levels (0 or more) or ``auto``."""
    if text == "auto":
        return text
    try:
        levels = int(text)
    except ValueError:
        levels = -1
    if levels < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more levels, or auto, got {text!r}")
    return levels


_UNITS = {
    "": 1,
    "b": 1,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
}


def _bytes(text: str) -> int:
    """``--memory-budget``: bytes, or a number with KiB/MiB/GiB (KB/MB/GB) after it."""
    number = text.strip().rstrip("BbIiKkMmGg")
    unit = text.strip()[len(number) :].lower()
    try:
        value = float(number) * _UNITS[unit]
    except (KeyError, ValueError):
        value = -1
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a size such as 2GiB or 512MiB, got {text!r}")
    return int(value)


def _names(text: str) -> tuple[str, ...]:
    """``--class-names``: comma-separated names."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"expected names separated by commas, got {text!r}")
    return names
