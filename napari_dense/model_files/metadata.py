"""The metadata schema of model files, as pydantic models (the JSON Schema comes with them).

:class:`ModelMetadata` is what a model says about itself (embedded in a ``.pt2`` as
``napari_dense.json``); :class:`Sidecar` adds the fields that say where the model is (the
sidecar ``<model>.yaml``). Each field's ``description`` states what it must be: validation
errors become one line, ``<field> must be <description>, got <value>`` (:mod:`.messages`).
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Annotated, Any, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)
from typing_extensions import TypedDict  # pydantic needs this one before Python 3.12

from napari_dense.convert.upsample import ACTIVATIONS, Activation
from napari_dense.model_files.errors import ModelFileError
from napari_dense.model_files.messages import one_line

__all__ = [
    "ACTIVATIONS",
    "FORMAT_VERSION",
    "METADATA_ENTRY",
    "ModelMetadata",
    "Normalisation",
    "Sidecar",
    "check_normalisation",
]

#: The name of the metadata entry embedded in ``.pt2`` files.
METADATA_ENTRY = "napari_dense.json"
FORMAT_VERSION = 1
_CONFIG = ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True)


def _whole(value: Any) -> Any:
    """numpy and other integral numbers as ``int``; bools and floats (24.0) stay refused."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    return value


def _pair(value: Any) -> Any:
    """One size (square) or ``[size]`` as ``(size, size)``; the rest is left for the check."""
    items = list(value) if isinstance(value, list | tuple) else [value]
    return (items[0], items[0]) if len(items) == 1 else tuple(items)


def _non_zero(value: float) -> float:
    if value == 0:
        raise ValueError  # no text: the message is the field's description
    return value


def _listed(value: Any) -> Any:
    """One number for all channels as a list of one."""
    return [value] if isinstance(value, numbers.Real) and not isinstance(value, bool) else value


Count = Annotated[int, Field(gt=0, strict=True), BeforeValidator(_whole)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
_ONE_OR_MORE = Field(min_length=1)
Means = Annotated[
    list[Finite],
    _ONE_OR_MORE,
    BeforeValidator(_listed, json_schema_input_type=Finite | Annotated[list[Finite], _ONE_OR_MORE]),
]
Deviations = Annotated[
    list[Positive],
    _ONE_OR_MORE,
    BeforeValidator(
        _listed, json_schema_input_type=Positive | Annotated[list[Positive], _ONE_OR_MORE]
    ),
]
PatchSize = Annotated[
    tuple[Count, Count],
    BeforeValidator(
        _pair,
        json_schema_input_type=Count | Annotated[list[Count], Field(min_length=1, max_length=2)],
    ),
]


class Normalisation(TypedDict, total=False):
    """``x' = (x * scale - mean[c]) / std[c]`` for every channel ``c`` of the raw image ``x``."""

    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]
    scale: Annotated[
        Finite,
        AfterValidator(_non_zero),
        Field(default=1.0, description="a finite non-zero number (1/255 maps uint8 to [0, 1])"),
    ]
    mean: Annotated[Means, Field(default=[0.0], description="a number or one per channel")]
    std: Annotated[
        Deviations, Field(default=[1.0], description="a positive number or one per channel")
    ]


