"""The result of loading a model file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from napari_dense.convert import SamplingSpec, densify
from napari_dense.convert.dense import DenseClassifier
from napari_dense.convert.geometry import Pair
from napari_dense.model_files.metadata import ModelMetadata

__all__ = ["LoadedClassifier"]


@dataclass(frozen=True)
class LoadedClassifier:
    """A classifier loaded from a file, ready for :func:`napari_dense.densify`.

    Attributes
    ----------
    module
        The classifier, an ``nn.Module`` mapping ``(N, C, Ph, Pw)`` to scores: for a ``.pt2``
        an :class:`~napari_dense.convert.ExportedModule` (its ``exported_program`` is the loaded
        program), for a Python class the instance in eval mode. ``densify``, ``explain``, the
        engine and per-patch code (``reference.patchwise``) all accept it.
    metadata
        Its metadata, with ``patch_size`` and ``in_channels`` always set.
    path
        The file holding the trained model: the ``.pt2``, or the weights of a Python class.
    sha256
        Hex SHA-256 of the file at ``path`` (provenance: which weights produced a result).
    sidecar
        The sidecar yaml that was read, if any.
    """

    module: nn.Module
    metadata: ModelMetadata
    path: Path
    sha256: str
    sidecar: Path | None = None

    @property
    def patch_size(self) -> Pair:
        """``(Ph, Pw)``."""
        assert self.metadata.patch_size is not None
        return self.metadata.patch_size

    def densify(
        self, sampling: SamplingSpec = "all", *, phases: str = "dilated"
    ) -> DenseClassifier:
        """:func:`napari_dense.densify` of the classifier at its patch size."""
        return densify(
            self.module,
            self.patch_size,
            sampling=sampling,
            phases=phases,
            in_channels=self.metadata.in_channels,
        )
