"""Tensors of the Open Inference Protocol (KServe v2) and our model manifests.

The protocol (https://kserve.github.io/website/latest/modelserving/data_plane/v2_protocol/,
"Tensor Data Types" and "Tensor Data") sends a tensor as ``name``, ``shape`` (batch first),
``datatype`` and ``data``: its elements flattened in row-major order, as JSON numbers,
booleans or strings. Triton's binary tensor data extension
(https://kserve.github.io/website/latest/modelserving/data_plane/binary_tensor_data_extension/)
sends the elements instead after the JSON object, little-endian, without padding (a
``BYTES`` element as a 4-byte little-endian length and its bytes), sized by the input's
``binary_data_size`` parameter; ``tritonclient``'s ``set_data_from_numpy`` does so by
default, so inputs are read both ways. Outputs are always answered as JSON, which the
extension allows (a client that asks for binary outputs reads JSON ones as well).

Datatypes (:data:`MANIFEST_DATATYPES`, :data:`NUMPY_DTYPES`):

=========  ==================  ===============================================
v2         NumPy               our manifest / results
=========  ==================  ===============================================
``BOOL``   ``bool``            (no model input; refused)
``UINT8``  ``uint8``           (no model input; refused), likewise ``UINT16``,
                               ``UINT32``, ``UINT64``, ``INT8``, ``INT16``, ``FP16``
``INT32``  ``int32``           ``inputs.dtype: int32``
``INT64``  ``int64``           ``inputs.dtype: int64``; integer class labels
``FP32``   ``float32``         ``inputs.dtype: float32``; ``embedding`` outputs
``FP64``   ``float64``         ``inputs.dtype: float64``; ``score``, ``probabilities``,
                               regression ``prediction``, float class labels
``BYTES``  ``object`` (bytes)  ``text`` inputs, ``image`` inputs (paths under the
                               data directory), text class labels (UTF-8)
=========  ==================  ===============================================

A request's input must carry the model's own datatype: a v2 server does not convert
(an ``FP64`` tensor for an ``FP32`` input is refused, naming both).

Shapes: a model takes one input tensor of shape ``[-1, *row_shape]`` (``-1``: the batch),
named ``input`` for ``columns`` models (the columns in manifest order, reshaped to
``inputs.shape``) and after its one column for ``tensor``, ``text`` and ``image`` models
(shape ``[-1]`` for the last two). Outputs, by ``outputs.kind``: ``classification``:
``prediction`` ``[-1]`` (the label), ``score`` ``[-1]``, ``probabilities`` ``[-1, K]``;
``regression``: ``prediction`` ``[-1]`` (``[-1, size]`` when ``size`` > 1);
``embedding``: ``embedding`` ``[-1, D]`` (``D`` -1 when undeclared).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ml_framework.errors import InferenceInputError
from ml_framework.manifest import ModelManifest

__all__ = [
    "MANIFEST_DATATYPES", "NUMPY_DTYPES", "InferenceInputError", "TensorSpec", "decode_input",
    "encode_outputs", "input_spec", "output_specs",
]

NUMPY_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype(np.uint8), "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32), "UINT64": np.dtype(np.uint64), "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16), "INT32": np.dtype(np.int32), "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16), "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}
"""Every v2 datatype (the spec's "Tensor Data Types" table) and its NumPy dtype."""
MANIFEST_DATATYPES: dict[str, str] = {"float32": "FP32", "float64": "FP64", "int32": "INT32", "int64": "INT64"}
"""v2 datatype of each ``inputs.dtype`` of a manifest."""
COLUMNS_INPUT = "input"
"""Name of the one input tensor of a ``columns`` model."""
BATCH = -1
"""A dimension of any size (the batch), as the spec writes it in metadata."""


@dataclass(frozen=True)
class TensorSpec:
    """One input or output tensor as the protocol's metadata declares it.

    Attributes:
        name: the tensor's name.
        datatype: a key of :data:`NUMPY_DTYPES`.
        shape: batch dimension first, ``-1`` where any size goes.
    """

    name: str
    datatype: str
    shape: tuple[int, ...]

    def as_json(self) -> dict[str, Any]:
        """The spec's ``$metadata_tensor``."""
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


def input_spec(manifest: ModelManifest) -> TensorSpec:
    """The one input tensor of ``manifest``'s model (see the module docstring).

    Returns:
        ``columns`` / ``tensor``: ``(N, *row_shape)`` of ``inputs.dtype``; ``text`` /
        ``image``: ``(N,)`` ``BYTES``.
    """
    inputs = manifest.inputs
    if inputs.kind in ("text", "image"):
        return TensorSpec(inputs.column, "BYTES", (BATCH,))
    name = COLUMNS_INPUT if inputs.kind == "columns" else inputs.column
    return TensorSpec(name, MANIFEST_DATATYPES[inputs.dtype], (BATCH, *inputs.row_shape))


def _labels_datatype(labels: list[Any]) -> str:
    if any(isinstance(v, str) for v in labels):
        return "BYTES"
    return "INT64" if all(isinstance(v, int) and not isinstance(v, bool) for v in labels) else "FP64"


def output_specs(manifest: ModelManifest) -> list[TensorSpec]:
    """The output tensors of ``manifest``'s model, in the order they are answered."""
    out = manifest.outputs
    if out.kind == "classification":
        labels = out.labels or []
        return [TensorSpec("prediction", _labels_datatype(labels), (BATCH,)),
                TensorSpec("score", "FP64", (BATCH,)),
                TensorSpec("probabilities", "FP64", (BATCH, len(labels)))]
    if out.kind == "regression":
        many = out.size is not None and out.size > 1
        return [TensorSpec("prediction", "FP64", (BATCH, out.size) if many else (BATCH,))]
    return [TensorSpec("embedding", "FP32", (BATCH, out.size or BATCH))]


def _check_header(given: dict[str, Any], want: TensorSpec) -> tuple[int, ...]:
    """The request input's shape, checked against ``want``'s name, datatype and shape."""
    name, datatype, shape = given["name"], given["datatype"], tuple(given["shape"])
    if name != want.name:
        raise InferenceInputError(f"unknown input {name[:64]!r}: the model takes one input, {want.name!r}")
    if datatype != want.datatype:
        known = "" if datatype in NUMPY_DTYPES else f" (not a v2 datatype: {', '.join(NUMPY_DTYPES)})"
        raise InferenceInputError(f"input {want.name!r}: datatype {datatype[:16]!r}{known}; the model takes "
                                  f"{want.datatype}")
    fits = len(shape) == len(want.shape) and all(w in (BATCH, s) for s, w in zip(shape, want.shape, strict=True))
    if not fits or any(s < 0 for s in shape) or (shape and shape[0] == 0):
        raise InferenceInputError(f"input {want.name!r}: shape {list(shape)[:8]}; the model takes "
                                  f"{list(want.shape)} (-1: any number of rows, at least 1)")
    return shape


def _bytes_elements(blob: bytes, count: int, name: str) -> list[str]:
    """``count`` BYTES elements (4-byte little-endian length, then the bytes) as UTF-8 text."""
    out, at = [], 0
    for _ in range(count):
        if at + 4 > len(blob):
            raise InferenceInputError(f"input {name!r}: binary data ends after {len(out)} of {count} elements")
        (size,) = struct.unpack_from("<I", blob, at)
        out.append(blob[at + 4:at + 4 + size])
        at += 4 + size
    if at != len(blob):
        raise InferenceInputError(f"input {name!r}: binary data of {len(blob)} bytes does not hold {count} elements")
    try:
        return [b.decode() for b in out]
    except UnicodeDecodeError as exc:
        raise InferenceInputError(f"input {name!r}: BYTES elements must be UTF-8 text") from exc


def decode_input(given: dict[str, Any], want: TensorSpec, binary: bytes | None = None) -> np.ndarray | list[str]:
    """The rows of one request input, as the online path takes them.

    Args:
        given: the request's ``$request_input`` (``name``, ``shape``, ``datatype``,
            ``data`` or ``parameters.binary_data_size``), validated as JSON already.
        want: the model's input (:func:`input_spec`).
        binary: the input's binary data (the extension), or ``None`` for JSON ``data``.

    Returns:
        Numeric inputs: an array of ``want``'s dtype and the request's shape ``(N, ...)``;
        ``BYTES``: ``N`` strings.

    Raises:
        InferenceInputError: a wrong name, datatype or shape, element count, or data of
            another type (text in a number tensor, a fraction in an integer one).
    """
    shape = _check_header(given, want)
    count, dtype = math.prod(shape), NUMPY_DTYPES[want.datatype]
    if binary is not None:
        if want.datatype == "BYTES":
            return _bytes_elements(binary, count, want.name)
        if len(binary) != count * dtype.itemsize:
            raise InferenceInputError(f"input {want.name!r}: {len(binary)} bytes of binary data; shape "
                                      f"{list(shape)} of {want.datatype} takes {count * dtype.itemsize}")
        return np.frombuffer(binary, dtype.newbyteorder("<")).astype(dtype, copy=False).reshape(shape)
    data = given.get("data")
    if data is None:
        raise InferenceInputError(f"input {want.name!r}: no data (give 'data', or binary data and its "
                                  "'binary_data_size' parameter)")
    try:
        values = np.asarray(data)
    except ValueError as exc:  # ragged nesting
        raise InferenceInputError(f"input {want.name!r}: data is not a row-major list of elements") from exc
    if values.size != count:
        raise InferenceInputError(f"input {want.name!r}: {values.size} elements for shape {list(shape)} "
                                  f"({count} elements)")
    if want.datatype == "BYTES":
        if values.dtype.kind != "U":
            raise InferenceInputError(f"input {want.name!r}: BYTES data must be strings")
        return [str(v) for v in values.reshape(-1)]
    allowed = "iu" if dtype.kind in "iu" else "iuf"
    if values.dtype.kind not in allowed:
        kind = "integers" if dtype.kind in "iu" else "numbers"
        raise InferenceInputError(f"input {want.name!r}: {want.datatype} data must be {kind}, got "
                                  f"{'booleans' if values.dtype.kind == 'b' else values.dtype.name} values")
    return values.astype(dtype).reshape(shape)


def _column(frame: pd.DataFrame, spec: TensorSpec) -> np.ndarray:
    """One result column of ``frame`` as the tensor ``spec`` describes, ``(N, ...)``."""
    values = frame[spec.name].to_numpy()
    if len(spec.shape) > 1:
        values = np.stack([np.asarray(v) for v in values]) if len(values) else np.empty((0, max(spec.shape[1], 0)))
    if spec.datatype == "BYTES":
        return values.astype(str)
    return values.astype(NUMPY_DTYPES[spec.datatype])


def encode_outputs(frame: pd.DataFrame, specs: list[TensorSpec]) -> list[dict[str, Any]]:
    """An online answer as the protocol's ``$response_output`` list.

    Args:
        frame: :meth:`producer.client.Client.apredict`'s answer: one row per input row,
            in order, with the output columns and ``error``.
        specs: the outputs to answer (:func:`output_specs`, or those the request asked for).

    Returns:
        ``{"name", "datatype", "shape", "data"}`` per output, ``data`` flattened row-major.

    Raises:
        InferenceInputError: a row failed (the protocol has no per-row errors); the
            message is the first failed row's error.
    """
    if "error" in frame and frame["error"].notna().any():
        failed = frame[frame["error"].notna()]
        raise InferenceInputError(f"{len(failed)} of {len(frame)} rows failed; {failed['error'].iloc[0]}")
    outputs = []
    for spec in specs:
        values = _column(frame, spec)
        outputs.append({"name": spec.name, "datatype": spec.datatype, "shape": list(values.shape),
                        "data": values.reshape(-1).tolist()})
    return outputs
