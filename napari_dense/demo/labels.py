"""Training labels for the IHC image from a classical method (colour deconvolution)."""

from __future__ import annotations

import numpy as np
from skimage import color, filters, morphology

__all__ = ["CLASS_NAMES", "ihc_labels"]

CLASS_NAMES = ("nucleus", "DAB-positive", "background")


def _normalised(channel: np.ndarray) -> np.ndarray:
    low, high = channel.min(), np.percentile(channel, 99.5)
    return np.clip((channel - low) / (high - low), 0, 1)


def ihc_labels(image: np.ndarray) -> np.ndarray:
    """Per-pixel labels 0 nucleus, 1 DAB-positive, 2 background of an RGB IHC image.

    Haematoxylin and DAB stains are separated by colour deconvolution (``rgb2hed``); each is
    thresholded (Otsu; DAB at 1.3× Otsu, since its light background stain is not membrane) and
    cleaned by a small opening and removal of specks. DAB wins where both stains are present.
    """
    hed = color.rgb2hed(image)
    haematoxylin, dab = _normalised(hed[..., 0]), _normalised(hed[..., 2])
    footprint = morphology.disk(2)

    def mask(channel: np.ndarray, threshold: float) -> np.ndarray:
        opened = morphology.opening(channel > threshold, footprint)
        return morphology.remove_small_objects(opened, max_size=30)

    labels = np.full(image.shape[:2], 2, dtype=np.int64)
    labels[mask(haematoxylin, filters.threshold_otsu(haematoxylin))] = 0
    labels[mask(dab, 1.3 * filters.threshold_otsu(dab))] = 1
    return labels
