"""napari readers: model files (load them into the widget) and probability maps (reopen them).

Drop a model file (``.pt2`` or its sidecar ``.yaml``) on the viewer: it is loaded, no layer added.

The reader itself runs nothing from the file: :func:`get_reader` only looks at the name (and,
for YAML, at the text), and the loading is the Dense inference widget's
``load_model(path)``, which calls :func:`napari_dense.load_classifier` with
``trust_code=False``. A ``.pt2`` is checked before torch reads it (a refused one is reported,
nothing is loaded); a sidecar naming a ``python_file`` raises
:class:`~napari_dense.model_files.CodeExecutionRefused` there, and the widget asks the user
(naming the file and its folder) before loading again with ``trust_code=True``.

Drop a probability map (a ``.zarr`` folder napari-dense wrote) on the viewer:
:func:`read_probability_map` opens it as the live overlay looked (names, colours, visibility,
physical scale). :func:`remember_map_reader` keeps napari from asking which reader to use for it.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from napari_dense.io.store import ATTRIBUTES_KEY

__all__ = [
    "PLUGIN_NAME",
    "get_map_reader",
    "get_reader",
    "is_probability_map",
    "read_probability_map",
    "remember_map_reader",
]

#: The plugin's name in napari.yaml (what reader preferences name).
PLUGIN_NAME: Final = "napari-dense"

_MODEL_SUFFIXES = (".pt2",)
_SIDECAR_SUFFIXES = (".yaml", ".yml")


def _is_model_sidecar(path: Path) -> bool:
    """A YAML file is ours when it has the model metadata keys (not any YAML)."""
    try:
        text = path.read_text(errors="replace")[:20000]
    except OSError:
        return False
    return "patch_size" in text and ("class_names" in text or "model" in text)


def get_reader(path: str | list[str]) -> Callable[[str], list[Any]] | None:
    """napari reader hook: a function for model files, None for anything else."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    candidate = Path(path)
    suffix = candidate.suffix.lower()
    if suffix in _MODEL_SUFFIXES or (suffix in _SIDECAR_SUFFIXES and _is_model_sidecar(candidate)):
        return _load_into_widget
    return None


def _load_into_widget(path: str | list[str]) -> list[Any]:
    import napari

    from napari_dense._napari.widget import dense_widget_of

    if isinstance(path, list):
        path = path[0]
    viewer = napari.current_viewer()
    if viewer is not None:
        dense_widget_of(viewer).load_model(path)
    return [(None,)]  # napari's sentinel for "read, but no layer to add"


# ---------------------------------------------------------------------- probability maps


def is_probability_map(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder napari-dense wrote: a Zarr v3 group with our attribute."""
    import zarr

    if not os.path.isdir(path):
        return False
    try:
        attributes = zarr.open_group(str(path), mode="r", zarr_format=3).attrs.asdict()
    except Exception:  # not a Zarr v3 group: not ours (napari's other readers may want it)
        return False
    return isinstance(attributes.get(ATTRIBUTES_KEY), dict) and "ome" in attributes


def get_map_reader(path: str | list[str]) -> Callable[[str], list[Any]] | None:
    """napari reader hook: a function for napari-dense probability maps, None otherwise.

    npe2 offers every folder to every reader that accepts directories; this one claims only
    the folders :func:`is_probability_map` recognises.
    """
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    return read_probability_map if is_probability_map(path) else None


def read_probability_map(path: str | list[str]) -> list[tuple[Any, dict[str, Any], str]]:
    """A map's classes as the live overlay shows them: one lazy (multiscale) layer per class.

    Same names, colours (:mod:`napari_dense.colours`), additive blending, windows and
    visibility (background hidden) as during the run, at the map's physical scale, translation
    and units. Each layer's metadata names the store, so the writer keeps its provenance and the
    widgets never offer it as an input.
    """
    import dask.array as da

    from napari_dense._napari.layers import class_layer_look
    from napari_dense.colours import is_background
    from napari_dense.io.store import ProbabilityStore

    if isinstance(path, list):
        path = path[0]
    store = ProbabilityStore.open(path)
    levels = [da.from_zarr(store.level(k)) for k in range(store.pyramid_levels + 1)]
    channel = store.axes.index("c")
    leading = store.leading_axes
    lead_scale = [store.scale[0] if axis == "z" else 1.0 for axis in leading]
    space = store.space
    units = (*(None for _ in leading), *space.units) if any(space.units) else None
    layers = []
    for k, name in enumerate(store.class_names):
        index = (slice(None),) * channel + (k,)
        planes = [level[index] for level in levels]
        meta = {
            **class_layer_look(store, k),  # as the live overlay shows it
            "visible": not is_background(name),
            "scale": (*lead_scale, *space.scale),
            "translate": (*(0.0 for _ in leading), *space.translation),
            "units": units,
            "multiscale": len(planes) > 1,
        }
        layers.append((planes if len(planes) > 1 else planes[0], meta, "image"))
    return layers


def remember_map_reader(path: str | os.PathLike[str]) -> bool:
    """Make napari open this map folder (and only it) with napari-dense: no reader chooser.

    napari asks which reader to use whenever several claim a folder (its builtins and
    napari-ome-zarr claim every one) unless the user's reader preferences
    (``settings.plugins.extension2reader``) name one. This adds the preference napari's own
    chooser saves for a ``.zarr`` folder ("Remember this choice"): the folder's absolute path,
    most specific of all patterns. A preference that already matches the folder is the user's
    choice and is kept. The user is told, and can remove it in Preferences › Plugins.

    Returns
    -------
    bool
        Whether a preference was added.
    """
    from napari.plugins.utils import get_preferred_reader
    from napari.settings import get_settings
    from napari.utils.notifications import show_info

    if not is_probability_map(path) or get_preferred_reader(os.fspath(path)) is not None:
        return False
    key = glob.escape(os.path.realpath(path)) + os.sep
    plugins = get_settings().plugins
    plugins.extension2reader = {**plugins.extension2reader, key: PLUGIN_NAME}
    show_info(
        f"{Path(path).name} will open with napari-dense when dragged in "
        "(Preferences › Plugins lists the reader kept for it)"
    )
    return True
