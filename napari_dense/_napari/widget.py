"""The "Dense inference" dock widget: load a classifier, choose layers to densify, run live.

Scripting surface (stable): ``DenseInferenceWidget.load_model(path)``, ``run()`` (returns the
napari worker, or None when refused), ``cancel()``, ``sampling()`` and ``apply_sampling()``.
The run itself (worker, overlay, outputs) is in :mod:`napari_dense._napari.run_panel`; this module
builds the controls and keeps the estimate.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import napari
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
)
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error

from napari_dense import model_files
from napari_dense._napari import output_dialog as _output_dialog
from napari_dense._napari.layers import image_data, input_layers, plane_shape
from napari_dense._napari.live_run import run_device
from napari_dense._napari.run_panel import RunPanel
from napari_dense._napari.settings import run_settings
from napari_dense.convert import densify, explain
from napari_dense.convert.plan import SAMPLINGS, DensePlan
from napari_dense.errors import NapariDenseError
from napari_dense.evaluate.estimate import (
    RunEstimate,
    cached_probe,
    estimate_run,
    gui_tile_size,
    known_probe,
    probe_rate,
    probe_tile_rate,
)
from napari_dense.io.sources import open_image
from napari_dense.model_files import LoadedClassifier
from napari_dense.run.options import RunOptions
from napari_dense.run.to_zarr import prepare_run

__all__ = ["DenseInferenceWidget", "dense_widget_of"]

PRESETS = ("Simple", "Advanced", "Custom")
SAMPLING_HELP = (
    "none: kept strided (cheapest; pixels between samples are interpolated) · "
    "checkered: half of the phases · all: every phase (exact)"
)
#: Widest the dock may ask for (labels wrap or elide beyond it, the full text in a tooltip).
DOCK_WIDTH = 420

_WIDGETS: weakref.WeakKeyDictionary[Any, DenseInferenceWidget] = weakref.WeakKeyDictionary()


def dense_widget_of(viewer: napari.viewer.Viewer) -> DenseInferenceWidget:
    """The viewer's Dense inference widget, docked first if needed (reader, Compare panel)."""
    widget = _WIDGETS.get(viewer)
    if widget is None:
        _, widget = viewer.window.add_plugin_dock_widget("napari-dense", "Dense inference")
    return widget


def device_choices() -> list[str]:
    """``auto``, each CUDA device, ``all GPUs`` with two or more, MPS where present, ``cpu``.

    ``all GPUs`` runs over one dask worker per GPU (``--scheduler local-cuda``).
    """
    from napari_dense._napari.live_run import ALL_GPUS, all_gpus_available

    choices = ["auto"]
    choices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if all_gpus_available():
        choices.append(ALL_GPUS)
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        choices.append("mps")
    return [*choices, "cpu"]


def wrapping(label: Label, tooltip: str | None = None, *, wrap: bool = True) -> Label:
    """Let a label wrap (or clip, ``wrap=False``) instead of widening the dock; ``tooltip``
    holds the whole text."""
    from qtpy.QtWidgets import QSizePolicy

    native = label.native
    native.setWordWrap(wrap)
    native.setMinimumWidth(0)
    vertical = QSizePolicy.Policy.Minimum if wrap else QSizePolicy.Policy.Preferred
    native.setSizePolicy(QSizePolicy.Policy.Ignored, vertical)
    if tooltip is not None:
        native.setToolTip(tooltip)
    return label


