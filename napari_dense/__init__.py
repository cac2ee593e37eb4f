"""napari-dense: exact, fast dense (per-pixel) inference for PyTorch patch classifiers.

>>> import napari_dense as nd
>>> dense = nd.densify(model, patch_size=32)          # doctest: +SKIP
>>> probabilities = nd.predict(image, model, 32)      # doctest: +SKIP
"""

from __future__ import annotations

from napari_dense.convert import densify, explain
from napari_dense.convert.dense import DenseClassifier
from napari_dense.convert.plan import DensePlan, StridingLayer
from napari_dense.errors import (
    ConversionError,
    InputError,
    NapariDenseError,
    PatchSizeError,
    UnsupportedLayerError,
)
from napari_dense.evaluate.frontier import Frontier, FrontierRow, frontier, iter_frontier
from napari_dense.model_files import (
    LoadedClassifier,
    ModelMetadata,
    load_classifier,
    save_classifier,
)
from napari_dense.run.engine import iter_predict
from napari_dense.run.options import RunOptions
from napari_dense.run.predict import predict
from napari_dense.run.to_zarr import predict_to_zarr

__version__ = "0.1.0"

__all__ = [
    "ConversionError",
    "DenseClassifier",
    "DensePlan",
    "Frontier",
    "FrontierRow",
    "InputError",
    "LoadedClassifier",
    "ModelMetadata",
    "NapariDenseError",
    "PatchSizeError",
    "RunOptions",
    "StridingLayer",
    "UnsupportedLayerError",
    "__version__",
    "densify",
    "explain",
    "frontier",
    "iter_frontier",
    "iter_predict",
    "load_classifier",
    "predict",
    "predict_to_zarr",
    "save_classifier",
]
