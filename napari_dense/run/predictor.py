"""The tiled predictor: a dense classifier bound to one image and one tile plan.

Per tile: the input window (the tile plus a patch-sized halo, gathered through the plan's border
index maps) is read in a background thread while the previous tile computes; the dense network
runs on the device; lattice samples are interpolated when the output stride is above 1. On CUDA
two tiles are in flight (:mod:`napari_dense.run._transfer`); an out-of-memory error splits tiles
into lattice-aligned parts, with the same result.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from napari_dense.convert.upsample import activate, upsample_lattice
from napari_dense.errors import InputError, NapariDenseError
from napari_dense.io.image import normalisation_constants, scale_shift
from napari_dense.io.input_checks import check_value_range, handle_non_finite
from napari_dense.io.sources import ImageSource, unreadable_error
from napari_dense.run._transfer import (
    CudaBackend,
    InFlight,
    StagingPool,
    TransferPipeline,
    as_tensor,
    pipelined,
    to_float32,
    to_output,
    transfer_dtype,
)
from napari_dense.run.classifier import ClassifierSetup
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
from napari_dense.run.options import MIN_TILE, RunOptions
from napari_dense.run.tile_size import auto_tile_size
from napari_dense.run.tiling import Tile, TilePlan, plan_tiles

__all__ = ["PRECISIONS", "READ_AHEAD", "MemoryCheck", "TileResult", "TiledPredictor"]

log = logging.getLogger(__name__)

PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: Windows read ahead (and reading threads) on CUDA, where reading bounds a tile, not the GPU.
READ_AHEAD = 3

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


class TiledPredictor:
    """A dense classifier bound to one image and one tile plan (plan once, run many tiles).

    Parameters
    ----------
    source
        The image (:func:`napari_dense.io.sources.open_image`).
    setup
        The classifier (:func:`napari_dense.run.classifier.resolve_classifier`).
    options
        How it runs (:class:`~napari_dense.run.options.RunOptions`): ``device``, ``precision``
        (``"auto"`` resolved here), ``border``, ``interpolation``, ``tile`` (None: from
        ``memory_budget``), ``compile``, ``non_finite``, and ``dtype``, the dtype results come
        back from the device in (a store of that dtype writes them unchanged).
    memory_check
        Test hook, see :data:`MemoryCheck`.

    Attributes
    ----------
    options
        The run's options; :attr:`device` and :attr:`precision` hold their resolved values.
    first_call_seconds
        Seconds of the warm-up call (compilation, cuDNN autotuning) of the last CUDA or
        compiled run, apart from the tiles' times; 0.0 when nothing needed warming; None before.
    output_dtype
        ``options.dtype``: ``"float32"``, ``"float16"`` or ``"uint8"`` (``round(p * 255)``).
    """

    def __init__(
        self,
        source: ImageSource,
        setup: ClassifierSetup,
        options: RunOptions | None = None,
        *,
        memory_check: MemoryCheck | None = None,
    ):
        options = options or RunOptions()
        if source.channels != setup.dense.in_channels:
            raise InputError(
                f"the model expects {setup.dense.in_channels} channel(s), the image has "
                f"{source.channels}; pass channel_axis=... or convert the image"
            )
        self.options = options
        self.source = source
        self.setup = setup
        self.output_dtype = options.dtype
        self.device = resolve_device(options.device)
        self.precision = resolve_precision(options.precision, self.device)
        self.memory_check = memory_check
        self.dense = setup.dense.to(self.device).eval()  # moved once
        # torch.compile (Triton on GPUs, C++ on CPUs): compiled once per input shape; every
        # tile reads the same window shape, so a run compiles once, in its warm-up call; the
        # compiled module is kept for later runs of the same network in this process.
        self._network: Any = self.dense
        self._compiled_key: CompiledKey | None = None
        if options.compile:
            mode = options.compile if isinstance(options.compile, str) else DEFAULT_COMPILE_MODE
            self._network, self._compiled_key = compiled_network(
                self.dense, self.device, self.precision, mode
            )
        # Windows travel as stored (uint8: a quarter of float32's bytes), become float32 on
        # the device (napari_dense.run._transfer).
        self._stored_dtype = np.dtype(source.array.dtype)
        self._read_dtype = transfer_dtype(self._stored_dtype)
        self._pipeline: TransferPipeline | None = None
        self.first_call_seconds: float | None = None
        tile = options.tile or auto_tile_size(self.dense, self.device, options.memory_budget)
        self.plan: TilePlan = plan_tiles(
            source.plane_shape, tile, self.dense.patch_size, self.dense.period, options.border
        )
        self._split_side: int | None = None  # set after an out-of-memory error
        self._normalise = _normaliser(setup, self.device)
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
            y0, y1 = int(valid_rows.min()), int(valid_rows.max()) + 1
            box = (y0, y1, int(valid_cols.min()), int(valid_cols.max()) + 1)
            raise unreadable_error(self.source.array, leading, box, self.source.path, err) from err
        if window.dtype.kind != "f":
            return window  # integers hold no NaN
        plane = f" of plane {leading}" if leading else ""
        where = f"the input of tile {tile.box}{plane}"
        return handle_non_finite(window, self.options.non_finite, where)

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
        dense = self.dense
        interpolation = self.options.interpolation
        out = upsample_lattice(
            samples.float(), dense.output_stride, shape, interpolation, dense.sample_pattern
        )
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


def _describe(source: ImageSource) -> str:
    return f"the image {source.path}" if source.path else "the image"


def _normaliser(setup: ClassifierSetup, device: torch.device) -> Callable[[Any], Any]:
    """The setup's normalisation on ``device`` (:func:`napari_dense.io.image.scale_shift`)."""
    constants = normalisation_constants(setup.normalisation, setup.dense.in_channels)
    if constants is None:
        return lambda x: x
    scale, mean, std = constants
    mean_t, std_t = (torch.as_tensor(v, device=device) for v in (mean, std))
    return lambda x: scale_shift(x, scale, mean_t, std_t)
