"""The parts of a model manifest that describe tensors: what one row of input is, how it is
prepared, what the model returns, and the runtime's options.

Input kinds (``inputs.kind``):

- ``columns`` (default): numeric dataset columns, one value each, reshaped to
  ``inputs.shape`` (e.g. 64 pixel columns -> ``[1, 8, 8]``).
- ``tensor``: one column holding a whole tensor per row (Arrow ``fixed_size_list``, the
  ``arrow.fixed_shape_tensor`` extension type or a list), a ``.npy`` array of shape
  ``(N, *shape)``, or an in-memory array of that shape.
- ``image``: one column of image file paths under the data directory (or a directory of
  images), decoded, resized, cropped and normalised by the worker per ``preprocessing``.
- ``text``: one string column, tokenized by the worker with the ``tokenizer`` the
  manifest declares (a Hugging Face ``tokenizers`` file in the version directory).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    StrictFloat,
    StrictInt,
    StrictStr,
    model_validator,
)

from ml_framework.constants import MAX_INT32

FiniteFloat = Annotated[StrictFloat, Field(allow_inf_nan=False)]
BatchSize = Annotated[PositiveInt, Field(le=MAX_INT32)]
InputKind = Literal["columns", "tensor", "image", "text"]
ONE_COLUMN_KINDS = ("tensor", "image", "text")
"""Input kinds fed by exactly one dataset column."""
TokenFeature = Literal["input_ids", "attention_mask", "token_type_ids"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _size(value: int | list[int] | None) -> tuple[int, int] | None:
    """``(height, width)`` of a size given as one side (a square) or ``[height, width]``."""
    if value is None:
        return None
    if isinstance(value, int):
        return value, value
    return int(value[0]), int(value[1])


class Preprocessing(_Strict):
    """How input values are prepared before the model sees them.

    For every input kind but ``text``: ``x * scale + shift``, then, when ``mean`` and
    ``std`` are given, ``(x - mean[c]) / std[c]`` per channel ``c``.

    Image inputs are first decoded to 8-bit pixels (0-255) in ``color`` mode, resized
    (bilinear, with antialiasing, as Pillow does and torchvision's ``Resize`` on PIL
    images), centre-cropped, and laid out as ``layout``. The usual ImageNet recipe
    (torchvision's ``Resize(256)``, ``CenterCrop(224)``, ``ToTensor()``, ``Normalize``)
    is ``resize: 256, crop: 224, scale: 0.00392156862745098`` (1/255), ``mean: [0.485,
    0.456, 0.406], std: [0.229, 0.224, 0.225]`` (the ImageNet channel statistics from
    torchvision's model documentation). A JPEG at least twice the resize target on both
    sides is decoded at a reduced scale first (Pillow's ``draft``), then resized as above;
    the pixels differ from a full decode by a level or two. EXIF orientation is not
    applied (as torchvision's ``ImageFolder`` loader), and an alpha channel is dropped.

    Attributes:
        scale / shift: element-wise affine transform.
        mean / std: per-channel normalisation after ``scale`` / ``shift``; one value per
            channel (the channel axis is the first of a row for ``NCHW`` images and
            tensors, the last for ``NHWC`` images).
        resize: images: one number resizes the shorter side to it, keeping the aspect
            ratio; ``[height, width]`` resizes to exactly that.
        crop: images: centre crop to ``[height, width]`` (one number: a square).
        layout: images: ``NCHW`` (channels first, PyTorch's convention) or ``NHWC``
            (channels last, Keras').
        color: images: ``RGB`` (3 channels) or ``L`` (1 channel, greyscale).
    """

    scale: float = 1.0
    shift: float = 0.0
    mean: list[float] | None = Field(default=None, min_length=1)
    std: list[Annotated[float, Field(gt=0)]] | None = Field(default=None, min_length=1)
    resize: PositiveInt | Annotated[list[PositiveInt], Field(min_length=2, max_length=2)] | None = None
    crop: PositiveInt | Annotated[list[PositiveInt], Field(min_length=2, max_length=2)] | None = None
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    color: Literal["RGB", "L"] = "RGB"

    @model_validator(mode="after")
    def _check(self) -> Preprocessing:
        if (self.mean is None) != (self.std is None):
            raise ValueError("preprocessing.mean and preprocessing.std go together")
        if self.mean is not None and len(self.mean) != len(self.std or []):
            raise ValueError(f"preprocessing.mean has {len(self.mean)} values, std {len(self.std or [])}")
        return self

    @property
    def affine(self) -> bool:
        """True when ``scale`` / ``shift`` change values."""
        return self.scale != 1.0 or self.shift != 0.0

    @property
    def channels(self) -> int:
        """Image channels of ``color``."""
        return 3 if self.color == "RGB" else 1

    @property
    def image_size(self) -> tuple[int, int] | None:
        """``(height, width)`` of every prepared image, or ``None`` when it depends on the
        image (no crop and a one-number resize, or neither)."""
        crop = _size(self.crop)
        if crop is not None:
            return crop
        return _size(self.resize) if isinstance(self.resize, list) else None

    def image_shape(self) -> tuple[int, int, int]:
        """Per-row shape of a prepared image: ``(C, H, W)`` for ``NCHW``, ``(H, W, C)`` for
        ``NHWC`` (``H`` and ``W`` are 0 while :attr:`image_size` is ``None``)."""
        height, width = self.image_size or (0, 0)
        return (self.channels, height, width) if self.layout == "NCHW" else (height, width, self.channels)

    def image_fields(self) -> list[str]:
        """The image-only fields set to something other than their default."""
        return [f for f in ("resize", "crop", "layout", "color")
                if getattr(self, f) != Preprocessing.model_fields[f].default]


class TokenizerSpec(_Strict):
    """How a ``text`` input is tokenized (Hugging Face ``tokenizers``, as the model's
    training pipeline did it).

    Attributes:
        file: the tokenizer's ``tokenizer.json`` in the model version's directory.
        max_length: most tokens per row, special tokens included.
        truncation: cut longer texts at ``max_length``; false fails such a row with a
            row error naming its token count.
        padding: ``longest``: pad each batch to its longest row (fastest); ``max_length``:
            pad every row to ``max_length`` (models exported with a fixed length).
        features: the tokenizer outputs passed to the model, in this order, as its
            positional inputs, each ``(N, length)`` of ``inputs.dtype``.
    """

    file: str = Field(default="tokenizer.json", min_length=1)
    max_length: PositiveInt
    truncation: bool = True
    padding: Literal["longest", "max_length"] = "longest"
    features: list[TokenFeature] = Field(default=["input_ids", "attention_mask"], min_length=1)

    @model_validator(mode="after")
    def _check(self) -> TokenizerSpec:
        if "/" in self.file or self.file in {".", ".."}:
            raise ValueError(f"tokenizer.file must be a name inside the version directory, got {self.file!r}")
        if len(set(self.features)) != len(self.features):
            raise ValueError(f"tokenizer.features has duplicates: {self.features}")
        return self


class InputSpec(_Strict):
    """What one row of input is.

    Attributes:
        kind: ``columns``, ``tensor``, ``image`` or ``text`` (see the module docstring).
        columns: dataset columns fed to the model, in this order (one for every kind but
            ``columns``).
        dtype: NumPy dtype name of the model input (``float32``; ``int64`` for text).
        shape: per-row tensor shape, batch dimension excluded. ``columns``: the row's
            values (in ``columns`` order) are reshaped to it; default ``[len(columns)]``.
            ``tensor``: required, each row's tensor has it. ``image``: optional, checked
            against ``preprocessing`` (``[C, H, W]`` or ``[H, W, C]``). The model sees
            ``(N, *shape)``.
        allow_missing: when false, a row with an empty / NaN value (a null tensor, a null
            text) fails with a row error; when true, missing numbers become NaN.
    """

    kind: InputKind = "columns"
    columns: list[str] = Field(min_length=1)
    dtype: Literal["float32", "float64", "int32", "int64"] = "float32"
    shape: list[PositiveInt] | None = None
    allow_missing: bool = False

    @model_validator(mode="before")
    @classmethod
    def _text_ids_are_integers(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("kind") == "text" and "dtype" not in data:
            return {**data, "dtype": "int64"}
        return data

    @model_validator(mode="after")
    def _check(self) -> InputSpec:
        if len(set(self.columns)) != len(self.columns):
            raise ValueError("inputs.columns has duplicate names")
        if self.kind in ONE_COLUMN_KINDS:
            if len(self.columns) != 1:
                raise ValueError(f"inputs.kind {self.kind} takes exactly one column, {len(self.columns)} given")
            if self.kind == "tensor" and self.shape is None:
                raise ValueError("inputs.shape is required for inputs.kind tensor (the per-row tensor shape)")
            if self.kind == "text" and self.dtype not in ("int32", "int64"):
                raise ValueError(f"inputs.dtype of a text input is int32 or int64 (token ids), not {self.dtype}")
            if self.kind == "text" and self.shape is not None:
                raise ValueError("inputs.shape does not apply to text inputs (tokenizer.max_length does)")
        elif self.shape is not None and math.prod(self.shape) != len(self.columns):
            raise ValueError(
                f"inputs.shape {self.shape} holds {math.prod(self.shape)} values but "
                f"inputs.columns names {len(self.columns)}"
            )
        return self

    @property
    def column(self) -> str:
        """The one input column of a ``tensor``, ``image`` or ``text`` input."""
        return self.columns[0]

    @property
    def row_shape(self) -> tuple[int, ...]:
        """Per-row shape the model receives (batch dimension excluded), as declared; see
        :meth:`ModelManifest.row_shape` for image and text inputs."""
        return tuple(self.shape) if self.shape else (len(self.columns),)

    @property
    def values_per_row(self) -> int:
        """Numbers in one row's tensor."""
        return math.prod(self.row_shape)


class OutputSpec(_Strict):
    """What the model returns per row and how it becomes a result.

    Attributes:
        kind: ``classification``: the model returns ``(N, K)`` scores, the result holds
            ``prediction`` (a label), ``score`` and ``probabilities``; ``regression``:
            ``(N,)`` or ``(N, 1)`` -> ``prediction``; ``embedding``: ``(N, D)`` -> ``embedding``.
        labels: class labels (strings or numbers, as they should appear in results),
            index ``k`` naming score column ``k`` (classification). Quote labels that
            YAML would read as dates or booleans.
        activation: ``softmax`` when the model returns logits, ``none`` when it already
            returns probabilities.
        size: ``K`` or ``D``; checked against what the model returns.
    """

    kind: Literal["classification", "regression", "embedding"]
    labels: list[StrictStr | StrictInt | FiniteFloat] | None = None
    activation: Literal["none", "softmax"] = "none"
    size: PositiveInt | None = None

    @model_validator(mode="after")
    def _check(self) -> OutputSpec:
        if self.kind == "classification":
            if not self.labels:
                raise ValueError("outputs.labels is required for kind: classification")
            if len(set(self.labels)) != len(self.labels):
                raise ValueError(f"outputs.labels has duplicates: {self.labels}")
            if self.size is not None and self.size != len(self.labels):
                raise ValueError(f"outputs.size {self.size} != {len(self.labels)} labels")
        return self

    @property
    def width(self) -> int | None:
        """Expected output width per row (``K`` or ``D``), ``None`` if not declared."""
        if self.kind == "classification":
            return len(self.labels or [])
        return self.size


class RuntimeOptions(_Strict):
    """Inference fast paths of one model version; every default is the safe choice.

    Attributes:
        inference_mode: torch: run under ``torch.inference_mode()`` (no autograd
            bookkeeping); false falls back to ``torch.no_grad()`` for models that
            mutate tensors in place under inference mode.
        precision: torch: ``fp32`` (default), or ``bf16`` / ``fp16`` to run the forward
            pass under ``torch.autocast`` with that dtype. Outputs are returned as float32.
            bf16 keeps fp32's exponent range; fp16 can overflow on large activations.
        pin_memory: torch on a GPU: stage each batch in page-locked host buffers that are
            reused between batches and copy them with ``non_blocking=True``. Ignored on CPU.
        jit_compile: tensorflow: compile the forward pass with XLA
            (``tf.function(jit_compile=True)``); each new batch shape compiles once.
        warmup: run one batch of zeros right after loading, so the first real batch
            does not pay for lazy initialisation (cuDNN autotuning, XLA compilation).
    """

    inference_mode: bool = True
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    pin_memory: bool = True
    jit_compile: bool = False
    warmup: bool = True


class OnnxSpec(_Strict):
    """Which tensors of an ONNX graph (framework ``onnx``) the model's input feeds and its
    output comes from, by name. Both are checked against the graph when the model is
    added and when a worker loads it.

    Attributes:
        input: the graph input fed with the ``(N, *row_shape)`` rows; default: the
            graph's only input.
        output: the graph output read as the model's ``(N, K)`` / ``(N,)`` outputs;
            default: the graph's only output. A classifier converted with skl2onnx has two,
            ``label`` and ``probabilities``: name ``probabilities``.
    """

    input: str | None = Field(default=None, min_length=1)
    output: str | None = Field(default=None, min_length=1)


class DynamicBatching(_Strict):
    """How a worker batches concurrent online requests for this model (as Triton's
    ``dynamic_batching``): it gathers waiting requests until ``max_batch_size`` rows or
    ``max_queue_delay_ms`` after taking the first, then runs them as one forward pass.

    Attributes:
        max_batch_size: most rows in one gathered forward pass.
        max_queue_delay_ms: longest the first request waits for others, milliseconds.
            Default 0, as Triton's ``max_queue_delay_microseconds``: take only what is
            already queued. Under load, requests queue while the previous batch runs, so
            batches form without anyone waiting; a delay only adds latency when load is
            light. Raise it when a bigger batch is worth that wait (an expensive model on
            a GPU that scales well with batch size).
    """

    max_batch_size: BatchSize = 64
    max_queue_delay_ms: float = Field(default=0.0, ge=0, le=10_000)
