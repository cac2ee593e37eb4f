"""The "Dense inference" dock widget: load a classifier, choose layers to densify, run live.

A thin front end: the engine's generator (:func:`napari_dense.to_zarr.iter_into_store`) runs in a
napari ``thread_worker``; each yielded tile refreshes the overlay (throttled) and the progress.
"""

from __future__ import annotations

import json
import tempfile
import time
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import napari
import numpy as np
import torch
from magicgui.widgets import (
    ComboBox,
    Container,
    FileEdit,
    Label,
    LineEdit,
    ProgressBar,
    PushButton,
    RadioButtons,
    SpinBox,
    create_widget,
)
from napari.qt.threading import GeneratorWorker, create_worker
from napari.utils import progress
from napari.utils.notifications import show_error, show_info

from ._workers import reporting_errors
from .convert import explain
from .errors import NapariDenseError
from .estimate import estimate_run
from .model_files import LoadedClassifier, load_classifier
from .plan import SAMPLINGS
from .to_zarr import iter_into_store, prepare_run

__all__ = ["DenseInferenceWidget", "dense_widget_of"]

#: Class colours of the overlay, in class order (additive blending on a dark or RGB image).
CLASS_COLORMAPS = ("magenta", "green", "cyan", "yellow", "red", "blue", "bop orange", "gray")
PRESETS = ("Simple", "Advanced", "Custom")
SAMPLING_HELP = (
    "none: kept strided (cheapest; pixels between samples are interpolated) · "
    "checkered: half of the phases · all: every phase (exact)"
)
REFRESH_SECONDS = 0.25  # throttle of the overlay refresh during a run

_WIDGETS: weakref.WeakKeyDictionary[Any, DenseInferenceWidget] = weakref.WeakKeyDictionary()


def dense_widget_of(viewer: napari.viewer.Viewer) -> DenseInferenceWidget:
    """The viewer's Dense inference widget, docked first if needed (reader, Compare panel)."""
    widget = _WIDGETS.get(viewer)
    if widget is None:
        _, widget = viewer.window.add_plugin_dock_widget("napari-dense", "Dense inference")
    return widget


def device_choices() -> list[str]:
    """``auto``, each CUDA device, MPS where present, ``cpu``."""
    choices = ["auto"]
    choices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        choices.append("mps")
    return [*choices, "cpu"]


