"""Tiled dense inference over images of any size, in constant memory.

:func:`iter_predict` is a generator yielding one :class:`TileResult` per tile: the unit of progress
and of cancellation for the CLI and the GUI (closing the generator stops after the current tile).
:func:`predict_to_zarr` drains it into an OME-Zarr store (see :mod:`napari_dense.io.store`) that
survives cancellation and crashes.

Per tile: the input window (the tile plus a patch-sized halo, gathered through the plan's border
index maps) is read in a background thread while the previous tile computes; the dense network
runs on the device; lattice samples are interpolated when the output stride is above 1.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from napari_dense.convert import densify
from napari_dense.convert.dense import DenseClassifier
from napari_dense.convert.upsample import activate, upsample_lattice
from napari_dense.errors import InputError, NapariDenseError
from napari_dense.io.input_checks import (
    check_non_finite_policy,
    check_value_range,
    handle_non_finite,
)
from napari_dense.io.sources import ImageSource, open_image, unreadable_error
from napari_dense.run._transfer import (
    CudaBackend,
    InFlight,
    StagingPool,
    TransferPipeline,
    as_tensor,
    check_output_dtype,
    pipelined,
    to_float32,
    to_output,
    transfer_dtype,
)
from napari_dense.run.device import (
    DEFAULT_COMPILE_MODE,
    CompiledKey,
    compiled_network,
    cuda_settings,
    is_warm,
    mark_warm,
    resolve_device,
    resolve_precision,
)
from napari_dense.run.predict import sampling_of_mode
from napari_dense.run.tiling import Tile, TilePlan, plan_tiles

__all__ = [
    "PRECISIONS",
    "TileResult",
    "TiledPredictor",
    "auto_tile_size",
    "iter_predict",
    "make_predictor",
    "resolve_classifier",
]

log = logging.getLogger(__name__)

PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ACTIVATIONS = ("softmax", "sigmoid", "none")
#: Windows read ahead (and reading threads) on CUDA, where reading bounds a tile, not the GPU.
READ_AHEAD = 3
#: Smallest tile side accepted: every tile also reads and computes a patch-sized halo, so below
#: this the halo costs more than the tile itself, and a 512² image would take 1,000+ tiles.
MIN_TILE = 16

#: Called with the input window shape (rows, cols) before each forward pass; may raise
#: ``torch.OutOfMemoryError``. Lets tests force the out-of-memory fallback on a CPU.
MemoryCheck = Callable[[tuple[int, int]], None]


@dataclass(frozen=True)
class TileResult:
    """One computed tile.

    Attributes
    ----------
    index, total
        Position of this tile in the run and number of tiles the run computes.
    leading
        Indices of the Z/T axes of the plane (empty for 2-D images).
    tile
        The output box (``tile.box == (y0, y1, x0, x1)``).
    probabilities
        ``(K, y1 - y0, x1 - x0)`` in the predictor's ``output_dtype`` (float32 by default;
        float16, or uint8 as ``round(p * 255)``).
    read_seconds, compute_seconds
        Reading the input window (overlapped with the previous tile's compute) and computing
        (on CUDA: the compute's own device time, measured with events; copies overlap it).
    peak_device_bytes
        Peak CUDA memory of the run so far (0 on CPU/MPS).
    """

    index: int
    total: int
    leading: tuple[int, ...]
    tile: Tile
    probabilities: np.ndarray
    read_seconds: float
    compute_seconds: float
    peak_device_bytes: int = 0

    @property
    def megapixels_per_second(self) -> float:
        """Output megapixels of this tile per second of compute."""
        height, width = self.tile.shape
        return height * width / 1e6 / max(self.compute_seconds, 1e-9)


@dataclass(frozen=True)
class ClassifierSetup:
    """A dense classifier and what the engine applies around it (from model metadata)."""

    dense: DenseClassifier
    class_names: tuple[str, ...]
    normalisation: Mapping[str, Any] | None = None
    activation: str = "none"
    provenance: Mapping[str, Any] = field(default_factory=dict)


def resolve_classifier(
    model: Any,
    patch_size: int | tuple[int, int] | None = None,
    *,
    mode: str | Mapping[str, str] = "advanced",
    normalisation: Mapping[str, Any] | None = None,
    activation: str | None = None,
    class_names: Iterable[str] | None = None,
    trust_code: bool = False,
) -> ClassifierSetup:
    """Turn what the user gave (module, dense classifier, loaded file, path) into a setup.

    Metadata of a loaded model file (``napari_dense.model_files.load_classifier``) provides the
    patch size, normalisation, activation and class names unless given here. A path is loaded
    with ``load_classifier(path, trust_code=trust_code)``: a model that runs a Python file is
    refused unless ``trust_code`` is True.
    """
    provenance: dict[str, Any] = {}
    if isinstance(model, str | os.PathLike):
        from napari_dense.model_files import load_classifier

        model = load_classifier(model, trust_code=trust_code)
    metadata = getattr(model, "metadata", None)
    if metadata is not None:  # a LoadedClassifier
        provenance = {"model_path": str(model.path), "model_sha256": model.sha256}
        patch_size = patch_size or metadata.patch_size
        normalisation = normalisation if normalisation is not None else metadata.normalisation
        activation = activation or metadata.activation
        class_names = class_names or metadata.class_names
        model = model.module
    if isinstance(model, DenseClassifier):
        dense = model
    elif isinstance(model, nn.Module) or hasattr(model, "graph_module"):
        if patch_size is None:
            raise InputError("patch_size is required to convert a patch classifier")
        dense = densify(model, patch_size, sampling=sampling_of_mode(mode))
    else:
        raise InputError(f"model must be a torch module or a model file, got {type(model)}")
    activation = activation or "none"
    if activation not in ACTIVATIONS:
        raise InputError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    names = tuple(class_names) if class_names else ()
    if names and len(names) != dense.num_classes:
        raise InputError(
            f"{len(names)} class names given for a model with {dense.num_classes} outputs"
        )
    names = names or tuple(f"class {k}" for k in range(dense.num_classes))
    provenance["verified"] = dense.plan.as_dict()["verified"]  # the conversion's self-check
    return ClassifierSetup(dense, names, normalisation, activation, provenance)


def auto_tile_size(dense: DenseClassifier, device: torch.device, budget_bytes: int | None) -> int:
    """Largest tile side whose estimated peak memory fits the budget.

    The budget defaults to half the free GPU memory, or on CPU a quarter of the available host
    memory capped at 2 GiB (larger tiles bring no speed on CPU). The estimate is the plan's peak
    activation memory per pixel, doubled for convolution workspaces and reduced-precision copies.
    """
    if budget_bytes is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            budget_bytes = free // 2
        else:
            budget_bytes = min(_available_host_bytes() // 4, 2 * 2**30)
    bytes_per_pixel = 2 * dense.plan.bytes_per_megapixel / 1e6
    side = int(math.sqrt(budget_bytes / max(bytes_per_pixel, 1.0)))
    side -= max(dense.patch_size)  # the halo is read and computed too
    largest = 2048 if device.type == "cuda" else 1024
    stride = max(dense.period)
    return max(min(side, largest) // stride * stride, stride, 64 // stride * stride)


def _available_host_bytes() -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover - not Linux
        pass
    return 8 * 2**30


class TiledPredictor:
    """A dense classifier bound to one image and one tile plan (plan once, run many tiles).

    Parameters
    ----------
    source
        The image (:func:`napari_dense.io.sources.open_image`).
    setup
        The classifier (:func:`resolve_classifier`).
    device, precision, border, interpolation
        As in :func:`iter_predict`; ``precision="auto"`` is bfloat16 on a CUDA GPU that supports
        it, float32 elsewhere (:func:`napari_dense.run.device.resolve_precision`).
    tile
        Output pixels per tile side (or ``(ty, tx)``); None chooses from ``memory_budget``.
    compile
        Compile the network with ``torch.compile``: once per (network, precision, device) and
        tile shape in a process (:func:`napari_dense.run.device.compiled_network`); True uses
        :data:`~napari_dense.run.device.DEFAULT_COMPILE_MODE`, a string is the mode.
    output_dtype
        ``"float32"``, ``"float16"`` or ``"uint8"`` (``round(p * 255)``): the dtype results come
        back from the device in (a store of that dtype writes them unchanged).

    Attributes
    ----------
    first_call_seconds
        Seconds of the warm-up call (compilation, cuDNN autotuning) of the last CUDA or
        compiled run, apart from the tiles' times; 0.0 when nothing needed warming; None before.
    non_finite
        NaN/infinite pixels: ``"refuse"`` or ``"zero"`` (:mod:`napari_dense.io.input_checks`).
    memory_check
        Test hook, see :data:`MemoryCheck`.
    """

    def __init__(
        self,
        source: ImageSource,
        setup: ClassifierSetup,
        *,
        device: str | torch.device = "auto",
        precision: str = "float32",
        border: str = "reflect",
        interpolation: str = "bilinear",
        tile: int | tuple[int, int] | None = None,
        memory_budget: int | None = None,
        memory_check: MemoryCheck | None = None,
        compile: bool | str = False,
        non_finite: str = "refuse",
        output_dtype: str = "float32",
    ):
        self.non_finite = check_non_finite_policy(non_finite)
        if tile is not None:
            tile = _check_tile(tile)
        if precision not in (*PRECISIONS, "auto"):
            raise InputError(
                f"precision must be one of {sorted(PRECISIONS)} or 'auto', got {precision!r}"
            )
        self.output_dtype = check_output_dtype(output_dtype)
        if interpolation not in ("bilinear", "nearest"):
            raise InputError(f"interpolation must be 'bilinear' or 'nearest': {interpolation!r}")
        if source.channels != setup.dense.in_channels:
            raise InputError(
                f"the model expects {setup.dense.in_channels} channel(s), the image has "
                f"{source.channels}; pass channel_axis=... or convert the image"
            )
        self.source = source
        self.setup = setup
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.interpolation = interpolation
        self.memory_check = memory_check
        self.dense = setup.dense.to(self.device).eval()  # moved once
        # torch.compile (Triton on GPUs, C++ on CPUs): compiled once per input shape; every
        # tile reads the same window shape, so a run compiles once, in its warm-up call; the
        # compiled module is kept for later runs of the same network in this process.
        self._network: Any = self.dense
        self._compiled_key: CompiledKey | None = None
        if compile:
            mode = compile if isinstance(compile, str) else DEFAULT_COMPILE_MODE
            self._network, self._compiled_key = compiled_network(
                self.dense, self.device, self.precision, mode
            )
        # Windows travel as stored (uint8: a quarter of float32's bytes), become float32 on
        # the device (napari_dense.run._transfer).
        self._stored_dtype = np.dtype(source.array.dtype)
        self._read_dtype = transfer_dtype(self._stored_dtype)
        self._pipeline: TransferPipeline | None = None
        self.first_call_seconds: float | None = None
        tile = tile or auto_tile_size(self.dense, self.device, memory_budget)
        self.plan: TilePlan = plan_tiles(
            source.plane_shape, tile, self.dense.patch_size, self.dense.period, border
        )
        self._split_side: int | None = None  # set after an out-of-memory error
        self._normalise = _normaliser(setup.normalisation, self.dense.in_channels, self.device)
        check_value_range(source.array.dtype, setup.normalisation, _describe(source))

    @property
    def num_classes(self) -> int:
        """Channels of the output."""
        return self.dense.num_classes

    def tasks(
        self, centre: tuple[float, float] | None = None
    ) -> list[tuple[tuple[int, ...], Tile]]:
        """Every (plane, tile) of the image; with ``centre``, tiles nearest to it first."""
        tiles = list(self.plan.tiles()) if centre is None else self.plan.tiles_by_distance(centre)
        return [
            (leading, tile) for leading in np.ndindex(*self.source.leading_shape) for tile in tiles
        ]

    # -- one tile ------------------------------------------------------------------------------

    def read(self, leading: tuple[int, ...], tile: Tile) -> np.ndarray:
        """The tile's input window, ``(C, rows, cols)``, checked for NaN/infinity.

        In the stored dtype where that is exact on the device (uint8, uint16, int16, float16,
        float32: :func:`napari_dense.run._transfer.transfer_dtype`), else float32.

        Raises
        ------
        InputError
            A chunk of the image cannot be read (named), or the window holds NaN/infinite values
            and the policy is ``"refuse"``.
        """
        rows, cols = self.plan.input_indices(tile)
        try:
            window = self.source.read_window(leading, rows, cols, dtype=self._read_dtype)
        except NapariDenseError:
            raise
        except Exception as err:
            valid_rows, valid_cols = rows[rows >= 0], cols[cols >= 0]
            box = (
                int(valid_rows.min()), int(valid_rows.max()) + 1,
                int(valid_cols.min()), int(valid_cols.max()) + 1,
            )  # fmt: skip
            raise unreadable_error(self.source.array, leading, box, self.source.path, err) from err
        if window.dtype.kind != "f":
            return window  # integers hold no NaN
        plane = f" of plane {leading}" if leading else ""
        return handle_non_finite(window, self.non_finite, f"the input of tile {tile.box}{plane}")

    def compute(self, window: np.ndarray, tile: Tile) -> np.ndarray:
        """Probabilities ``(K, h, w)`` of ``tile`` from its input window (:meth:`read`).

        In :attr:`output_dtype`. A CUDA out-of-memory error splits the tile into lattice-aligned
        parts and retries, for the rest of the run (logged once); the result is the same.
        """
        if self.device.type == "cuda":
            pipeline = self._staging()
            result, _ = pipeline.finish(self._launch(pipeline, window, tile, None))
            return result
        x = as_tensor(window).to(self.device)
        return self._step(x, tile.shape).cpu().numpy()

    def _step(self, x: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        """The tile's result on the device from its window there (splitting on out of memory)."""
        if self._split_side is None:
            try:
                return self._forward(x, shape)
            except torch.OutOfMemoryError:
                self._split_side = max(self.plan.tile_shape) // 2
                log.warning("out of memory: splitting tiles into parts of %d px", self._split_side)
            self._free_cache()  # after the except block: the failed attempt's tensors are gone
        return self._forward_in_parts(x, shape)

    def _forward_in_parts(self, x: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        # Parts align to the period, so each part's samples are a lattice of the whole tile's.
        (ph, pw), (sy, sx) = self.dense.patch_size, self.dense.period
        out_dtype = getattr(torch, self.output_dtype)
        while True:
            assert self._split_side is not None
            part_y = max(self._split_side // sy, 1) * sy
            part_x = max(self._split_side // sx, 1) * sx
            try:
                out = torch.empty((self.num_classes, *shape), dtype=out_dtype, device=x.device)
                for y0 in range(0, shape[0], part_y):
                    for x0 in range(0, shape[1], part_x):
                        h, w = min(part_y, shape[0] - y0), min(part_x, shape[1] - x0)
                        rows = -(-(h - 1) // sy) * sy + ph
                        cols = -(-(w - 1) // sx) * sx + pw
                        part = x[:, y0 : y0 + rows, x0 : x0 + cols]
                        out[:, y0 : y0 + h, x0 : x0 + w] = self._forward(part, (h, w))
                return out
            except torch.OutOfMemoryError as err:
                if self._split_side <= max(sy, sx, MIN_TILE):
                    raise _out_of_memory(f"parts of {self._split_side} px") from err
                self._split_side //= 2
                log.debug("out of memory again: parts of %d px", self._split_side)
            self._free_cache()

    def _free_cache(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _forward(self, x: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        """``(K, h, w)`` in :attr:`output_dtype`, on the device, from a window on the device."""
        if self.memory_check is not None:
            self.memory_check((int(x.shape[-2]), int(x.shape[-1])))
        dtype = PRECISIONS[self.precision]
        with (
            torch.inference_mode(),
            torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32),
        ):
            samples = self._network(self._normalise(to_float32(x, self._stored_dtype)[None]))
        out = upsample_lattice(
            samples.float(), self.dense.output_stride, shape, self.interpolation,
            self.dense.sample_pattern,
        )  # fmt: skip
        return to_output(activate(out, self.setup.activation)[0], self.output_dtype)

    # -- the CUDA pipeline ---------------------------------------------------------------------

    def _staging(self) -> TransferPipeline:
        """The run's buffers and streams (CUDA): made once, again only if a run was abandoned."""
        pipeline = self._pipeline
        if pipeline is None or any(slot.busy for slot in pipeline.pool.slots):
            shape = (self.dense.in_channels, *self.plan.input_shape)
            dtype = as_tensor(np.empty(0, self._read_dtype)).dtype
            try:
                pool = StagingPool(2, shape, dtype, self.device)
            except torch.OutOfMemoryError as err:
                raise _out_of_memory(f"{2 * math.prod(shape) * dtype.itemsize} bytes") from err
            pipeline = self._pipeline = TransferPipeline(pool, CudaBackend(self.device))
            # Weights and normalisation were copied on the default stream.
            pipeline.compute.wait_stream(torch.cuda.current_stream(self.device))
        return pipeline

    def _launch(
        self, pipeline: TransferPipeline, window: np.ndarray, tile: Tile, context: Any
    ) -> InFlight:
        with cuda_settings(self.device, self.precision):  # TF32 off for strict float32
            return pipeline.launch(window, lambda x: self._step(x, tile.shape), context)

    def warm_up(self) -> float:
        """Run the network once on the run's window shape (compile, cuDNN autotuning).

        Sets and returns :attr:`first_call_seconds`: 0.0 off CUDA without compilation, and for
        a compiled network that already ran on this shape in this process.
        """
        shape = (self.dense.in_channels, *self.plan.input_shape)
        key = self._compiled_key
        nothing_to_warm = self.device.type != "cuda" and key is None
        if nothing_to_warm or (key is not None and is_warm(key, shape)):
            self.first_call_seconds = 0.0
            return 0.0
        start = time.perf_counter()
        window = np.zeros(shape, dtype=self._read_dtype)
        self.compute(window, self.plan_tile())
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if key is not None:
            mark_warm(key, shape)
        self.first_call_seconds = time.perf_counter() - start
        return self.first_call_seconds

    def plan_tile(self) -> Tile:
        """A whole tile (the plan's tile shape) at the origin: the warm-up's box."""
        ty, tx = self.plan.tile_shape
        return Tile(0, 0, 0, ty, 0, tx)

    def __getstate__(self) -> dict[str, Any]:
        # Streams and pinned buffers stay in their process (a dask worker makes its own).
        state = self.__dict__.copy()
        state["_pipeline"] = None
        return state

    # -- many tiles ----------------------------------------------------------------------------

    def run(self, tasks: Iterable[tuple[tuple[int, ...], Tile]]) -> Iterator[TileResult]:
        """Compute ``tasks`` in order, reading the next windows while the current one computes.

        On CUDA two tiles are in flight (the copies of one overlap the compute of the other),
        after a warm-up call whose time is :attr:`first_call_seconds`; elsewhere one at a time.
        """
        todo = list(tasks)
        if not todo:
            return
        cuda = self.device.type == "cuda"
        depth = 2 if cuda else 1
        # Windows read ahead, in as many threads (zarr decoding and numpy gathers release the GIL):
        # on CUDA the reads, not the GPU, bound a tile; elsewhere one, as the compute is slower.
        ahead = READ_AHEAD if cuda else 1
        if cuda or self._compiled_key is not None:
            self.warm_up()
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        total = len(todo)
        with ThreadPoolExecutor(ahead, thread_name_prefix="napari-dense-read") as reader:

            def timed_read(leading: tuple[int, ...], tile: Tile) -> tuple[np.ndarray, float]:
                start = time.perf_counter()
                return self.read(leading, tile), time.perf_counter() - start

            def windows() -> Iterator[tuple[int, tuple[int, ...], Tile, np.ndarray, float]]:
                # ``ahead`` windows read ahead: the next tiles' reads overlap this one's compute.
                pending: deque[Future[tuple[np.ndarray, float]]] = deque()
                for index in range(min(ahead, total)):
                    pending.append(reader.submit(timed_read, *todo[index]))
                for index, (leading, tile) in enumerate(todo):
                    window, read_seconds = pending.popleft().result()
                    if index + ahead < total:
                        pending.append(reader.submit(timed_read, *todo[index + ahead]))
                    yield index, tuple(int(i) for i in leading), tile, window, read_seconds

            if not cuda:
                for index, leading, tile, window, read_seconds in windows():
                    start = time.perf_counter()
                    probabilities = self.compute(window, tile)
                    seconds = time.perf_counter() - start
                    yield TileResult(
                        index, total, leading, tile, probabilities, read_seconds, seconds
                    )
                return

            pipeline = self._staging()

            def launch(item: tuple[int, tuple[int, ...], Tile, np.ndarray, float]) -> InFlight:
                index, leading, tile, window, read_seconds = item
                return self._launch(pipeline, window, tile, (index, leading, tile, read_seconds))

            def finish(flight: InFlight) -> TileResult:
                probabilities, seconds = pipeline.finish(flight)
                index, leading, tile, read_seconds = flight.context
                peak = int(torch.cuda.max_memory_allocated(self.device))
                return TileResult(
                    index, total, leading, tile, probabilities, read_seconds, seconds, peak
                )

            yield from pipelined(windows(), launch, finish, depth)


def _out_of_memory(what: str) -> NapariDenseError:
    return NapariDenseError(
        f"out of memory even for the smallest tiles ({what}); free GPU memory (close other GPU "
        "programs), use precision='bfloat16' (CLI: --precision bfloat16), or run on the CPU "
        "(device='cpu')"
    )


def _check_tile(tile: int | tuple[int, int]) -> int | tuple[int, int]:
    sides = (tile,) if isinstance(tile, int) else tuple(tile)
    if not all(isinstance(s, int | np.integer) and s >= MIN_TILE for s in sides):
        raise InputError(
            f"tile sides must be whole numbers of at least {MIN_TILE} px (each tile also reads "
            f"and computes a patch-sized halo), got {tile!r}; omit tile (CLI: --tile) to size "
            "tiles from the memory budget"
        )
    return tile


def _describe(source: ImageSource) -> str:
    return f"the image {source.path}" if source.path else "the image"


def _normaliser(
    normalisation: Mapping[str, Any] | None, channels: int, device: torch.device
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> (x * scale - mean) / std`` per channel (identity without metadata)."""
    if not normalisation:
        return lambda x: x
    scale = float(normalisation.get("scale", 1.0))
    mean = torch.as_tensor(normalisation.get("mean", 0.0), dtype=torch.float32, device=device)
    std = torch.as_tensor(normalisation.get("std", 1.0), dtype=torch.float32, device=device)
    mean, std = mean.reshape(-1, 1, 1), std.reshape(-1, 1, 1)
    if mean.shape[0] not in (1, channels) or std.shape[0] not in (1, channels):
        raise InputError(f"normalisation mean/std must have 1 or {channels} values")
    return lambda x: (x * scale - mean) / std


def make_predictor(
    image: Any,
    model: Any,
    patch_size: int | tuple[int, int] | None = None,
    *,
    mode: str | Mapping[str, str] = "advanced",
    channel_axis: int | None = None,
    level: int = 0,
    normalisation: Mapping[str, Any] | None = None,
    activation: str | None = None,
    class_names: Iterable[str] | None = None,
    **options: Any,
) -> TiledPredictor:
    """Convert the model, open the image lazily and plan its tiles (one place for all runs).

    Arguments are those of :func:`iter_predict`; ``options`` go to :class:`TiledPredictor`.
    """
    setup = resolve_classifier(
        model, patch_size, mode=mode, normalisation=normalisation, activation=activation,
        class_names=class_names,
    )  # fmt: skip
    source = open_image(
        image, channels=setup.dense.in_channels, channel_axis=channel_axis, level=level
    )
    return TiledPredictor(source, setup, **options)


def iter_predict(
    image: Any,
    model: Any,
    patch_size: int | tuple[int, int] | None = None,
    *,
    mode: str | Mapping[str, str] = "advanced",
    channel_axis: int | None = None,
    level: int = 0,
    device: str | torch.device = "auto",
    precision: str = "auto",
    border: str = "reflect",
    interpolation: str = "bilinear",
    tile: int | tuple[int, int] | None = None,
    memory_budget: int | None = None,
    normalisation: Mapping[str, Any] | None = None,
    activation: str | None = None,
    skip: Iterable[tuple[tuple[int, ...], tuple[int, int, int, int]]] = (),
    centre: tuple[float, float] | None = None,
    memory_check: MemoryCheck | None = None,
    compile: bool = False,
    non_finite: str = "refuse",
) -> Iterator[TileResult]:
    """Predict ``image`` tile by tile, yielding each tile's probabilities as soon as it is done.

    Parameters
    ----------
    image
        numpy/dask/zarr array or a path (``.zarr``, OME-Zarr, ``.tif``, ``.npy``, ...), with
        optional leading Z/T axes (see :func:`napari_dense.io.sources.open_image`).
    model
        A patch classifier (``nn.Module`` or exported program), a ``DenseClassifier``, a model
        file path or a loaded model file (its metadata supplies patch size, normalisation,
        activation and class names).
    patch_size, mode, border, interpolation, device
        As in :func:`napari_dense.predict` (whose result this equals, tile by tile).
    channel_axis, level
        Channel axis as stored; resolution level of an OME-Zarr/pyramidal TIFF.
    precision
        ``"auto"`` (bfloat16 on a CUDA GPU that supports it, else float32), ``"float32"``
        (strict IEEE: TF32 off on CUDA), ``"bfloat16"`` or ``"float16"`` (autocast; the
        output is float32).
    tile
        Output pixels per tile side (at least :data:`MIN_TILE`); None picks the largest that
        fits ``memory_budget`` bytes.
    normalisation, activation
        ``{"scale", "mean", "std"}`` applied as ``(x * scale - mean) / std`` before the
        network; ``"softmax"``, ``"sigmoid"`` or ``"none"`` after it.
    skip
        ``(leading, box)`` pairs already done (resume).
    centre
        ``(y, x)``: compute the tiles nearest to it first (the GUI passes the field of view).
    memory_check
        Test hook called before each forward pass (see :data:`MemoryCheck`).
    compile
        ``torch.compile`` the network (once per run: all tiles share one shape).
    non_finite
        NaN/infinite pixels: ``"refuse"`` (the tile that holds one raises an error naming this
        option) or ``"zero"`` (read as 0); see :mod:`napari_dense.io.input_checks`.

    Yields
    ------
    TileResult
        One per tile. Closing the generator stops after the current tile.
    """
    predictor = make_predictor(
        image, model, patch_size, mode=mode, channel_axis=channel_axis, level=level,
        normalisation=normalisation, activation=activation, device=device,
        precision=precision, border=border, interpolation=interpolation, tile=tile,
        memory_budget=memory_budget, memory_check=memory_check, compile=compile,
        non_finite=non_finite,
    )  # fmt: skip
    done = {(tuple(leading), tuple(box)) for leading, box in skip}
    tasks = [(lead, t) for lead, t in predictor.tasks(centre) if (lead, t.box) not in done]
    yield from predictor.run(tasks)
