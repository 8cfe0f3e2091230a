"""Datatypes and shapes of the Open Inference Protocol against our manifests (producer.api.oip_tensors)."""

from __future__ import annotations

import struct

import numpy as np
import pandas as pd
import pytest

from ml_framework.manifest import ModelManifest
from producer.api.oip_tensors import (
    MANIFEST_DATATYPES,
    NUMPY_DTYPES,
    InferenceInputError,
    TensorSpec,
    decode_input,
    encode_outputs,
    input_spec,
    output_specs,
)


def manifest(inputs: dict, outputs: dict | None = None, **extra) -> ModelManifest:
    extra = {"framework": "sklearn", "artifact": "model.skops", **extra}
    return ModelManifest(name="m", version=1,
                         inputs=inputs, outputs=outputs or {"kind": "classification", "labels": [0, 1, 2]}, **extra)


PIXELS = [f"p{i}" for i in range(64)]


def test_every_manifest_dtype_has_a_v2_datatype_of_the_same_numpy_dtype():
    """float32/float64/int32/int64 map to FP32/FP64/INT32/INT64, whose NumPy dtypes are those."""
    assert MANIFEST_DATATYPES == {"float32": "FP32", "float64": "FP64", "int32": "INT32", "int64": "INT64"}
    for ours, v2 in MANIFEST_DATATYPES.items():
        assert NUMPY_DTYPES[v2] == np.dtype(ours)
    assert set(NUMPY_DTYPES) == {"BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
                                 "FP16", "FP32", "FP64", "BYTES"}


def test_input_spec_per_kind():
    """columns: 'input' [-1, *shape] of the manifest dtype; tensor: its column; text: BYTES [-1]."""
    assert input_spec(manifest({"columns": PIXELS, "shape": [1, 8, 8]})) == TensorSpec("input", "FP32", (-1, 1, 8, 8))
    assert input_spec(manifest({"columns": PIXELS, "dtype": "int64"})) == TensorSpec("input", "INT64", (-1, 64))
    tensor = manifest({"kind": "tensor", "columns": ["x"], "shape": [3, 2], "dtype": "float64"})
    assert input_spec(tensor) == TensorSpec("x", "FP64", (-1, 3, 2))
    text = manifest({"kind": "text", "columns": ["sentence"]}, {"kind": "embedding", "size": 4}, framework="torch",
                    artifact="m.pt2", tokenizer={"max_length": 8})
    assert input_spec(text) == TensorSpec("sentence", "BYTES", (-1,))


def test_output_specs_per_kind_and_label_type():
    """Classification: prediction typed by its labels, score FP64, probabilities [-1, K]; regression
    and embedding by their size."""
    ints = output_specs(manifest({"columns": ["a"]}))
    assert [s.as_json() for s in ints] == [
        {"name": "prediction", "datatype": "INT64", "shape": [-1]},
        {"name": "score", "datatype": "FP64", "shape": [-1]},
        {"name": "probabilities", "datatype": "FP64", "shape": [-1, 3]}]
    assert output_specs(manifest({"columns": ["a"]}, {"kind": "classification", "labels": ["a", "b"]}))[0].datatype \
        == "BYTES"
    assert output_specs(manifest({"columns": ["a"]}, {"kind": "regression"})) == [TensorSpec("prediction", "FP64",
                                                                                              (-1,))]
    assert output_specs(manifest({"columns": ["a"]}, {"kind": "regression", "size": 2}))[0].shape == (-1, 2)
    assert output_specs(manifest({"columns": ["a"]}, {"kind": "embedding"})) == [TensorSpec("embedding", "FP32",
                                                                                             (-1, -1))]


FP32_IN = TensorSpec("input", "FP32", (-1, 2, 2))


def test_json_data_is_read_row_major_into_the_declared_shape():
    """Flat row-major data with shape [2, 2, 2] gives a (2, 2, 2) float32 array; nested lists work too."""
    given = {"name": "input", "datatype": "FP32", "shape": [2, 2, 2], "data": [1, 2, 3, 4, 5, 6, 7, 8.5]}
    rows = decode_input(given, FP32_IN)
    assert rows.dtype == np.float32 and rows.shape == (2, 2, 2) and rows[1, 1, 1] == 8.5 and rows[0, 1, 0] == 3
    nested = decode_input({**given, "data": [[[1, 2], [3, 4]], [[5, 6], [7, 8.5]]]}, FP32_IN)
    np.testing.assert_array_equal(nested, rows)


