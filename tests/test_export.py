"""torch.export programs densify exactly like the modules they were exported from."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from architectures import ARCHITECTURES
from conftest import ATOL, oracle_valid, randomize_batchnorm
from torch import nn
from torch.export import Dim, ExportedProgram

import napari_dense as nd
from napari_dense.convert import ExportedModule, accepted_patch_sizes
from napari_dense.evaluate.models import fdfe15
from napari_dense.evaluate.reference import patchwise

# torch's own run_decompositions warns about its pytree internals; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)`:FutureWarning")

# Exporting costs 0.05-0.5 s per model: export each architecture once per session.
_CACHE: dict[tuple[str, bool], tuple[nn.Module, ExportedProgram]] = {}


def _exported(name: str, *, decomposed: bool = False) -> tuple[nn.Module, ExportedProgram]:
    """The architecture (random weights, BatchNorm statistics randomised) and its program."""
    if (name, decomposed) not in _CACHE:
        if decomposed:  # core ATen: convolution, addmm, _native_batch_norm_legit_no_training ...
            model, program = _exported(name)
            _CACHE[name, decomposed] = (model, program.run_decompositions())
        else:
            factory, patch, channels, _ = ARCHITECTURES[name]
            torch.manual_seed(0)
            model = randomize_batchnorm(factory()).eval()
            program = torch.export.export(model, (torch.zeros(1, channels, *patch),))
            _CACHE[name, decomposed] = (model, program)
    return _CACHE[name, decomposed]


_ORACLE: dict[tuple[str, tuple[int, ...]], tuple[torch.Tensor, np.ndarray]] = {}


def _input_and_oracle(name: str, grow: tuple[int, int]) -> tuple[torch.Tensor, np.ndarray]:
    """A fixed random image for the architecture and the classifier on all its patches (cached:
    the per-patch oracle is what costs time here)."""
    _, patch, channels, size = ARCHITECTURES[name]
    shape = (1, channels, size[0] + grow[0], size[1] + grow[1])
    if (name, shape) not in _ORACLE:
        x = torch.rand(shape, generator=torch.Generator().manual_seed(1))
        _ORACLE[name, shape] = (x, oracle_valid(_exported(name)[0], x, patch))
    return _ORACLE[name, shape]


def _check_equals_oracle(
    dense: nd.DenseClassifier, name: str, *, grow: tuple[int, int] = (0, 0)
) -> None:
    x, expected = _input_and_oracle(name, grow)
    with torch.no_grad():
        out = dense(x).numpy()
    sy, sx = dense.output_stride
    expected = expected[:, :, ::sy, ::sx]
    assert out.shape == expected.shape
    np.testing.assert_allclose(out, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_exported_program_densifies_exactly(name: str) -> None:
    _, program = _exported(name)
    dense = nd.densify(program, ARCHITECTURES[name][1])
    assert dense.exact and dense.output_stride == (1, 1)
    _check_equals_oracle(dense, name)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_decomposed_program_densifies_exactly(name: str) -> None:
    _, program = _exported(name, decomposed=True)
    _check_equals_oracle(nd.densify(program, ARCHITECTURES[name][1]), name)


@pytest.mark.parametrize("name", ["fdfe15", "patchnet32", "residual_add", "batchnorm_linear"])
def test_module_of_the_program_densifies_exactly(name: str) -> None:
    _, program = _exported(name)
    _check_equals_oracle(nd.densify(program.module(), ARCHITECTURES[name][1]), name)


@pytest.mark.parametrize("name", ["fdfe15", "batchnorm_linear"])
def test_exported_module_densifies_and_evaluates_patches(name: str) -> None:
    model, program = _exported(name)
    _, patch, channels, _ = ARCHITECTURES[name]
    module = ExportedModule(program)  # exported with a batch of 1: larger batches are split
    _check_equals_oracle(nd.densify(module, patch), name)
    image = np.random.rand(9, 8, channels).astype(np.float32)
    np.testing.assert_allclose(
        patchwise(image, module, patch), patchwise(image, model, patch), atol=ATOL, rtol=0
    )
    assert not module.eval().training and module.train().training  # no error: a flag only


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_explain_gives_the_plan_of_the_module(name: str) -> None:
    model, program = _exported(name)
    patch = ARCHITECTURES[name][1]
    expected, plan = nd.explain(model, patch), nd.explain(program, patch)
    # Layers keep the names of their modules, so one sampling mapping serves both.
    assert [(lay.name, lay.op, lay.kernel, lay.stride, lay.tied_with) for lay in plan.layers] == [
        (lay.name, lay.op, lay.kernel, lay.stride, lay.tied_with) for lay in expected.layers
    ]
    assert plan.output_stride == expected.output_stride
    assert plan.receptive_field == expected.receptive_field
    assert plan.macs_per_pixel == pytest.approx(expected.macs_per_pixel)
    assert plan.macs_per_patch == pytest.approx(expected.macs_per_patch)
    assert (plan.in_channels, plan.num_classes, plan.exact) == (
        expected.in_channels,
        expected.num_classes,
        expected.exact,
    )


@pytest.mark.parametrize(
    ("name", "densified"),
    [
        ("fdfe15", ["2"]),
        ("fdfe15", ["5"]),
        ("residual_add", ["pool"]),
        ("vgg64", ["6", "20"]),
        ("strided_convs", ["2"]),
        ("functional", ["max_pool2d"]),
    ],
)
def test_custom_sampling_is_exact_on_its_lattice(name: str, densified: list[str]) -> None:
    model, program = _exported(name)
    patch = ARCHITECTURES[name][1]
    names = [layer.name for layer in nd.explain(program, patch).layers]
    assert set(densified) <= set(names)
    sampling = {layer: ("all" if layer in densified else "none") for layer in names}
    dense = nd.densify(program, patch, sampling=sampling)
    assert dense.output_stride == nd.densify(model, patch, sampling=sampling).output_stride
    assert dense.output_stride != (1, 1)
    _check_equals_oracle(dense, name, grow=(7, 4))


def test_phase_batch_form_of_an_exported_program() -> None:
    _, program = _exported("residual_add")
    _check_equals_oracle(nd.densify(program, 21, phases="batch"), "residual_add")


def test_decomposed_layers_are_named_by_their_nodes() -> None:
    _, program = _exported("functional", decomposed=True)
    plan = nd.explain(program, 14)
    assert [(lay.op, lay.stride) for lay in plan.layers] == [
        ("max_pool2d", (2, 2)),
        ("avg_pool2d", (2, 2)),
    ]
    assert plan.layers[0].name == "max_pool2d_with_indices"


class ActivationZoo(nn.Module):
    """Activations, arithmetic with constants, BatchNorm, .float() and softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3)
        self.acts = nn.Sequential(
            nn.ReLU6(), nn.Hardswish(), nn.Mish(), nn.Softplus(), nn.PReLU(6), nn.LogSigmoid(),
            nn.Hardsigmoid(), nn.SELU(), nn.CELU(), nn.Tanhshrink(), nn.Softsign(),
            nn.Threshold(0.1, 0.0), nn.Hardtanh(), nn.Dropout2d(), nn.Identity(),
        )  # fmt: skip
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.acts(self.conv(x))
        y = torch.clamp(y, -1, 2) * 0.5 + 1.0 - y.exp() / 3 + y.abs().sqrt() + torch.maximum(y, -y)
        y = F.max_pool2d(self.bn(y) + y**2, 2)
        return self.fc(torch.flatten(y, 1).float()).softmax(dim=1)


