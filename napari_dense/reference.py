"""The per-patch oracle, at its stable path: ``napari_dense.reference.patchwise``.

It lives in :mod:`napari_dense.evaluate.reference`; this module keeps the name every test and
user script checks against.
"""

from napari_dense.evaluate.reference import patchwise

__all__ = ["patchwise"]
