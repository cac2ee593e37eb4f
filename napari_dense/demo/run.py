"""``make demo``: the trained IHC classifier on the IHC image, in napari or headless.

With a display, napari opens with the image, the model loaded in the Dense inference widget,
the Compare panel docked, and an Advanced run filling the overlay in live. Without one (no
``DISPLAY``), the same pipeline runs through the engine: an OME-Zarr probability map, a PNG
overlay preview and the mode comparison, written next to each other.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from napari_dense.errors import NapariDenseError

__all__ = [
    "DEMO_MODEL",
    "DEMO_MODELS",
    "find_demo_model",
    "overlay_preview",
    "run_gui",
    "run_headless",
]

DEMO_MODEL = "ihc_patchnet.pt2"
PADDED_MODEL = "ihc_selecsls.pt2"
#: Names the CLI accepts for the trained demo models.
DEMO_MODELS = ("ihc_patchnet", "ihc_selecsls")
#: Overlay colours of the classes (nucleus, DAB-positive); background is left transparent.
CLASS_COLOURS = np.array([[0.9, 0.1, 0.9], [0.1, 0.9, 0.2]], dtype=np.float32)


def find_demo_model(name: str = DEMO_MODEL) -> Path:
    """The trained demo model, shipped as package data (``napari_dense/demo/models``)."""
    from importlib.resources import files

    path = Path(str(files("napari_dense.demo") / "models" / name))
    if path.is_file():
        return path
    raise NapariDenseError(
        f"demo model {name} is missing from the installed package ({path.parent}); reinstall "
        "napari-dense, or train it with `python -m napari_dense.demo.train`"
    )


def overlay_preview(image: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """RGB uint8: the image with nucleus (magenta) and DAB-positive (green) probabilities."""
    base = image.astype(np.float32) / 255
    colour = np.tensordot(probabilities[:2].transpose(1, 2, 0), CLASS_COLOURS, axes=1)
    alpha = np.clip(probabilities[:2].sum(0), 0, 1)[..., None] * 0.6
    return (np.clip(base * (1 - alpha) + colour * alpha, 0, 1) * 255).astype(np.uint8)


def run_headless(output_dir: Path, *, overwrite: bool = False, device: str = "auto") -> None:
    """Probability map, overlay PNG and mode comparison of the IHC image, printed and written."""
    from skimage import data, io

    from napari_dense.evaluate.compare import compare_modes
    from napari_dense.model_files import load_classifier
    from napari_dense.run.to_zarr import predict_to_zarr

    image = data.immunohistochemistry()
    model = load_classifier(find_demo_model())
    output_dir.mkdir(parents=True, exist_ok=True)
    zarr_path = output_dir / "demo_output.zarr"
    store = predict_to_zarr(
        image, model, zarr_path, channel_axis=-1, device=device, overwrite=overwrite
    )
    probabilities = store.read()
    preview_path = output_dir / "demo_overlay.png"
    io.imsave(
        preview_path,
        np.concatenate([image, overlay_preview(image, probabilities)], 1),
        check_contrast=False,
    )
    meta = model.metadata
    lines = [f"# napari-dense demo: {meta.name} on scikit-image's IHC image (512x512 RGB)", ""]
    accuracy = meta.accuracy if isinstance(meta.accuracy, dict) else {}
    if accuracy:
        lines += [
            f"Held-out accuracy (per-patch, right part of the image): "
            f"{accuracy.get('held_out_accuracy', float('nan')):.3f}",
            "",
        ]
    for title, path in (
        ("exact model (no padding)", find_demo_model()),
        ("padded model (SelecSLS-style)", find_demo_model(PADDED_MODEL)),
    ):
        loaded = load_classifier(path)
        comparison = compare_modes(
            image,
            loaded.module,
            loaded.patch_size,
            channel_axis=-1,
            device=device,
            normalisation=loaded.metadata.normalisation,
        )
        lines += [
            f"## {title}: {path.name} (scores before softmax)",
            "",
            comparison.to_markdown(),
            "",
        ]
    table = "\n".join(lines)
    table_path = output_dir / "demo_compare.md"
    table_path.write_text(table)
    print(table)
    print(
        f"probability map: {zarr_path}\noverlay preview: {preview_path}\ncomparison: {table_path}"
    )


def run_gui(*, start: bool = True) -> tuple[Any, Any, Any]:
    """Open napari ready to run; starts an Advanced run unless ``start`` is False.

    Returns the viewer, the Dense inference widget and the Compare panel.
    """
    import napari
    from skimage import data

    viewer = napari.Viewer(title="napari-dense demo")
    viewer.add_image(data.immunohistochemistry(), name="IHC", rgb=True)
    _, dense = viewer.window.add_plugin_dock_widget("napari-dense", "Dense inference")
    _, compare = viewer.window.add_plugin_dock_widget("napari-dense", "Compare modes")
    dense.load_model(find_demo_model())
    dense._preset.value = "Advanced"
    dense._tile.value = 128  # small tiles: the overlay visibly fills in
    if start:
        dense.run()
    return viewer, dense, compare


def has_display() -> bool:
    """Whether a GUI can open (an X/Wayland display, or not Linux)."""
    if os.name != "posix" or os.uname().sysname == "Darwin":
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