class DenseInferenceWidget(Container):
    """Dense inference over a napari image layer, tile by tile, with a live overlay."""

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(scrollable=False)
        self._viewer = viewer
        _WIDGETS[viewer] = self
        self._loaded: Any = None
        self._worker: GeneratorWorker | None = None
        self._store: Any = None
        self._output_layers: list[Any] = []
        self._last_refresh = 0.0
        self._updating = False
        self._activity: progress | None = None
        self._tiles_done = self._tiles_shown = 0
        self._measured_rate: dict[str, float] = {}

        self._image = create_widget(annotation="napari.layers.Image", label="image")
        self._model_file = FileEdit(label="model", filter="*.pt2 *.yaml *.yml", mode="r")
        self._model_info = Label(label="", value="drop a .pt2 model on the viewer or pick one")
        self._preset = RadioButtons(
            label="mode", choices=PRESETS, value="Advanced", orientation="horizontal"
        )
        self._switches = Container(label="densify", layout="vertical", labels=False)
        self._layer_switches: dict[str, ComboBox] = {}
        self._ties: dict[str, tuple[str, ...]] = {}
        self._estimate = Label(label="estimate", value="")
        self._device = ComboBox(label="device", choices=device_choices(), value="auto")
        self._precision = ComboBox(label="precision", choices=["float32", "bfloat16", "float16"])
        self._tile = SpinBox(label="tile (0 = auto)", value=0, min=0, max=16384, step=64)
        self._class = ComboBox(label="show class", choices=["all"], value="all")
        self._normalisation = LineEdit(label="normalisation", value="")
        self._output = FileEdit(label="output (.zarr)", mode="w", filter="*.zarr", value="")
        self._run_button = PushButton(text="Run")
        self._cancel_button = PushButton(text="Cancel", enabled=False)
        self._bar = ProgressBar(label="progress", value=0, min=0, max=1)
        self._status = Label(label="", value="")
        self.extend(
            [
                self._image,
                self._model_file,
                self._model_info,
                self._preset,
                self._switches,
                self._estimate,
                self._device,
                self._precision,
                self._tile,
                self._class,
                self._normalisation,
                self._output,
                Container(
                    widgets=[self._run_button, self._cancel_button],
                    layout="horizontal",
                    labels=False,
                ),
                self._bar,
                self._status,
            ]
        )

        self._model_file.changed.connect(lambda path: self.load_model(path))
        self._preset.changed.connect(self._apply_preset)
        self._image.changed.connect(self._update_estimate)
        self._device.changed.connect(self._update_estimate)
        self._tile.changed.connect(self._update_estimate)
        self._class.changed.connect(self._show_class)
        self._run_button.changed.connect(self.run)
        self._cancel_button.changed.connect(self.cancel)
        viewer.layers.events.inserted.connect(self._image.reset_choices)
        viewer.layers.events.removed.connect(self._image.reset_choices)

    # -- model and layer choice ----------------------------------------------------------------

    def load_model(self, path: str | Path) -> None:
        """Load a model file (also what dropping it on the viewer does)."""
        path = Path(path)
        if not path.is_file():
            return
        try:
            loaded = load_classifier(path)
            plan = explain(loaded.module, loaded.metadata.patch_size)
        except (NapariDenseError, OSError, ValueError) as err:
            show_error(f"napari-dense: {err}")
            return
        self._loaded = loaded
        meta = loaded.metadata
        if Path(str(self._model_file.value)) != path:
            with self._model_file.changed.blocked():
                self._model_file.value = path
        exactness = "exact" if plan.exact else "NOT exact: " + "; ".join(plan.inexact_reasons)
        self._model_info.value = (
            f"{meta.name or path.stem}: patch {meta.patch_size[0]}x{meta.patch_size[1]}, "
            f"{meta.in_channels} channel(s), classes {', '.join(meta.class_names)} · {exactness}"
        )
        self._normalisation.value = json.dumps(meta.normalisation) if meta.normalisation else ""
        self._class.choices = ["all", *meta.class_names]
        self._switches.clear()
        self._layer_switches = {}
        self._ties = {layer.name: layer.tied_with for layer in plan.layers}
        for layer in plan.layers:
            choice = ComboBox(choices=SAMPLINGS, value="all", tooltip=SAMPLING_HELP)
            choice.max_width = 105  # the name and cost keep the rest of the row
            choice.changed.connect(lambda value, name=layer.name: self._on_switch(name, value))
            self._layer_switches[layer.name] = choice
            description = Label(
                value=f"{layer.name}: {layer.op} {layer.kernel[0]}x{layer.kernel[1]} "
                f"/{layer.stride[0]} (all: +{layer.added_macs_per_pixel / 1e3:.0f}k MAC/px)"
            )
            row = Container(widgets=[choice, description], layout="horizontal", labels=False)
            row.margins = (0, 0, 0, 0)
            self._switches.append(row)
        self._apply_preset(self._preset.value)

    def normalisation(self) -> dict[str, Any] | None:
        """The normalisation field as a dict (None when empty); ValueError naming the fix."""
        text = self._normalisation.value.strip()
        if not text:
            return None
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"normalisation is not valid JSON ({err.msg}); e.g. "
                '{"scale": 0.0039, "mean": [0.5], "std": [0.25]}'
            ) from None
        if not isinstance(value, dict):
            raise ValueError('normalisation must be a JSON object like {"scale": 0.0039}')
        return value

    def run_inputs(self) -> tuple[Any, LoadedClassifier, dict[str, Any] | None] | None:
        """``(image layer, loaded model, normalisation)`` for a run, or None after telling the
        user what is missing (the Compare panel's views start from these too)."""
        if self._image.value is None or self._loaded is None:
            show_error("napari-dense: choose an image layer and load a model in Dense inference")
            return None
        try:
            normalisation = self.normalisation()
        except ValueError as err:
            show_error(f"napari-dense: {err}")
            return None
        return self._image.value, self._loaded, normalisation

    def sampling(self) -> dict[str, str]:
        """The current per-layer sampling ``{layer: "none" | "checkered" | "all"}``.

        Every striding layer of the loaded model, in plan order (empty without a model): a
        ``sampling`` mapping for :func:`napari_dense.densify` and ``predict(mode=...)``.
        """
        return {name: choice.value for name, choice in self._layer_switches.items()}

    def apply_sampling(self, mapping: Mapping[str, str]) -> None:
        """Set the layer switches from a sampling mapping (the Frontier view's "Use this setting").

        Layers the mapping does not name are set to ``"none"``, as :func:`napari_dense.densify`
        reads them. The preset becomes Simple or Advanced when the mapping is one of theirs,
        Custom otherwise.

        Raises
        ------
        ValueError
            A name that is no striding layer of the loaded model, or a value not in
            ``("none", "checkered", "all")``.
        """
        unknown = sorted(set(mapping) - set(self._layer_switches))
        if unknown:
            raise ValueError(
                f"no striding layer named {', '.join(map(repr, unknown))} in the loaded model "
                f"(its layers: {', '.join(self._layer_switches) or 'none: load a model first'})"
            )
        invalid = sorted({str(value) for value in mapping.values()} - set(SAMPLINGS))
        if invalid:
            raise ValueError(
                f"sampling must be one of {', '.join(SAMPLINGS)}, not {', '.join(invalid)}"
            )
        for name, choice in self._layer_switches.items():
            with choice.changed.blocked():
                choice.value = mapping.get(name, "none")
        self._sync_preset()

    def _apply_preset(self, preset: str) -> None:
        if preset == "Custom":
            return
        for choice in self._layer_switches.values():
            with choice.changed.blocked():
                choice.value = "all" if preset == "Advanced" else "none"
        self._update_estimate()

    def _on_switch(self, name: str, value: str) -> None:
        # Tied layers (joined branches) must share one lattice: they follow the one touched.
        for other in self._ties.get(name, ()):
            choice = self._layer_switches.get(other)
            if choice is not None:
                with choice.changed.blocked():
                    choice.value = value
        self._sync_preset()

    def _sync_preset(self) -> None:
        values = set(self.sampling().values())
        preset = "Advanced" if values <= {"all"} else "Simple" if values == {"none"} else "Custom"
        with self._preset.changed.blocked():
            self._preset.value = preset
        self._update_estimate()

    def _update_estimate(self, _: Any = None) -> None:
        layer = self._image.value
        if self._loaded is None or layer is None:
            self._estimate.value = ""
            return
        try:
            plan = explain(
                self._loaded.module, self._loaded.metadata.patch_size, sampling=self.sampling()
            )
        except (NapariDenseError, ValueError) as err:  # a sampling this version cannot build
            self._estimate.value = str(err)
            return
        shape = _image_data(layer).shape
        height, width = (shape[-3], shape[-2]) if layer.rgb else (shape[-2], shape[-1])
        tile = self._tile.value or 1024
        device = self._device.value.split(":")[0]
        device = "cuda" if device == "auto" and torch.cuda.is_available() else device
        device = "cpu" if device == "auto" else device
        estimate = estimate_run(
            plan,
            height * width,
            min(tile * tile, height * width),
            device,
            self._measured_rate.get(device),
        )
        self._estimate.value = estimate.describe()

    # -- running -------------------------------------------------------------------------------

    def run(self, _: Any = None) -> GeneratorWorker | None:
        """Start a run in a worker thread; returns the worker (tests wait on it)."""
        inputs = self.run_inputs()
        if inputs is None:
            return None
        layer, loaded, normalisation = inputs
        output = str(self._output.value or "").strip()
        if output in ("", "."):
            output = tempfile.mkdtemp(prefix="napari-dense-") + "/probabilities.zarr"
        try:
            predictor, store = prepare_run(
                _image_data(layer),
                loaded,
                output,
                mode=self.sampling(),
                channel_axis=-1 if layer.rgb else None,
                device=self._device.value,
                precision=self._precision.value,
                tile=self._tile.value or None,
                normalisation=normalisation,
            )
        except (NapariDenseError, OSError, ValueError) as err:
            show_error(f"napari-dense: {err}")
            return None
        self._store = store
        self._add_output_layers(layer, store)
        centre = _field_of_view_centre(self._viewer, layer)
        tasks = predictor.tasks(centre)
        self._bar.max, self._bar.value = len(tasks), 0
        self._run_started = time.perf_counter()
        self._run_megapixels = 0.0
        self._run_device = predictor.device.type
        self._run_macs_per_pixel = predictor.dense.plan.macs_per_pixel
        self._tiles_done = self._tiles_shown = 0
        self._activity = progress(total=len(tasks), desc="napari-dense")  # activity dock
        worker = create_worker(
            reporting_errors,
            iter_into_store(predictor, store, tasks),
            _start_thread=False,
            _ignore_errors=True,  # shown as a notification (_on_error), not raised in the loop
        )
        worker.yielded.connect(self._on_tile)
        worker.errored.connect(self._on_error)
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self._set_running(True)
        self._status.value = f"running on {predictor.device} · {len(tasks)} tiles"
        worker.start()
        return worker

    def cancel(self, _: Any = None) -> None:
        """Stop after the current tile; computed tiles stay in the store and on screen."""
        if self._worker is not None:
            self._worker.quit()
            self._status.value = "cancelling after the current tile…"

    def _add_output_layers(self, source_layer: Any, store: Any) -> None:
        for old in self._output_layers:
            if old in self._viewer.layers:
                self._viewer.layers.remove(old)
        # One layer per class, reading the store on each refresh: tiles appear as they land.
        channel_axis = store.axes.index("c")
        self._output_layers = [
            self._viewer.add_image(
                StoreClassView(store.array, channel_axis, k),
                name=f"{name} (napari-dense)",
                colormap=CLASS_COLORMAPS[k % len(CLASS_COLORMAPS)],
                blending="additive",
                contrast_limits=[0, 255 if store.dtype == np.uint8 else 1],
                scale=source_layer.scale[-2:],
                translate=source_layer.translate[-2:],
                cache=False,
                metadata={"napari_dense": {"store": str(store.path), "class": name}},
            )
            for k, name in enumerate(store.class_names)
        ]
        self._show_class(self._class.value)

    def _show_class(self, name: str) -> None:
        # "all" shows every class but background, which would cover the image.
        for layer in self._output_layers:
            class_name = layer.metadata["napari_dense"]["class"]
            layer.visible = class_name == name or (name == "all" and class_name != "background")

    def _on_tile(self, result: Any) -> None:
        self._tiles_done = result.index + 1
        self._run_megapixels += result.tile.shape[0] * result.tile.shape[1] / 1e6
        now = time.perf_counter()
        last = self._tiles_done == result.total
        # Throttled, and never re-entered: redrawing may process events, delivering the next
        # tile's signal inside this one (deep recursion on fast runs).
        if self._updating or (now - self._last_refresh < REFRESH_SECONDS and not last):
            return
        self._updating, self._last_refresh = True, now
        try:
            elapsed = now - self._run_started
            rate = self._run_megapixels / max(elapsed, 1e-9)
            remaining = (result.total - self._tiles_done) * elapsed / self._tiles_done
            self._bar.value = self._tiles_done
            self._status.value = (
                f"tile {self._tiles_done}/{result.total} · {rate:.2f} Mpx/s · ETA {remaining:.0f} s"
            )
            activity = self._activity  # the activity dock may process events: keep our handle
            if activity is not None:
                activity.update(self._tiles_done - self._tiles_shown)
                self._tiles_shown = self._tiles_done
                activity.set_description(f"napari-dense {rate:.2f} Mpx/s")
            for layer in self._output_layers:
                layer.refresh()
        finally:
            self._updating = False

    def _on_error(self, error: BaseException) -> None:
        show_error(f"napari-dense: {error}")

    def _on_finished(self) -> None:
        elapsed = time.perf_counter() - self._run_started
        if self._run_megapixels:
            self._measured_rate[self._run_device] = (
                self._run_macs_per_pixel * self._run_megapixels * 1e6 / max(elapsed, 1e-9)
            )
        store, worker = self._store, self._worker
        complete = (
            worker is not None
            and not worker.abort_requested
            and len(store.completed_tiles()) == self._bar.max
        )
        if complete:
            store.finalize(attributes={"complete": True, "seconds": round(elapsed, 3)})
            self._status.value = f"done in {elapsed:.1f} s · {store.path}"
            show_info(f"napari-dense: probability map written to {store.path}")
        else:
            self._status.value = (
                f"stopped: {len(store.completed_tiles())} tiles kept in {store.path}"
            )
        self._bar.value = self._tiles_done
        for layer in self._output_layers:
            layer.refresh()
        if self._activity is not None:
            self._activity.close()
            self._activity = None
        self._worker = None
        self._set_running(False)

    def _set_running(self, running: bool) -> None:
        self._run_button.enabled = not running
        self._cancel_button.enabled = running


