"""napari-dense: exact, fast dense (per-pixel) inference for PyTorch patch classifiers.

>>> import napari_dense as nd
>>> dense = nd.densify(model, patch_size=32)          # doctest: +SKIP
>>> probabilities = nd.predict(image, model, 32)      # doctest: +SKIP
"""

from __future__ import annotations

from .convert import densify, explain
from .dense import DenseClassifier
from .engine import iter_predict
from .errors import (
    ConversionError,
    InputError,
    NapariDenseError,
    PatchSizeError,
    UnsupportedLayerError,
)
from .frontier import Frontier, FrontierRow, frontier, iter_frontier
from .model_files import LoadedClassifier, ModelMetadata, load_classifier, save_classifier
from .plan import DensePlan, StridingLayer
from .predict import predict
from .to_zarr import predict_to_zarr

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
