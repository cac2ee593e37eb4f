"""The ``napari-dense`` command line.

Every expected failure prints one line, ``napari-dense: error: <what>; <fix>``, and exits with
status 2 for bad arguments or input, 1 when a run fails (``--debug`` shows the traceback
instead). Ctrl-C during ``predict`` stops after the
current tile and leaves a store that ``--resume`` completes.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from napari_dense.errors import NapariDenseError

__all__ = ["build_parser", "main"]


def _builtin_net(name: str) -> tuple[torch.nn.Module, int, int] | None:
    from napari_dense.evaluate.models import BENCHMARK_NETS

    if name not in BENCHMARK_NETS:
        return None
    factory, patch, channels = BENCHMARK_NETS[name]
    torch.manual_seed(0)
    return factory().eval(), patch, channels


def _load_model(name: str, trust_code: bool = False) -> tuple[Any, Any, int]:
    """A built-in benchmark net (random weights) or a model file; (model, patch, channels).

    ``trust_code`` (``--trust-code``) allows a model file that runs Python code (a sidecar's
    ``python_file``); without it such a file is refused before anything runs.
    """
    builtin = _builtin_net(name)
    if builtin is not None:
        return builtin
    from napari_dense.demo.run import DEMO_MODELS, find_demo_model

    if name in DEMO_MODELS and not Path(name).exists():
        name = str(find_demo_model(f"{name}.pt2"))  # the trained demo models, package data
    if not Path(name).exists():
        raise NapariDenseError(
            f"model file not found: {name}; give a .pt2 / .yaml model file, a demo model "
            f"({', '.join(DEMO_MODELS)}) or a built-in network (15x15, 32x32, 64x64)"
        )
    from napari_dense.model_files import load_classifier

    loaded = load_classifier(name, trust_code=trust_code)
    return loaded, loaded.metadata.patch_size, int(loaded.metadata.in_channels or 0)


def _parse_sampling(text: str) -> str | dict[str, str]:
    """``all``, ``checkered``, ``none``, ``advanced``, ``simple`` or ``layer=all,layer=none``."""
    aliases = {"advanced": "all", "simple": "none"}
    if "=" not in text:
        return aliases.get(text, text)
    pairs = [item.split("=", 1) for item in text.split(",") if item]
    return {name.strip(): aliases.get(value.strip(), value.strip()) for name, value in pairs}


def _run_options(args: argparse.Namespace, **from_model: Any) -> Any:
    """The :class:`~napari_dense.RunOptions` of a subcommand's arguments (the one place the
    CLI builds them); ``from_model``: what the model file says (normalisation, activation)."""
    from napari_dense.run.options import RunOptions

    names = [name for name in RunOptions.__dataclass_fields__ if hasattr(args, name)]
    given = {name: getattr(args, name) for name in names}
    if "=" in given.get("mode", ""):
        given["mode"] = _parse_sampling(given["mode"])
    return RunOptions(**given, **from_model)


def _plan_of(model: Any, patch: Any, sampling: Any) -> Any:
    from napari_dense.convert import explain

    module = getattr(model, "module", model)
    return explain(module, patch, sampling=sampling)


def _cmd_explain(args: argparse.Namespace) -> None:
    model, patch, _ = _load_model(args.model, args.trust_code)
    plan = _plan_of(model, args.patch or patch, _parse_sampling(args.mode))
    print(json.dumps(plan.as_dict(), indent=2) if args.json else plan.to_markdown())


def _cmd_predict(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from napari_dense.run.to_zarr import predict_to_zarr

    if args.scheduler:
        from napari_dense.run.distributed import check_scheduler

        check_scheduler(args.scheduler)  # before a store is created or a cluster started
    model, patch, _ = _load_model(args.model, args.trust_code)
    bar: Any = None  # made at the first tile, so that early errors print one line only
    megapixels = 0.0
    seconds = 0.0

    def progress(result: Any) -> None:
        nonlocal bar, megapixels, seconds
        if bar is None:
            bar = tqdm(total=result.total, unit="tile", dynamic_ncols=True, disable=args.quiet)
        megapixels += result.tile.shape[0] * result.tile.shape[1] / 1e6
        seconds += result.compute_seconds
        bar.set_postfix_str(f"{megapixels / max(seconds, 1e-9):.2f} Mpx/s")
        bar.update(1)

    try:
        store = predict_to_zarr(
            args.image,
            model,
            args.output,
            patch_size=args.patch or patch,
            options=_run_options(args),
            overwrite=args.overwrite,
            resume=args.resume,
            pyramid_levels=args.pyramid,
            scheduler=args.scheduler,
            on_tile=progress,
        )
    except KeyboardInterrupt:
        print(
            f"napari-dense: interrupted; the tiles computed so far are kept in {args.output}: "
            "run the same command with --resume to finish",
            file=sys.stderr,
        )
        raise SystemExit(130) from None
    finally:
        if bar is not None:
            bar.close()
    rate = store.attributes.get("megapixels_per_second")
    print(f"wrote {args.output}" + (f" ({rate} Mpx/s)" if rate else ""))


def _read_region(image: str, channels: int, region: str | None, channel_axis: int | None) -> Any:
    from napari_dense.io.sources import open_image

    source = open_image(image, channels=channels, channel_axis=channel_axis)
    if source.leading_shape:
        raise NapariDenseError(
            "compare and frontier take a single plane; pass a 2-D (+ channels) image"
        )
    plane = source.array
    if region:
        height, width = source.plane_shape
        try:
            (y0, y1), (x0, x1) = (
                tuple(int(v) for v in part.split(":")) for part in region.split(",")
            )
        except ValueError:
            raise NapariDenseError(f"--region must look like y0:y1,x0:x1, got {region!r}") from None
        if not (0 <= y0 < y1 <= height and 0 <= x0 < x1 <= width):
            raise NapariDenseError(
                f"--region {region} is empty or outside the image ({height}x{width}); give "
                "0 <= y0 < y1 <= height and 0 <= x0 < x1 <= width"
            )
        plane = plane[:, y0:y1, x0:x1]
    return np.asarray(plane.compute(), dtype=np.float32)


def _cmd_compare(args: argparse.Namespace) -> None:
    from napari_dense.evaluate.compare import compare_modes

    model, patch, channels = _load_model(args.model, args.trust_code)
    image = _read_region(args.image, channels, args.region, args.channel_axis)
    module = getattr(model, "module", model)
    metadata = getattr(model, "metadata", None)
    options = _run_options(
        args,
        normalisation=metadata.normalisation if metadata is not None else None,
        # |Δ| in probabilities, as the overlay shows them; built-in nets have no activation.
        activation=_activation_of(metadata),
    )
    comparison = compare_modes(
        image, module, args.patch or patch, options=replace(options, channel_axis=0)
    )
    print(comparison.to_markdown())


def _activation_of(metadata: Any) -> str | None:
    activation = getattr(metadata, "activation", None)
    return None if activation in (None, "none") else str(activation)


def _cmd_frontier(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from napari_dense.evaluate.frontier import frontier, frontier_size

    if not args.budget >= 0:
        raise NapariDenseError(f"--budget must be a number >= 0, got {args.budget}")
    plot = Path(args.plot)
    # Refused before measuring anything: the measurements are what takes time.
    if plot.exists() and not args.overwrite:
        raise NapariDenseError(f"{plot} exists; pass --overwrite to replace it, or another --plot")
    if not plot.parent.is_dir():
        raise NapariDenseError(
            f"the folder of --plot {plot} does not exist; create it first or choose another --plot"
        )
    model, patch, channels = _load_model(args.model, args.trust_code)
    image = _read_region(args.image, channels, args.region, args.channel_axis)
    metadata = getattr(model, "metadata", None)
    # Model files say how their outputs become probabilities; built-in nets output scores.
    activation = metadata.activation if metadata is not None else "softmax"
    module, patch = getattr(model, "module", model), args.patch or patch
    total = frontier_size(module, patch, max_exhaustive=args.max_exhaustive)
    bar = tqdm(total=total, unit="setting", dynamic_ncols=True, disable=args.quiet)

    def progress(done: int, total: int | None, row: Any) -> None:
        bar.set_postfix_str(row.label)
        bar.update(1)

    options = _run_options(
        args,
        normalisation=metadata.normalisation if metadata is not None else None,
        activation=activation,
    )
    try:
        result = frontier(
            module,
            image,
            patch,
            options=replace(options, channel_axis=0),  # the region is read as (C, Y, X)
            repeats=args.repeats,
            max_exhaustive=args.max_exhaustive,
            progress=progress,
        )
    finally:
        bar.close()
    picked = result.pick(args.budget, args.metric)
    print(result.to_markdown())
    print()
    advanced = result.advanced
    print(
        f"picked for {args.metric} <= {args.budget:g}: {picked.label or 'A'} "
        f"({', '.join(f'{name}={level}' for name, level in picked.sampling.items()) or '-'}), "
        f"{picked.seconds:.4f} s vs advanced {advanced.seconds:.4f} s: "
        f"{result.speedup(picked):.2f}x faster; class change {picked.class_change:.2%}, "
        f"mean |Δp| {picked.mean_abs_diff:.2e}"
    )
    result.plot(plot, picked=picked)
    print(f"wrote {plot}")


def _cmd_demo(args: argparse.Namespace) -> None:
    from napari_dense.demo.run import has_display, run_gui, run_headless

    if not args.headless and has_display():
        import napari

        run_gui()
        napari.run()
        return
    run_headless(Path(args.output), overwrite=args.overwrite, device=args.device)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (documented in README; built in :mod:`napari_dense.cli_parser`)."""
    from napari_dense.cli_parser import build_parser as build

    return build(
        {
            "explain": _cmd_explain,
            "predict": _cmd_predict,
            "compare": _cmd_compare,
            "frontier": _cmd_frontier,
            "demo": _cmd_demo,
        }
    )