@pytest.mark.parametrize("decomposed", [False, True])
def test_activations_and_arithmetic_of_a_program(decomposed: bool) -> None:
    model = randomize_batchnorm(ActivationZoo()).eval()
    program = torch.export.export(model, (torch.zeros(1, 2, 10, 10),))
    if decomposed:
        program = program.run_decompositions()
    dense = nd.densify(program, 10)
    x = torch.rand(2, 2, 17, 15)
    with torch.no_grad():
        out = dense(x).numpy()
    np.testing.assert_allclose(out, oracle_valid(model, x, (10, 10)), atol=ATOL, rtol=0)


def test_dynamic_batch_and_spatial_dimensions() -> None:
    model = fdfe15(num_classes=4).eval()
    side = Dim("side", min=14, max=17)
    program = torch.export.export(
        model,
        (torch.zeros(2, 1, 15, 15),),
        dynamic_shapes=({0: Dim("batch"), 2: side, 3: side},),
    )
    assert accepted_patch_sizes(program) == [14, 15, 16, 17] == accepted_patch_sizes(model)
    dense = nd.densify(program, 16)
    x = torch.rand(3, 1, 25, 22)
    with torch.no_grad():
        out = dense(x).numpy()
    np.testing.assert_allclose(out, oracle_valid(model, x, (16, 16)), atol=ATOL, rtol=0)
    with pytest.raises(
        nd.PatchSizeError, match=r"Guard failed.*accepts square patches of size 14-17"
    ):
        nd.densify(program, 20)


