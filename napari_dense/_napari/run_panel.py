"""The run half of the Dense inference widget: outputs, the worker, the live overlay, progress.

Nothing heavy runs on the GUI thread: the worker (:func:`napari_dense._napari.live_run.live_run`)
converts the model, plans the tiles and creates the store, then computes tiles nearest the view.
The GUI thread adds the multiscale class layers (:class:`napari_dense._napari.overlay.LiveOverlay`)
when the worker says the store exists (one per event-loop turn, the shown ones first; the
previous run's layers are reused), and a timer refreshes them, throttled, only when a new
tile is in view. Closing the widget cancels its run; removing its input layer cancels it with a
message.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path
from typing import Any

from napari.qt.threading import GeneratorWorker, create_worker
from napari.utils import progress
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QTimer

from napari_dense._napari import output_dialog as _output_dialog
from napari_dense._napari.layers import field_of_view_centre, image_data, level_transform
from napari_dense._napari.live_run import Prepared, ViewFollower, live_run, run_scheduler
from napari_dense._napari.overlay import LiveOverlay
from napari_dense._napari.reader import remember_map_reader
from napari_dense._napari.workers import reporting_errors
from napari_dense.evaluate.estimate import gui_tile_size
from napari_dense.run.to_zarr import prepare_run

__all__ = ["REFRESH_MS", "RunPanel"]

REFRESH_MS = 1000  # throttle of the overlay refresh and the progress line during a run
#: Most of the GUI thread's time the overlay's refreshes may take: after a refresh that took
#: ``t``, the next waits at least ``t / REFRESH_SHARE`` (slow machines refresh less often).
REFRESH_SHARE = 0.15


class RunPanel:
    """Mixed into :class:`~napari_dense._napari.widget.DenseInferenceWidget` (the controls)."""

    _viewer: Any
    _status: Any
    _bar: Any

    def __init__(self) -> None:
        self._worker: GeneratorWorker | None = None
        self._generator: Any = None
        self._store: Any = None
        self._overlay: LiveOverlay | None = None
        self._input_layer: Any = None
        self._follower = ViewFollower()
        self._activity: progress | None = None
        self._measured_rate: dict[str, float] = {}
        self._tiles_done = self._tiles_total = self._tiles_shown = 0
        self._run_started = self._first_tile = self._prepared_at = 0.0
        self._computed = 0
        self._adding_layers = False
        self._cancel_reason = ""
        self._deferred: list[Any] = []
        self._input_level = 0
        self._run_device, self._run_macs_per_pixel = "cpu", 0.0
        self._run_megapixels = 0.0
        self._next_refresh = 0.0
        # The bar's own text would make Qt repaint the window synchronously on each value
        # (the canvas included, in the refresh's event-loop turn); the status line says it.
        self._bar.native.setTextVisible(False)
        self._timer = QTimer()
        self._timer.setInterval(REFRESH_MS)
        self._timer.timeout.connect(self._refresh)
        self._viewer.layers.events.removed.connect(self._on_layer_removed)
        self._viewer.scene.camera.events.center.connect(self._follow_view)
        self._closed = False
        # Qt deletes a widget's children before it announces its own end: listen to a child too.
        for native in (self.native, self._status.native):  # type: ignore[attr-defined]
            native.destroyed.connect(functools.partial(_cancel_on_close, self._on_closed))

    @property
    def _output_layers(self) -> list[Any]:
        return [] if self._overlay is None else self._overlay.layers

    # -- scripting surface ---------------------------------------------------------------------

    def run(self, _: Any = None) -> GeneratorWorker | None:
        """Start a run in a worker thread; returns the napari worker (None when refused).

        Without an output path the map goes to this session's cache folder (removed at exit).
        An existing output asks Resume / Overwrite / Choose another.
        """
        if self._worker is not None:
            show_error("napari-dense: a run is in progress; cancel it first")
            return None
        inputs = self.run_inputs()  # type: ignore[attr-defined]
        if inputs is None:
            return None
        layer, loaded, normalisation = inputs
        level = self.input_level()  # type: ignore[attr-defined]
        decision = self._output_decision(layer, loaded)
        if decision is None:
            return None
        output, overwrite, resume = decision
        self._store = None  # the previous run's layers stay until this run's reuse them
        # Latency-sized tiles (first tile and Cancel within ~1 s); a resume keeps the store's.
        tile = self._tile.value or None  # type: ignore[attr-defined]
        options = self._run_settings(  # type: ignore[attr-defined]
            layer, loaded, normalisation, tile if resume else gui_tile_size(tile)
        )
        prepare = functools.partial(
            prepare_run,
            image_data(layer, level),
            loaded,
            output,
            options=options,
            overwrite=overwrite,
            resume=resume,
            pyramid_levels="auto",  # filled as tiles land: the overlay is multiscale
            space=_layer_space(layer, level),  # the store carries the layer's world transform
        )
        self._input_layer, self._input_level = layer, level
        self._follower.set(field_of_view_centre(self._viewer, layer, level))
        scheduler = run_scheduler(self._device.value)  # type: ignore[attr-defined]
        self._generator = reporting_errors(live_run(prepare, self._follower, scheduler))
        worker = create_worker(
            _passthrough,
            self._generator,
            _start_thread=False,
            _ignore_errors=True,  # shown as a notification (_on_error), not raised in the loop
        )
        worker.yielded.connect(self._on_yield)
        worker.errored.connect(self._on_error)
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self._tiles_done = self._tiles_shown = self._tiles_total = 0
        self._run_megapixels, self._first_tile, self._next_refresh = 0.0, 0.0, 0.0
        self._run_started = time.perf_counter()
        self._cancel_reason = ""
        self._set_running(True)
        self._status.value = "preparing (converting the model, planning tiles)…"
        worker.start()
        return worker

    def cancel(self, _: Any = None) -> None:
        """Stop after the current tile; computed tiles stay in the store and on screen."""
        if self._worker is not None:
            self._worker.quit()
            self._status.value = "cancelling after the current tile…"

    # -- outputs -------------------------------------------------------------------------------

    def _output_decision(self, layer: Any, loaded: Any) -> tuple[Path, bool, bool] | None:
        """``(path, overwrite, resume)`` for the run, asking when the output exists."""
        text = str(self._output.value or "").strip()  # type: ignore[attr-defined]
        if text in ("", ".", os.getcwd()):  # an empty field (magicgui may make it the cwd)
            mode = self.mode()  # type: ignore[attr-defined]
            label = (
                mode
                if isinstance(mode, str)
                else "custom-" + "".join(value[0] for value in mode.values())
            )
            path = _output_dialog.cache_output(layer.name, Path(str(loaded.path)).stem, label)
        else:
            path = Path(text)
        while path.exists():
            answer = _output_dialog.ask_existing_output(path, self.native)  # type: ignore[attr-defined]
            if answer == "resume":
                return path, False, True
            if answer == "overwrite":
                return path, True, False
            if answer != "choose":
                return None
            chosen = _output_dialog.choose_output(path, self.native)  # type: ignore[attr-defined]
            if chosen is None:
                return None
            path = chosen
            with self._output.changed.blocked():  # type: ignore[attr-defined]
                self._output.value = path  # type: ignore[attr-defined]
        return path, False, False

    # -- worker events (GUI thread) ------------------------------------------------------------

    def _on_yield(self, item: Any) -> None:
        if self._gone():
            return
        if self._adding_layers:  # adding layers processes events: keep the order of events
            self._deferred.append(functools.partial(self._on_yield, item))
            return
        if isinstance(item, Prepared):
            self._adding_layers = True
            try:
                self._on_prepared(item)
            finally:
                self._adding_layers = False
                deferred, self._deferred = self._deferred, []
                for call in deferred:
                    call()
            return
        self._tiles_done += 1
        self._computed += 1
        self._run_megapixels += item.tile.shape[0] * item.tile.shape[1] / 1e6
        if self._overlay is not None:
            self._overlay.tile_landed(item.leading, item.tile.box)
        if not self._first_tile:
            self._first_tile = time.perf_counter()
            self._refresh()  # the first tile at once, then throttled

    def _on_prepared(self, prepared: Prepared) -> None:
        self._store = prepared.store
        self._prepared_at, self._computed = time.perf_counter(), 0
        space = prepared.store.level_space(0)  # the input level's transform, as stored
        # The previous run's layers are reused; new ones are added one per event-loop turn.
        self._overlay = LiveOverlay(
            self._viewer,
            prepared.store,
            space.scale,
            space.translation,
            space.units,
            shown=self._class.value,  # type: ignore[attr-defined]
            reuse=self._overlay,
        )
        if self._gone():  # closed meanwhile (reusing layers may process events)
            self._overlay.stop()
            return
        self._tiles_total = prepared.total
        self._tiles_done = self._tiles_shown = prepared.done
        self._run_device = prepared.predictor.device.type
        self._run_macs_per_pixel = prepared.predictor.dense.plan.macs_per_pixel
        self._bar.max, self._bar.value = max(prepared.total, 1), prepared.done
        self._status.value = f"running on {prepared.predictor.device} · {prepared.total} tiles" + (
            f" ({prepared.done} already done)" if prepared.done else ""
        )
        self._timer.start()
        # Last: napari's activity dock processes events (the widget may be closed meanwhile).
        self._activity = progress(total=prepared.total, desc="napari-dense")
        self._activity.update(prepared.done)

    def _refresh(self) -> None:
        if self._gone():
            return
        now = time.perf_counter()
        if self._overlay is not None and now >= self._next_refresh:
            if self._overlay.refresh():
                spent = time.perf_counter() - now
                self._next_refresh = now + spent / REFRESH_SHARE
        if not self._tiles_total:
            return
        new = self._tiles_done - self._tiles_shown
        if new <= 0:
            return
        elapsed = time.perf_counter() - self._prepared_at  # measured: replaces the estimate
        rate = self._run_megapixels / max(elapsed, 1e-9)
        remaining = (self._tiles_total - self._tiles_done) * elapsed / max(self._computed, 1)
        self._bar.value = self._tiles_done
        self._bar.native.update()  # painted with the next frame, not now
        self._status.value = (
            f"tile {self._tiles_done}/{self._tiles_total} · {rate:.2f} Mpx/s · "
            f"ETA {remaining:.0f} s"
        )
        activity = self._activity
        if activity is not None:
            activity.update(new)
            activity.set_description(f"napari-dense {rate:.2f} Mpx/s")
        self._tiles_shown = self._tiles_done

    def _on_error(self, error: BaseException) -> None:
        show_error(f"napari-dense: {error}")

    def _on_finished(self) -> None:
        if self._adding_layers:
            self._deferred.append(self._on_finished)
            return
        self._timer.stop()
        if self._gone():  # no controls left to update
            self._close_generator()
            self._worker = None
            if self._activity is not None:
                self._activity.close()
                self._activity = None
            return
        elapsed = time.perf_counter() - self._run_started
        store = self._store
        self._close_generator()
        try:
            if self._run_megapixels and store is not None:
                computing = time.perf_counter() - self._prepared_at
                self._measured_rate[self._run_device] = (
                    self._run_macs_per_pixel * self._run_megapixels * 1e6 / max(computing, 1e-9)
                )
            if store is not None:
                if not _output_dialog.in_session_cache(store.path):
                    # Dragged back in, the user's map opens with napari-dense, no reader chooser.
                    remember_map_reader(store.path)
                kept = len(store.completed_tiles())
                if store.is_complete():  # finalized by the worker
                    self._status.value = f"done in {elapsed:.1f} s · {store.path}"
                    show_info(f"napari-dense: probability map written to {store.path}")
                elif self._cancel_reason:
                    self._status.value = self._cancel_reason
                else:
                    self._status.value = f"stopped: {kept} tiles kept in {store.path}"
                self._bar.value = kept
            elif not self._cancel_reason:
                self._status.value = "not started (see the message)"
            if self._overlay is not None:
                self._overlay.complete()  # a quick run may end before the hidden ones came
                self._overlay.refresh(force=True)
        finally:  # the widget is usable again, whatever happened to the store meanwhile
            if self._activity is not None:
                self._activity.close()
                self._activity = None
            self._worker = None
            self._set_running(False)

    def _close_generator(self) -> None:
        generator, self._generator = self._generator, None
        if generator is not None:
            try:
                generator.close()  # superqt stops a cancelled generator without closing it
            except Exception:  # already finished with an error (reported)
                pass

    # -- the viewer around the run ---------------------------------------------------------------

    def _follow_view(self, _: Any = None) -> None:
        if self._worker is not None and self._input_layer is not None:
            self._follower.set(
                field_of_view_centre(self._viewer, self._input_layer, self._input_level)
            )

    def _on_layer_removed(self, event: Any) -> None:
        if self._worker is not None and event.value is self._input_layer:
            self._worker.quit()
            self._cancel_reason = "cancelled: the input layer was removed"
            self._status.value = self._cancel_reason
            show_warning(
                f"napari-dense: the run was cancelled because its input layer "
                f"{event.value.name!r} was removed; computed tiles are kept in {self._store_path()}"
            )

    def _show_class(self, name: str) -> None:
        if self._overlay is not None:
            self._overlay.show(name)

    def _store_path(self) -> str:
        return str(self._store.path) if self._store is not None else "the output"

    def _gone(self) -> bool:
        """Whether the widget was closed (then the run is cancelled and no control touched)."""
        if not self._closed:
            try:
                self._status.native.objectName()
            except RuntimeError:  # its Qt object was deleted
                self._on_closed()
        return self._closed

    def _on_closed(self) -> None:
        """The widget was closed (its Qt side is gone): cancel the run, touch no control."""
        if self._closed:
            return
        self._closed = True
        try:
            self._timer.stop()
            if self._overlay is not None:
                self._overlay.stop()
        except RuntimeError:  # the timers went with the application
            pass
        if self._worker is not None:
            self._worker.quit()

    def _set_running(self, running: bool) -> None:
        self._run_button.enabled = not running  # type: ignore[attr-defined]
        self._cancel_button.enabled = running  # type: ignore[attr-defined]


def _layer_space(layer: Any, level: int) -> dict[str, Any]:
    """``scale``, ``translate`` and ``units`` of the ``(y, x)`` pixels of ``level`` of ``layer``."""
    scale, translate = level_transform(layer, level)
    units = tuple(getattr(layer, "units", None) or (None, None))[-2:]
    return {"scale": tuple(scale), "translate": tuple(translate), "units": units}


def _passthrough(generator: Any) -> Any:
    """A generator function over ``generator`` (what superqt needs for a generator worker)."""
    return (yield from generator)


def _cancel_on_close(stop: Any, *_: Any) -> None:
    """Closing (destroying) the widget cancels its run."""
    stop()