class StoreClassView:
    """One class of a probability store, read from disk on each access (no copy, no dask).

    The overlay shows tiles as they land: napari re-reads the visible region on ``refresh()``.
    """

    def __init__(self, array: Any, channel_axis: int, index: int):
        self._array, self._axis, self._index = array, channel_axis, index
        shape = list(array.shape)
        del shape[channel_axis]
        self.shape = tuple(shape)
        self.dtype = array.dtype
        self.ndim = len(self.shape)
        self.size = int(np.prod(self.shape))

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        if any(k is Ellipsis for k in key):
            at = next(i for i, k in enumerate(key) if k is Ellipsis)
            key = key[:at] + (slice(None),) * (self.ndim - len(key) + 1) + key[at + 1 :]
        key = key + (slice(None),) * (self.ndim - len(key))
        full = (*key[: self._axis], self._index, *key[self._axis :])
        return np.asarray(self._array[full])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        data = self[...]
        return data if dtype is None else data.astype(dtype)


def _image_data(layer: Any) -> Any:
    """Highest-resolution data of an image layer (multiscale: level 0)."""
    return layer.data[0] if layer.multiscale else layer.data


def _field_of_view_centre(viewer: Any, layer: Any) -> tuple[float, float] | None:
    """The camera centre in the layer's pixel coordinates (y, x)."""
    try:
        centre = layer.world_to_data(viewer.scene.camera.center)
    except Exception:  # a camera/layer dimensionality mismatch: no preference
        return None
    values = np.asarray(centre, dtype=float)  # RGB layers: the channel is not a data dim
    return float(values[-2]), float(values[-1])


def _visible_box(layer: Any, height: int, width: int) -> tuple[int, int, int, int]:
    """``(y0, y1, x0, x1)`` of the layer's pixels in the field of view (at least 64 a side)."""
    # napari keeps the displayed data corners of each layer up to date while drawing.
    (y0, x0), (y1, x1) = np.asarray(layer.corner_pixels, dtype=int)[:, -2:]
    y0, x0 = max(min(y0, height - 64), 0), max(min(x0, width - 64), 0)
    y1, x1 = min(max(y1, y0 + 64), height), min(max(x1, x0 + 64), width)
    return int(y0), int(y1), int(x0), int(x1)