def test_dynamic_batch_read_by_view_is_fine() -> None:
    # x.view(x.size(0), -1) with a dynamic batch reads the batch size (sym_size) in the graph.
    model, _ = _exported("functional")
    program = torch.export.export(
        model, (torch.zeros(2, 2, 14, 14),), dynamic_shapes=({0: Dim("b")},)
    )
    assert "sym_size" in program.graph_module.code
    _check_equals_oracle(nd.densify(program, 14), "functional")


def test_static_program_names_the_patch_size_it_was_exported_with() -> None:
    _, program = _exported("fdfe15")
    with pytest.raises(nd.PatchSizeError, match=r"exported for a 15x15 patch.*torch\.export\.Dim"):
        nd.densify(program, 16)
    with pytest.raises(nd.PatchSizeError, match="takes 1 channel"):
        nd.explain(program, 15, in_channels=3)
    assert accepted_patch_sizes(program) == [15]


class Upsampler(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.conv(x), scale_factor=0.5).flatten(1)


def test_unsupported_aten_operator_names_node_operator_and_hint() -> None:
    program = torch.export.export(Upsampler(), (torch.zeros(1, 1, 6, 6),))
    with pytest.raises(nd.UnsupportedLayerError) as info:
        nd.densify(program, 6)
    message = str(info.value)
    assert "node 'upsample_nearest2d'" in message and "aten.upsample_nearest2d" in message
    assert "Hint:" in message and "Supported aten operators" in message


def test_programs_exported_in_training_mode_are_refused_with_the_fix() -> None:
    factory, patch, channels, _ = ARCHITECTURES["batchnorm_linear"]
    program = torch.export.export(factory().train(), (torch.zeros(2, channels, *patch),))
    with pytest.raises(nd.UnsupportedLayerError, match=r"training mode.*model\.eval\(\)"):
        nd.densify(program, patch)
    dropout = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Dropout(0.5), nn.Flatten()).train()
    program = torch.export.export(dropout, (torch.zeros(1, 1, 3, 3),))
    with pytest.raises(nd.UnsupportedLayerError, match="training mode"):
        nd.densify(program, 3)


def test_the_program_and_its_parameters_are_untouched() -> None:
    model, program = _exported("batchnorm_linear")
    before = {k: v.clone() for k, v in program.state_dict.items()}
    dense = nd.densify(program, 16)
    mine = {p.data_ptr() for p in [*dense.parameters(), *dense.buffers()]}
    assert not mine & {v.data_ptr() for v in program.state_dict.values()}
    assert all(torch.equal(before[k], v) for k, v in program.state_dict.items())
    x = torch.rand(1, 3, 16, 16)
    torch.testing.assert_close(program.module()(x), model(x))


def test_anything_else_is_refused() -> None:
    with pytest.raises(TypeError, match="ExportedProgram"):
        nd.densify("model.pt2", 15)  # type: ignore[arg-type]


@pytest.mark.parametrize("batch", [1, 3])
def test_patchwise_evaluates_programs_of_any_fixed_batch(batch: int) -> None:
    model = fdfe15(num_classes=4).eval()
    program = torch.export.export(model, (torch.zeros(batch, 1, 15, 15),))
    image = np.random.rand(9, 7).astype(np.float32)  # 63 patches: not a multiple of 3
    expected = patchwise(image, model, 15)
    np.testing.assert_allclose(patchwise(image, program, 15, batch_size=10), expected, atol=ATOL)
    assert ExportedModule(program)(torch.zeros(5, 1, 15, 15)).shape == (5, 4, 1, 1)
