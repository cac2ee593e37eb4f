"""Convert a patch classifier into a dense network by rewriting its torch.fx graph.

:func:`densify` works in five steps, one module each:

1. :mod:`.acquire` (graph acquisition): copy the model (the caller's model is never touched),
   switch the copy to eval mode and trace it with torch.fx; a :func:`torch.export.export`
   program (or ``ep.module()``, or an :class:`ExportedModule`) is already a graph of aten
   operators and is copied with private parameters. Models torch.fx cannot trace faithfully
   (hooks, shape assertions, parametrisations) are exported with torch.export instead.
2. :mod:`.patchnet` runs one patch through the graph to learn every tensor's shape (and every
   size it reads) in the patch network, and checks that the head reduces the patch to 1×1.
3. :mod:`.builder` walks the graph once and emits the dense form of every node, following the
   rule its op class has in :mod:`.optable`: windowed ops (:mod:`.spatial`) run at stride 1 and
   dilate later kernels when densified, reductions (:mod:`.reduce`) are pools over the reduced
   extent, pointwise ops and joins (:mod:`.pointwise`) and per-pixel channel ops, channels-last
   ops and constant slices (:mod:`.local`) run unchanged or shifted on dense tensors; every
   dense tensor carries a :class:`~napari_dense.convert.geometry.Lattice` (:mod:`.state`).
4. :mod:`.costs` turns the new graph into a :class:`~napari_dense.convert.dense.DenseClassifier` and
   its :class:`~napari_dense.convert.plan.DensePlan` with the cost of every per-layer sampling.
5. :mod:`.verify` certifies the result: the dense network and the original model are run on a
   random input covering every phase of every striding layer, and an exact claim that does
   not hold raises :class:`ConversionError`.
"""

from __future__ import annotations

from napari_dense.convert.acquire import Classifier, ExportedModule
from napari_dense.convert.api import densify, explain
from napari_dense.convert.dense import DenseClassifier
from napari_dense.convert.patchnet import accepted_patch_sizes
from napari_dense.convert.plan import DensePlan
from napari_dense.convert.state import SamplingSpec
from napari_dense.convert.verify import ConversionError
from napari_dense.errors import UnsupportedLayerError

__all__ = [
    "Classifier",
    "ConversionError",
    "DenseClassifier",
    "DensePlan",
    "ExportedModule",
    "SamplingSpec",
    "UnsupportedLayerError",
    "accepted_patch_sizes",
    "densify",
    "explain",
]