class DenseInferenceWidget(RunPanel, Container):
    """Dense inference over a napari image layer, tile by tile, with a live overlay."""

    def __init__(self, viewer: napari.viewer.Viewer):
        Container.__init__(self, scrollable=False)
        self._viewer = viewer
        _WIDGETS[viewer] = self
        self._loaded: LoadedClassifier | None = None
        self._plans: dict[tuple[tuple[str, str], ...], DensePlan] = {}
        self._probing: set[Any] = set()  # probe keys being measured (estimate.probe_tile_rate)
        self.last_estimate: RunEstimate | None = None  # what the estimate line says

        self._image = ComboBox(label="image", choices=lambda _: input_layers(viewer))
        self._level = ComboBox(label="level", choices=self._level_choices, visible=False)
        self._model_file = FileEdit(label="model", filter="*.pt2 *.yaml *.yml", mode="r")
        self._model_info = wrapping(
            Label(value="drop a .pt2 model on the viewer or pick one"), wrap=False
        )
        self._preset = RadioButtons(
            label="mode", choices=PRESETS, value="Advanced", orientation="horizontal"
        )
        self._switches = Container(label="densify", layout="vertical", labels=False)
        self._layer_switches: dict[str, ComboBox] = {}
        self._ties: dict[str, tuple[str, ...]] = {}
        self._estimate = wrapping(Label(label="estimate", value=""))
        defaults = run_settings()  # napari › Preferences › Plugins › napari-dense
        devices = device_choices()
        self._device = ComboBox(
            label="device",
            choices=devices,
            value=defaults.device if defaults.device in devices else "auto",
        )
        precisions = ["auto", "float32", "bfloat16", "float16"]
        self._precision = ComboBox(
            label="precision",
            choices=precisions,
            value=defaults.precision if defaults.precision in precisions else "auto",
        )
        self._precision.tooltip = "auto: bfloat16 on CUDA GPUs that support it, else float32"
        self._tile = SpinBox(
            label="tile (0 = auto)", value=max(defaults.tile, 0), min=0, max=16384, step=64
        )
        self._class = ComboBox(label="show class", choices=self._class_choices, value="all")
        self._normalisation = LineEdit(label="normalisation", value="")
        self._output = FileEdit(label="output (.zarr)", mode="w", filter="*.zarr", value="")
        self._run_button = PushButton(text="Run")
        self._cancel_button = PushButton(text="Cancel", enabled=False)
        self._bar = ProgressBar(label="progress", value=0, min=0, max=1)
        self._status = wrapping(Label(label="", value=""))
        self.extend(
            [
                self._image,
                self._level,
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
        self.native.setMaximumWidth(DOCK_WIDTH)
        RunPanel.__init__(self)

        self._model_file.changed.connect(lambda path: self.load_model(path))
        self._preset.changed.connect(self._apply_preset)
        self._image.changed.connect(self._on_image)
        self._level.changed.connect(self._update_estimate)
        self._device.changed.connect(self._update_estimate)
        self._tile.changed.connect(self._update_estimate)
        self._class.changed.connect(self._show_class)
        self._run_button.changed.connect(self.run)
        self._cancel_button.changed.connect(self.cancel)
        viewer.layers.events.inserted.connect(self._layers_changed)
        viewer.layers.events.removed.connect(self._layers_changed)
        self._on_image()

    # -- model and layer choice ----------------------------------------------------------------

    def load_model(self, path: str | Path) -> None:
        """Load a model file (also what dropping it on the viewer does).

        A model built by a Python file (sidecar ``python_file``) runs code: the user is asked
        first, naming the file and its folder; "No" leaves the current model loaded.
        """
        path = Path(path)
        if not path.is_file():
            return
        try:
            loaded = _load_asking(path, self.native)
            if loaded is None:
                return
            plan = explain(loaded.module, loaded.metadata.patch_size)
        except (NapariDenseError, OSError, ValueError) as err:
            show_error(f"napari-dense: {err}")
            return
        self._loaded = loaded
        self._plans = {_key(dict.fromkeys((layer.name for layer in plan.layers), "all")): plan}
        meta = loaded.metadata
        if Path(str(self._model_file.value)) != path:
            with self._model_file.changed.blocked():
                self._model_file.value = path
        exactness = "exact" if plan.exact else "NOT exact (see tooltip)"
        summary = (  # two short lines; the whole text is in the tooltip
            f"{_elide(meta.name or path.stem, 24)}: patch {meta.patch_size[0]}x"
            f"{meta.patch_size[1]}, {meta.in_channels} ch · {exactness}\n"
            f"classes: {_elide(', '.join(meta.class_names), 40)}"
        )
        checked = plan.verified
        if checked is not None and plan.exact:  # the conversion's certificate, in short
            summary += (
                f"\nchecked: max |Δ| {checked.max_abs_diff:.1g} at {checked.positions} positions"
            )
        details = f"{meta.name or path.stem} ({path})\n{summary}"
        if checked is not None:
            details += f"\n\nself-check: {checked.summary()}"
        if not plan.exact:
            details += "\n\n" + "\n".join(plan.inexact_reasons)
        self._model_info.value = summary
        self._model_info.native.setToolTip(details)
        self._normalisation.value = json.dumps(meta.normalisation) if meta.normalisation else ""
        self._class.reset_choices()
        self._switches.clear()
        self._layer_switches = {}
        self._ties = {layer.name: layer.tied_with for layer in plan.layers}
        for layer in plan.layers:
            choice = ComboBox(choices=SAMPLINGS, value="all", tooltip=SAMPLING_HELP)
            choice.min_width = choice.max_width = 105  # the name and cost keep the rest
            choice.changed.connect(lambda value, name=layer.name: self._on_switch(name, value))
            self._layer_switches[layer.name] = choice
            text = (
                f"{layer.name}: {layer.op} {layer.kernel[0]}x{layer.kernel[1]} "
                f"/{layer.stride[0]} (all: +{layer.added_macs_per_pixel / 1e3:.0f}k MAC/px)"
            )
            row = Container(
                widgets=[choice, wrapping(Label(value=text), text, wrap=False)],
                layout="horizontal",
                labels=False,
            )
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
        layer = self._image.value
        try:
            normalisation = self.normalisation()
            # The channel checks of a run, for every view that starts from here (lazy: no read).
            open_image(
                image_data(layer, self.input_level()),
                channels=self._loaded.metadata.in_channels,
                channel_axis=-1 if layer.rgb else None,
            )
        except (ValueError, NapariDenseError) as err:
            show_error(f"napari-dense: {err}")
            return None
        return layer, self._loaded, normalisation

    def input_level(self) -> int:
        """The resolution level of the input a run reads (0 unless the layer is multiscale)."""
        layer = self._image.value
        if layer is None or not layer.multiscale:
            return 0
        return int(self._level.value or 0)

    def sampling(self) -> dict[str, str]:
        """The current per-layer sampling ``{layer: "none" | "checkered" | "all"}``.

        Every striding layer of the loaded model, in plan order (empty without a model): a
        ``sampling`` mapping for :func:`napari_dense.densify` and ``predict(mode=...)``.
        """
        return {name: choice.value for name, choice in self._layer_switches.items()}

    def mode(self) -> str | dict[str, str]:
        """What a run passes as ``mode``: the preset's name, or the per-layer sampling."""
        preset = self._preset.value
        return preset.lower() if preset in ("Simple", "Advanced") else self.sampling()

    def run_options(
        self, layer: Any, loaded: LoadedClassifier, normalisation: dict[str, Any] | None
    ) -> RunOptions:
        """The options every computation of this widget shares (what :meth:`run_inputs` gives):
        the layer's channel axis, the device, the normalisation and the model's activation.

        The Compare panel and the Frontier tab compute with these; a run adds the mode, the
        precision and the tile size.
        """
        return RunOptions(
            channel_axis=-1 if layer.rgb else None,
            device=self.device(),
            normalisation=normalisation,
            activation=loaded.metadata.activation,  # |Δ| in probabilities, as the map stores
        )

    def _run_settings(
        self,
        layer: Any,
        loaded: LoadedClassifier,
        normalisation: dict[str, Any] | None,
        tile: int | None,
    ) -> RunOptions:
        """What a run on ``layer`` computes with: :meth:`run_options` with the mode, the
        precision and ``tile`` (the run itself and the estimate's probe)."""
        return dataclasses.replace(
            self.run_options(layer, loaded, normalisation),
            mode=self.mode(),
            precision=self._precision.value,
            tile=tile,
        )

    def device(self) -> str:
        """The device a computation in this process uses: the device list's choice ("all
        GPUs", which spreads a run over a cluster, plans and compares with ``"auto"``)."""
        return run_device(self._device.value)

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

    def plan(self) -> DensePlan | None:
        """The dense plan of the current sampling, traced once per model and sampling."""
        if self._loaded is None:
            return None
        key = _key(self.sampling())
        if key not in self._plans:
            self._plans[key] = explain(
                self._loaded.module, self._loaded.metadata.patch_size, sampling=self.sampling()
            )
        return self._plans[key]

    def _class_choices(self, _: Any = None) -> list[str]:
        names = list(self._loaded.metadata.class_names) if self._loaded is not None else []
        return ["all", *names]

    def _level_choices(self, _: Any = None) -> list[tuple[str, int]]:
        layer = self._image.value if hasattr(self, "_image") else None
        if layer is None or not layer.multiscale:
            return [("0", 0)]
        return [
            (f"{level}: {h} × {w}", level)
            for level in range(len(layer.data))
            for h, w in [plane_shape(layer, level)]
        ]

    def _layers_changed(self, _: Any = None) -> None:
        self._image.reset_choices()
        self._class.reset_choices()

    def _on_image(self, _: Any = None) -> None:
        layer = self._image.value
        self._level.reset_choices()
        self._level.visible = bool(layer is not None and layer.multiscale)
        self._update_estimate()

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
            plan = self.plan()
        except (NapariDenseError, ValueError) as err:  # a sampling this version cannot build
            self._estimate.value = str(err)
            return
        assert plan is not None
        height, width = plane_shape(layer, self.input_level())
        tile = gui_tile_size(self._tile.value)
        device = self.device().split(":")[0]  # "all GPUs": estimated as one GPU
        device = "cuda" if device == "auto" and torch.cuda.is_available() else device
        device = "cpu" if device == "auto" else device
        measured = self._measured_rate.get(device)  # the last run's, per output pixel
        probed = None if measured else self._probed_rate(layer, device)
        estimate = estimate_run(
            plan, height * width, min(tile * tile, height * width), device, measured or probed
        )
        source = "last run" if measured else "probe" if probed else "probing…"
        self.last_estimate = estimate  # benchmarks compare it with the run
        self._estimate.value = f"{estimate.describe()} ({source})"
        self._estimate.native.setToolTip(estimate.describe())

    def _probed_rate(self, layer: Any, device: str) -> float | None:
        """The probe's rate (output pixels) for this model, sampling, device and image: one
        real tile of the run (:func:`~napari_dense.evaluate.estimate.probe_tile_rate`), measured
        once, in a worker. An image the run would refuse (its error shows on Run) falls back to
        the network alone on a random window."""
        assert self._loaded is not None
        level = self.input_level()
        data = image_data(layer, level)
        key = (self._loaded.sha256, _key(self.sampling()), device, id(data), level)
        rate = known_probe(key)
        if rate is None and key not in self._probing:
            self._probing.add(key)
            loaded, sampling, tile = self._loaded, self.sampling(), gui_tile_size(self._tile.value)
            try:
                normalisation = self.normalisation()
            except ValueError:  # said when the user presses Run
                normalisation = None
            options = self._run_settings(layer, loaded, normalisation, tile)
            prepare = functools.partial(
                prepare_run,
                data,
                loaded,
                options=dataclasses.replace(options, device=device),
                pyramid_levels="auto",  # as a GUI run writes its tiles
            )

            def network_only() -> float:
                dense = densify(loaded.module, loaded.metadata.patch_size, sampling=sampling)
                (ph, pw) = dense.patch_size  # the probe counts windows: per output pixel here
                return probe_rate(dense, device) * tile * tile / ((tile + ph - 1) * (tile + pw - 1))

            def one_tile() -> float:
                try:
                    return probe_tile_rate(lambda path: prepare(output=path))
                except Exception:  # the image or settings a run would refuse (said on Run)
                    return network_only()

            def measure() -> float:
                return cached_probe(key, one_tile)

            worker = create_worker(measure, _ignore_errors=True)
            worker.finished.connect(lambda: self._probing.discard(key))
            worker.returned.connect(lambda _: None if self._gone() else self._update_estimate())
            worker.start()
        return rate


def _elide(text: str, length: int) -> str:
    """``text`` cut to ``length`` characters with an ellipsis (the tooltip has all of it)."""
    return text if len(text) <= length else text[: length - 1] + "…"


def _key(sampling: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(sampling.items()))


def _load_asking(path: Path, parent: Any) -> LoadedClassifier | None:
    """Load a model file; a Python-file model only after the user agreed (None: refused)."""
    try:
        return model_files.load_classifier(path, trust_code=False)
    except model_files.CodeExecutionRefused as err:
        if not _output_dialog.confirm_code_execution(Path(err.path), parent):
            return None
        return model_files.load_classifier(path, trust_code=True)


# Kept importable from here: the Compare panel and the Frontier view use them.
_image_data = image_data