class ModelMetadata(BaseModel):
    """What a model file says about its classifier (the schema: :mod:`napari_dense.model_files`).

    Attributes
    ----------
    patch_size
        ``(Ph, Pw)``; always set on a :class:`LoadedClassifier` (inferred when missing).
    in_channels
        Input channels; always set on a :class:`LoadedClassifier`.
    class_names
        One name per output class (empty when not given).
    normalisation
        ``{"scale": float, "mean": [...], "std": [...]}``: the engine feeds the network
        ``(x * scale - mean[c]) / std[c]`` per channel ``c``; None: raw values.
    activation
        ``"softmax"``, ``"sigmoid"`` or ``"none"``: applied by the engine after the network, for
        models that output logits; ``"none"`` uses the output as is.
    name, description, training_command
        For display and provenance.
    accuracy
        A number, or named figures (``{"held_out_accuracy": 0.93, "recall_tumour": 0.9}``).

    Invalid values raise :class:`ModelFileError` with one line naming the field and the fix.
    """

    model_config = _CONFIG
    patch_size: PatchSize | None = Field(
        None, description="a positive whole number (square patches) or [height, width]"
    )
    in_channels: Count | None = Field(
        None, description="a positive whole number (the image channels the model reads)"
    )
    class_names: list[str] = Field([], description="a list of names, one per output class")
    normalisation: Normalisation | None = Field(
        None,
        description="a mapping {scale, mean, std}: the network reads "
        "(x * scale - mean[c]) / std[c]",
    )
    activation: Annotated[
        Activation, BeforeValidator(lambda v: v.lower() if isinstance(v, str) else v)
    ] = Field("none", description="one of softmax, sigmoid, none (applied to the network's output)")
    name: str = Field("", description="text")
    description: str = Field("", description="text")
    accuracy: Finite | dict[str, Finite] | None = Field(
        None, description="a number or named numbers ({held_out: 0.93, recall_tumour: 0.9})"
    )
    training_command: str = Field("", description="text")

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as err:
            raise ModelFileError(one_line(err, values, type(self))) from err

    @model_validator(mode="after")
    def _fits_the_channels(self) -> Self:
        channels, normalisation = self.in_channels, self.normalisation
        if channels is None or normalisation is None:
            return self
        for key, values in (("mean", normalisation["mean"]), ("std", normalisation["std"])):
            if len(values) not in (1, channels):
                raise ValueError(
                    f"normalisation {key} has {len(values)} values for a {channels}-channel "
                    f"model: give one value or {channels}"
                )
        return self

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "metadata") -> Self:
        """From plain data (a parsed sidecar or embedded JSON); file fields are ignored.

        ``normalization`` is accepted for ``normalisation``; None stands for "not given".
        Unknown fields are refused (typos).
        """
        files = set(Sidecar.model_fields) - set(cls.model_fields)
        values = {k: v for k, v in data.items() if v is not None and k not in files}
        if "normalization" in values and "normalisation" not in values:
            values["normalisation"] = values.pop("normalization")
        try:
            return cls(**values)
        except ModelFileError as err:
            raise ModelFileError(f"{err} (in {source})") from err

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes``, validated again (``dataclasses.replace`` of a model)."""
        return type(self)(**{**dict(self), **changes})

    def as_dict(self) -> dict[str, Any]:
        """Plain data (JSON and YAML serialisable) of the fields that are set."""
        data = self.model_dump(mode="json", include=set(ModelMetadata.model_fields))
        return {k: v for k, v in data.items() if v not in (None, "", [])}


class Sidecar(ModelMetadata):
    """A sidecar ``<model>.yaml``: the metadata, and where the model is (paths relative to it)."""

    model_config = ConfigDict(title="napari-dense model sidecar")
    format_version: Literal[1] = Field(1, description="1 (the format this napari-dense reads)")
    model_file: str | None = Field(None, description="a .pt2 file (torch.export)")
    python_file: str | None = Field(
        None, description="a Python file defining the classifier (runs only with trust_code)"
    )
    class_name: str | None = Field(
        None, description="the nn.Module class (or a function returning it) in python_file"
    )
    init_args: dict[str, Any] | list[Any] | None = Field(
        None, description="the class's keyword arguments (a mapping) or positional ones (a list)"
    )
    weights: str | None = Field(
        None, description="the state dict file, saved with torch.save(model.state_dict(), ...)"
    )


def check_normalisation(
    normalisation: Mapping[str, Any], channels: int | None = None
) -> dict[str, Any]:
    """Validate a normalisation and return it as plain data.

    Parameters
    ----------
    normalisation
        ``{"scale": s, "mean": [...], "std": [...]}`` (every key optional; a number stands for
        one value for all channels). The engine computes ``x' = (x * scale - mean[c]) / std[c]``
        for every channel ``c`` of the raw image ``x``.
    channels
        The model's input channels: mean and std must then have one value or one per channel.

    Returns
    -------
    dict
        ``{"scale": float, "mean": list[float], "std": list[float]}``.
    """
    checked = ModelMetadata(normalisation=normalisation, in_channels=channels).normalisation
    return dict(checked or {})
