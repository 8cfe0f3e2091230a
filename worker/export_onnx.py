"""Publish models as ONNX graphs (framework ``onnx``, served by ONNX Runtime):
:func:`export_onnx_sklearn` converts a fitted scikit-learn estimator with skl2onnx,
:func:`export_onnx_torch` a ``torch.nn.Module`` with ``torch.onnx.export``. Both give the
graph one input named ``input`` with a dynamic batch axis, and validate the graph through
the ONNX runtime before publishing (as every helper in :mod:`worker.export` does). A
``.onnx`` file made elsewhere goes in with ``mlf models add model.onnx --manifest ...``.

Example::

    from worker.export_onnx import export_onnx_sklearn
    export_onnx_sklearn(clf, "models", "digits-onnx",
                        inputs={"columns": [f"pixel_{i}" for i in range(64)]})
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ml_framework.errors import ManifestError
from ml_framework.manifest import InputSpec, ModelManifest, Preprocessing
from worker.export import SpecLike, _dump, _publish

INPUT_NAME = "input"
"""Name of the graph input both helpers create."""
DEFAULT_OPSET = 17
"""ONNX opset of exported graphs: ONNX Runtime 1.17 and later run it on CPU and CUDA."""


def _skl2onnx_type(dtype: str, width: int):
    """skl2onnx's tensor type for ``(None, width)`` rows of ``dtype``."""
    from skl2onnx.common import data_types as t

    types = {"float32": t.FloatTensorType, "float64": t.DoubleTensorType,
             "int64": t.Int64TensorType, "int32": t.Int32TensorType}
    return types[dtype]([None, width])


def export_onnx_sklearn(
    model: Any,
    models_dir: Path | str,
    name: str,
    *,
    inputs: SpecLike,
    outputs: SpecLike | None = None,
    version: int | None = None,
    preprocessing: SpecLike | None = None,
    default_batch_size: int | None = None,
    description: str = "",
    sample: np.ndarray | None = None,
    target_opset: int | None = None,
    dynamic_batching: SpecLike | None = None,
) -> ModelManifest:
    """Convert a fitted scikit-learn estimator to ONNX with skl2onnx and publish it.

    The graph takes ``(N, prod(row_shape))`` rows of ``inputs.dtype``. A classifier is
    converted without ZipMap and served from its ``probabilities`` output ``(N, K)``
    float32, columns in ``classes_`` order; other estimators from their only output.

    Args:
        model: a fitted estimator or pipeline that skl2onnx can convert.
        inputs: input spec (``columns``, ``dtype``, ``shape``...).
        outputs: output spec; default: classification over ``model.classes_`` for
            classifiers, regression otherwise.
        target_opset: ONNX opset (default: :data:`DEFAULT_OPSET`).
        Other arguments: as :func:`worker.export.export_sklearn`.

    Returns:
        The published manifest (``framework: onnx``, ``artifact: model.onnx``).

    Raises:
        ManifestError: invalid spec, the conversion failed, or the graph does not honour
            the spec.
    """
    from skl2onnx import convert_sklearn

    spec = InputSpec.model_validate(_dump(inputs))
    classifier = hasattr(model, "classes_") and hasattr(model, "predict_proba")
    if outputs is None:
        outputs = ({"kind": "classification", "labels": [c.item() if hasattr(c, "item") else c for c in model.classes_]}
                   if hasattr(model, "classes_") else {"kind": "regression"})
    try:
        graph = convert_sklearn(
            model, initial_types=[(INPUT_NAME, _skl2onnx_type(spec.dtype, spec.values_per_row))],
            options={id(model): {"zipmap": False}} if classifier else None,
            target_opset=target_opset or DEFAULT_OPSET)
    except Exception as exc:
        raise ManifestError(f"{name}: skl2onnx could not convert {type(model).__name__}: {exc}") from exc
    names = [o.name for o in graph.graph.output]
    output = "probabilities" if classifier and "probabilities" in names else names[0] if len(names) == 1 else None
    if output is None:
        raise ManifestError(f"{name}: the converted graph has outputs {names}; publish it with "
                            "`mlf models add` and name the one to use in the manifest's onnx.output")
    data = graph.SerializeToString()
    return _publish(
        models_dir, lambda path: path.write_bytes(data), name=name, framework="onnx",
        artifact="model.onnx", inputs=inputs, outputs=outputs, version=version,
        preprocessing=preprocessing, default_batch_size=default_batch_size, trusted_types=None,
        description=description, sample=sample, dynamic_batching=dynamic_batching,
        onnx={"input": INPUT_NAME, "output": output},
    )


