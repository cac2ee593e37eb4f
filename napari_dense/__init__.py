"""napari-dense: exact, fast dense (per-pixel) inference for PyTorch patch classifiers.

>>> import napari_dense as nd
>>> dense = nd.densify(model, patch_size=32)          # doctest: +SKIP
>>> probabilities = nd.predict(image, model, 32)      # doctest: +SKIP
"""

from __future__ import annotations

from .convert import densify, explain
from .dense import DenseClassifier
from .errors import InputError, NapariDenseError, PatchSizeError, UnsupportedLayerError
from .plan import DensePlan, StridingLayer
from .predict import predict

__version__ = "0.1.0"

__all__ = [
    "DenseClassifier",
    "DensePlan",
    "InputError",
    "NapariDenseError",
    "PatchSizeError",
    "StridingLayer",
    "UnsupportedLayerError",
    "__version__",
    "densify",
    "explain",
    "predict",
]