@pytest.mark.parametrize(("change", "message"), [
    ({"name": "x"}, "unknown input 'x': the model takes one input, 'input'"),
    ({"datatype": "FP64"}, "input 'input': datatype 'FP64'; the model takes FP32"),
    ({"datatype": "FLOAT"}, "not a v2 datatype"),
    ({"shape": [2, 4]}, "input 'input': shape [2, 4]; the model takes [-1, 2, 2]"),
    ({"shape": [2, 2, 3]}, "shape [2, 2, 3]"),
    ({"shape": [0, 2, 2], "data": []}, "at least 1"),
    ({"data": [1] * 7}, "7 elements for shape [2, 2, 2] (8 elements)"),
    ({"data": ["a"] * 8}, "FP32 data must be numbers"),
    ({"data": [True] * 8}, "got booleans"),
    ({"data": [[1, 2], [3]]}, "not a row-major list"),
    ({"data": None}, "no data"),
])
def test_a_request_input_that_does_not_fit_is_refused_naming_why(change, message):
    """Wrong name, datatype, shape, element count or element type: InferenceInputError saying which."""
    given = {"name": "input", "datatype": "FP32", "shape": [2, 2, 2], "data": list(range(8)), **change}
    with pytest.raises(InferenceInputError, match=None) as exc:
        decode_input(given, FP32_IN)
    assert message in str(exc.value)


def test_int64_inputs_refuse_fractions_and_keep_64_bits():
    """INT64 data must be integers (1.5 is refused, not truncated); values beyond 2**53 survive."""
    want = TensorSpec("input", "INT64", (-1, 2))
    rows = decode_input({"name": "input", "datatype": "INT64", "shape": [1, 2], "data": [2**62 + 1, -3]}, want)
    assert rows.dtype == np.int64 and rows.tolist() == [[2**62 + 1, -3]]
    with pytest.raises(InferenceInputError, match="INT64 data must be integers"):
        decode_input({"name": "input", "datatype": "INT64", "shape": [1, 2], "data": [1.5, 2]}, want)


def test_binary_data_is_little_endian_and_sized_exactly():
    """Binary tensor data (the extension) reads little-endian elements; a size mismatch is refused."""
    want = TensorSpec("input", "INT64", (-1, 3))
    values = np.array([[1, -2, 3], [4, 5, 2**40]], dtype="<i8")
    given = {"name": "input", "datatype": "INT64", "shape": [2, 3], "parameters": {"binary_data_size": 48}}
    assert decode_input(given, want, values.tobytes()).tolist() == values.tolist()
    with pytest.raises(InferenceInputError, match="40 bytes of binary data"):
        decode_input(given, want, values.tobytes()[:40])


def test_binary_bytes_elements_are_length_prefixed_utf8():
    """BYTES binary data: 4-byte little-endian length, then the bytes; a truncated element is refused."""
    want = TensorSpec("sentence", "BYTES", (-1,))
    blob = b"".join(struct.pack("<I", len(s)) + s for s in ("héllo".encode(), b"", b"x"))
    given = {"name": "sentence", "datatype": "BYTES", "shape": [3]}
    assert decode_input(given, want, blob) == ["héllo", "", "x"]
    with pytest.raises(InferenceInputError, match="does not hold 3 elements"):
        decode_input(given, want, blob[:-1])
    assert decode_input({**given, "data": ["a", "b", "c"]}, want) == ["a", "b", "c"]


def test_outputs_are_flattened_row_major_with_their_shapes():
    """An answer frame becomes prediction [N] INT64, score [N], probabilities [N, K] flattened row-major."""
    specs = output_specs(manifest({"columns": ["a"]}))
    frame = pd.DataFrame({"prediction": [2, 0], "score": [0.7, 0.9],
                          "probabilities": [[0.1, 0.2, 0.7], [0.9, 0.05, 0.05]], "error": [None, None]})
    out = encode_outputs(frame, specs)
    assert out[0] == {"name": "prediction", "datatype": "INT64", "shape": [2], "data": [2, 0]}
    assert out[2] == {"name": "probabilities", "datatype": "FP64", "shape": [2, 3],
                      "data": [0.1, 0.2, 0.7, 0.9, 0.05, 0.05]}


def test_a_failed_row_fails_the_request_with_its_error():
    """The protocol has no per-row errors: a failed row is raised, naming the row's error."""
    frame = pd.DataFrame({"prediction": [1, None], "error": [None, "row 1, field 'a': 'x' is not a number"]})
    with pytest.raises(InferenceInputError, match="1 of 2 rows failed; row 1, field 'a'"):
        encode_outputs(frame, [TensorSpec("prediction", "INT64", (-1,))])