def export_onnx_torch(
    model: Any,
    models_dir: Path | str,
    name: str,
    *,
    inputs: SpecLike,
    outputs: SpecLike,
    version: int | None = None,
    preprocessing: SpecLike | None = None,
    default_batch_size: int | None = None,
    description: str = "",
    sample: np.ndarray | None = None,
    opset_version: int = DEFAULT_OPSET,
    dynamo: bool = False,
    dynamic_batching: SpecLike | None = None,
) -> ModelManifest:
    """Export a ``torch.nn.Module`` to ONNX with ``torch.onnx.export`` and publish it.

    The module is exported on CPU in eval mode with two rows of zeros of the input spec
    (``(2, *row_shape)`` of ``inputs.dtype``; images: the prepared image's shape), with
    the batch axis of input and output dynamic. The graph's input is ``input``, its
    output ``output`` (a module returning a tuple answers with the first).

    Two exporters, both offline: by default the TorchScript-based one (``dynamo=False``;
    seconds, no extra package; PyTorch deprecates it but 2.13 still ships it), or with
    ``dynamo=True`` the ``torch.export``-based one (needs ``onnxscript``, in the ``onnx``
    extra; seconds for a small CNN, up to a minute for the first export in a fresh process,
    which sets up onnxscript and ``torch.export``; the one to use for models the
    tracer gets wrong, such as data-dependent control flow captured by ``torch.cond``).

    Args:
        model: the module.
        opset_version: ONNX opset (default :data:`DEFAULT_OPSET`; the dynamo exporter
            may raise it to the lowest its translations support, 18 for torch 2.13).
        dynamo: use the ``torch.export``-based exporter.
        Other arguments: as :func:`worker.export.export_torch`.

    Returns:
        The published manifest (``framework: onnx``, ``artifact: model.onnx``).

    Raises:
        ManifestError: invalid spec, the export failed, or the graph does not honour the spec.
    """
    import torch

    spec = InputSpec.model_validate(_dump(inputs))
    shape = spec.row_shape
    if spec.kind == "image":
        shape = Preprocessing.model_validate(_dump(preprocessing) or {}).image_shape()
    example = torch.zeros((2, *shape), dtype=getattr(torch, spec.dtype))
    model = model.eval().to("cpu")
    names = {"input_names": [INPUT_NAME], "output_names": ["output"], "opset_version": opset_version}
    try:
        if dynamo:
            batch = torch.export.Dim("batch", min=1, max=1 << 24)
            program = torch.onnx.export(model, (example,), dynamic_shapes=({0: batch},), dynamo=True,
                                        verbose=False, **names)
            data = program.model_proto.SerializeToString()
        else:
            buffer = io.BytesIO()
            with warnings.catch_warnings():  # the deprecation of the exporter chosen here, knowingly
                warnings.simplefilter("ignore", DeprecationWarning)
                torch.onnx.export(model, (example,), buffer, dynamo=False,
                                  dynamic_axes={INPUT_NAME: {0: "batch"}, "output": {0: "batch"}}, **names)
            data = buffer.getvalue()
    except Exception as exc:
        raise ManifestError(f"{name}: torch.onnx.export ({'dynamo' if dynamo else 'TorchScript'} exporter) "
                            f"failed: {exc}") from exc
    return _publish(
        models_dir, lambda path: path.write_bytes(data), name=name, framework="onnx",
        artifact="model.onnx", inputs=inputs, outputs=outputs, version=version,
        preprocessing=preprocessing, default_batch_size=default_batch_size, trusted_types=None,
        description=description, sample=sample, dynamic_batching=dynamic_batching,
        onnx={"input": INPUT_NAME, "output": "output"},
    )
