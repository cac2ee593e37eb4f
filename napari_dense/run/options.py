"""One run configuration: :class:`RunOptions`, validated in one place.

Every public entry point (:func:`napari_dense.predict`, :func:`~napari_dense.iter_predict`,
:func:`~napari_dense.predict_to_zarr`, :func:`~napari_dense.frontier`,
:func:`napari_dense.evaluate.compare.compare_modes`, the CLI and the widgets) takes its run
options as keywords or as ``options=RunOptions(...)``; :meth:`RunOptions.merge` turns both into
one validated :class:`RunOptions`, which is what the internals pass on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from napari_dense.convert import SamplingSpec
from napari_dense.convert.upsample import ACTIVATIONS, check_activation
from napari_dense.errors import InputError
from napari_dense.io.image import BORDER_MODES
from napari_dense.io.input_checks import check_non_finite_policy
from napari_dense.io.store._checks import check_dtype
from napari_dense.run._transfer import check_output_dtype
from napari_dense.run.device import PRECISION_CHOICES

__all__ = [
    "ACTIVATIONS",
    "COMPILE_MODES",
    "INTERPOLATIONS",
    "MIN_TILE",
    "MODES",
    "RunOptions",
    "sampling_of_mode",
]

#: ``mode`` names and the per-layer sampling each stands for (a mapping is a custom sampling).
MODES = {"advanced": "all", "checkered": "checkered", "simple": "none"}
#: Between lattice samples when the output stride is above 1.
INTERPOLATIONS = ("bilinear", "nearest")
#: ``torch.compile`` modes ``compile=`` accepts as a string (True: the engine's default mode).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
#: Smallest tile side accepted: every tile also reads and computes a patch-sized halo, so below
#: this the halo costs more than the tile itself, and a 512² image would take 1,000+ tiles.
MIN_TILE = 16


def sampling_of_mode(mode: str | Mapping[str, str]) -> SamplingSpec:
    """``"advanced"`` -> ``"all"``, ``"checkered"`` -> ``"checkered"``, ``"simple"`` ->
    ``"none"``; mappings pass through (:func:`napari_dense.densify` checks their layers)."""
    if isinstance(mode, Mapping):
        return mode
    if mode not in MODES:
        raise InputError(
            f"mode must be 'advanced', 'checkered', 'simple' or a sampling mapping, got {mode!r}"
        )
    return MODES[mode]


@dataclass(frozen=True)
class RunOptions:
    """How a run computes: every option of the public functions, checked once.

    Each function uses the options that apply to it (:func:`napari_dense.predict` has no tiles,
    so no ``tile`` or ``precision``) and refuses the others by name.

    Attributes
    ----------
    mode
        ``"advanced"`` (every layer densified: exact at every pixel), ``"simple"`` (fully
        convolutional, interpolated between exact lattice samples), ``"checkered"`` (every
        layer at half its phases) or a sampling mapping ``{layer: "all" | "checkered" |
        "none"}`` (see :data:`MODES`).
    channel_axis
        Axis of the channels as stored (negative counts from the end); None: from the file's
        metadata, else the last axis or the one before (Y, X) whose size is the model's
        channel count (:func:`napari_dense.io.image.guess_channel_axis`).
    level
        Resolution level of an OME-Zarr or pyramidal TIFF (0 = full resolution).
    device
        ``"auto"`` (CUDA, then MPS, then CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``.
    precision
        ``"auto"`` (bfloat16 on a CUDA GPU that supports it, else float32), ``"float32"``
        (strict IEEE: TF32 off on CUDA), ``"bfloat16"`` or ``"float16"`` (autocast; the output
        is float32).
    border
        How the image is extended so border pixels get a whole patch: ``"reflect"``,
        ``"edge"``, ``"constant"`` (zeros).
    interpolation
        Between lattice samples when ``output_stride > 1``: ``"bilinear"`` or ``"nearest"``.
    tile
        Output pixels per tile side, or ``(ty, tx)`` (at least :data:`MIN_TILE`); None: the
        largest tile whose memory fits ``memory_budget``.
    memory_budget
        Bytes a tile may use; None: half the free GPU memory, or on CPU a quarter of the
        available host memory up to 2 GiB.
    normalisation
        ``{"scale", "mean", "std"}``: ``(x * scale - mean[c]) / std[c]`` per channel before the
        network; None: the model file's, else none.
    activation
        ``"softmax"`` (over classes) or ``"sigmoid"`` turns the interpolated scores into
        probabilities, ``"none"`` keeps the scores; None: the model file's, else ``"none"``
        (:data:`ACTIVATIONS`, the one table).
    class_names
        One name per output channel; None: the model file's, else ``"class 0"``, ...
    dtype
        What the probabilities come back from the device in and are stored as: ``"float32"``,
        ``"float16"`` or ``"uint8"`` (``round(p * 255)``).
    non_finite
        NaN/infinite pixels: ``"refuse"`` (an error naming this option) or ``"zero"`` (read as
        0); see :mod:`napari_dense.io.input_checks`.
    compile
        ``torch.compile`` the network, once per (network, precision, device) and tile shape in
        a process; True uses :data:`~napari_dense.run.device.DEFAULT_COMPILE_MODE`, a string is
        the mode (:data:`COMPILE_MODES`).
    """

    mode: str | Mapping[str, str] = field(default="advanced", hash=False)
    channel_axis: int | None = None
    level: int = 0
    device: str | torch.device = "auto"
    precision: str = "auto"
    border: str = "reflect"
    interpolation: str = "bilinear"
    tile: int | tuple[int, int] | None = None
    memory_budget: int | None = None
    normalisation: Mapping[str, Any] | None = field(default=None, hash=False)
    activation: str | None = None
    class_names: tuple[str, ...] | None = None
    dtype: str = "float32"
    non_finite: str = "refuse"
    compile: bool | str = False

    def __post_init__(self) -> None:
        for name in _NAMES:
            value = _CHECKS[name](getattr(self, name))
            object.__setattr__(self, name, value)  # frozen: the checked (canonical) value

    @classmethod
    def merge(
        cls,
        options: RunOptions | None = None,
        /,
        *,
        used: Collection[str] | None = None,
        caller: str = "",
        **changes: Any,
    ) -> RunOptions:
        """``options`` (or the defaults) with ``changes``: the keywords of a public function.

        Parameters
        ----------
        options
            The base; None: ``RunOptions()``.
        used
            The options the caller applies (None: all); one set to anything but its default,
            here or in ``options``, is refused by name.
        caller
            The function's name, for the messages.
        **changes
            Option names and values (``output_dtype`` is ``dtype``'s name in the engine).

        Raises
        ------
        InputError
            An unknown name (the message lists the names that exist), an option the caller
            does not use, or a value an option does not accept.
        """
        if options is not None and not isinstance(options, RunOptions):
            raise InputError(
                f"options must be a napari_dense.RunOptions, got {type(options).__name__}; "
                "pass RunOptions(...) or the options as keywords"
            )
        where = f"{caller}() " if caller else ""
        for alias, name in _ALIASES.items():
            if alias in changes:
                if name in changes:
                    raise InputError(f"{where}got both {alias} and {name}; pass {name} only")
                changes[name] = _ALIAS_CHECKS[alias](changes.pop(alias))
        unknown = sorted(set(changes) - set(_NAMES))
        if unknown:
            raise InputError(
                f"{where}got unknown option(s) {', '.join(unknown)}; run options are "
                f"{', '.join(_NAMES)} (napari_dense.RunOptions)"
            )
        merged = dataclasses.replace(options or cls(), **changes)
        if used is not None:
            merged._refuse_unused(used, where)
        return merged

    def _refuse_unused(self, used: Collection[str], where: str) -> None:
        defaults = RunOptions()
        unused = [
            name
            for name in _NAMES
            if name not in used and getattr(self, name) != getattr(defaults, name)
        ]
        if unused:
            raise InputError(
                f"{where}does not use {', '.join(unused)}; its run options are "
                f"{', '.join(name for name in _NAMES if name in used)}"
            )

    @property
    def sampling(self) -> SamplingSpec:
        """The per-layer sampling :attr:`mode` stands for (what :func:`densify` takes)."""
        return sampling_of_mode(self.mode)

    @property
    def mode_name(self) -> str:
        """:attr:`mode` as recorded in a store: its name, or ``"custom"`` for a mapping."""
        return self.mode if isinstance(self.mode, str) else "custom"


# -- the checks: each option's accepted values, each returning the canonical value -----------


def _check_mode(mode: Any) -> Any:
    sampling_of_mode(mode)
    return dict(mode) if isinstance(mode, Mapping) else mode


def _check_channel_axis(axis: Any) -> int | None:
    if axis is None:
        return None
    if isinstance(axis, bool) or not isinstance(axis, int | np.integer):
        raise InputError(f"channel_axis must be a whole number or None, got {axis!r}")
    return int(axis)


def _check_level(level: Any) -> int:
    if isinstance(level, bool) or not isinstance(level, int | np.integer) or level < 0:
        raise InputError(f"level must be a whole number >= 0 (0: full resolution), got {level!r}")
    return int(level)


def _check_device(device: Any) -> str | torch.device:
    if isinstance(device, torch.device) or device == "auto":
        return device
    try:
        return str(torch.device(device))
    except (RuntimeError, TypeError):
        raise InputError(
            f"unknown device {device!r}; use 'auto', 'cpu', 'cuda', 'cuda:1' or 'mps'"
        ) from None


def _check_precision(precision: Any) -> str:
    if precision not in PRECISION_CHOICES:
        raise InputError(f"precision must be one of {PRECISION_CHOICES}, got {precision!r}")
    return str(precision)


def _check_border(border: Any) -> str:
    if border not in BORDER_MODES:
        raise InputError(f"border must be one of {sorted(BORDER_MODES)}, got {border!r}")
    return str(border)


def _check_interpolation(interpolation: Any) -> str:
    if interpolation not in INTERPOLATIONS:
        raise InputError(f"interpolation must be 'bilinear' or 'nearest', got {interpolation!r}")
    return str(interpolation)


def _check_tile(tile: Any) -> int | tuple[int, int] | None:
    if tile is None:
        return None
    sides = (tile,) if isinstance(tile, int | np.integer) else tuple(np.atleast_1d(tile))
    whole = all(isinstance(s, int | np.integer) and not isinstance(s, bool) for s in sides)
    if not (whole and len(sides) in (1, 2) and all(s >= MIN_TILE for s in sides)):
        raise InputError(
            f"tile sides must be whole numbers of at least {MIN_TILE} px (each tile also reads "
            f"and computes a patch-sized halo), got {tile!r}; omit tile (CLI: --tile) to size "
            "tiles from the memory budget"
        )
    return int(sides[0]) if isinstance(tile, int | np.integer) else (int(sides[0]), int(sides[-1]))


def _check_memory_budget(budget: Any) -> int | None:
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, int | np.integer) or budget <= 0:
        raise InputError(f"memory_budget must be a number of bytes > 0 or None, got {budget!r}")
    return int(budget)


def _check_normalisation(normalisation: Any) -> Mapping[str, Any] | None:
    """Checked by the model-file schema (one rule for files and arguments); kept as given."""
    if normalisation is None:
        return None
    from napari_dense.model_files.metadata import check_normalisation

    if not isinstance(normalisation, Mapping):
        raise InputError(
            f"normalisation must be a mapping {{'scale', 'mean', 'std'}}, got {normalisation!r}"
        )
    plain = {k: np.asarray(v).tolist() for k, v in normalisation.items()}
    try:
        check_normalisation(plain)
    except InputError:
        raise
    except Exception as err:  # the schema's one-line ModelFileError
        raise InputError(str(err)) from None
    return normalisation


def _check_activation(activation: Any) -> str | None:
    return None if activation is None else check_activation(activation)


def _check_class_names(names: Any) -> tuple[str, ...] | None:
    if names is None:
        return None
    if isinstance(names, str) or not isinstance(names, Iterable):
        raise InputError(f"class_names must be a list of names, got {names!r}")
    return tuple(str(name) for name in names)


def _check_compile(compile: Any) -> bool | str:
    if isinstance(compile, bool | np.bool_):
        return bool(compile)
    if compile not in COMPILE_MODES:
        raise InputError(
            f"compile must be True, False or a torch.compile mode ({', '.join(COMPILE_MODES)}), "
            f"got {compile!r}"
        )
    return str(compile)


_CHECKS: dict[str, Any] = {
    "mode": _check_mode,
    "channel_axis": _check_channel_axis,
    "level": _check_level,
    "device": _check_device,
    "precision": _check_precision,
    "border": _check_border,
    "interpolation": _check_interpolation,
    "tile": _check_tile,
    "memory_budget": _check_memory_budget,
    "normalisation": _check_normalisation,
    "activation": _check_activation,
    "class_names": _check_class_names,
    "dtype": lambda dtype: check_dtype(dtype).name,
    "non_finite": check_non_finite_policy,
    "compile": _check_compile,
}
_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(RunOptions))
#: Other names of options (the engine calls ``dtype`` ``output_dtype``), checked in their words.
_ALIASES = {"output_dtype": "dtype"}
_ALIAS_CHECKS: dict[str, Any] = {"output_dtype": check_output_dtype}