def _exit_status(err: BaseException) -> int:
    """2 for bad arguments or input (the user's to fix), 1 when a run fails (disk, compute)."""
    if isinstance(err, FileExistsError | NotADirectoryError):
        return 2  # an output path that is taken: choose another or pass the option
    if isinstance(err, OSError | RuntimeError) or not isinstance(
        err, NapariDenseError | ValueError
    ):
        return 1
    return 2


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _show_warning(message: Any, category: Any, *args: Any, **kwargs: Any) -> None:
    print(f"napari-dense: warning: {_one_line(message)}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    with warnings.catch_warnings():
        if not args.debug:
            # Ours as one line each; the libraries' own (deprecations inside torch, dask) hidden.
            warnings.showwarning = _show_warning
            warnings.filterwarnings("ignore", module=r"(torch|dask|distributed|zarr)(\.|$)")
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            logging.getLogger("distributed").setLevel(logging.CRITICAL)
        try:
            args.run(args)
        except KeyboardInterrupt:
            print("napari-dense: interrupted", file=sys.stderr)
            return 130
        except (NapariDenseError, ValueError, OSError) as err:
            if args.debug:
                raise
            print(f"napari-dense: error: {_one_line(err)}", file=sys.stderr)
            return _exit_status(err)
        except Exception as err:  # a bug or a library failure: still one line
            if args.debug:
                raise
            print(
                f"napari-dense: error: unexpected {type(err).__name__}: {_one_line(err)[:300]}; "
                "rerun with --debug for the traceback and report it",
                file=sys.stderr,
            )
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
