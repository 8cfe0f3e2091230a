"""``image`` inputs: one column of image file paths under the workers' data directory, or
of ``s3://bucket/key`` URIs of images in object storage (read whole, one GET each, through
the ``s3_*`` settings the converter was built with: the worker's).

Each path is resolved by the project's one path rule (:func:`ml_framework.paths.resolve_under`:
relative to the data directory, symbolic links followed without opening anything); a path
that leaves the data directory fails its row and is never read. Each file is decoded with
Pillow and prepared as the manifest's ``preprocessing`` says, in this order:

1. decode; a JPEG at least twice the resize target on both sides is decoded at a reduced
   scale first (Pillow's ``draft``, as ``Image.thumbnail`` does with its default
   ``reducing_gap`` of 2), which is several times faster and leaves at least a 2x
   antialiased downscale to step 3;
2. convert to ``color`` (``RGB`` or ``L``) with Pillow's ``convert``, as torchvision's
   ``ImageFolder`` loader does (an alpha channel is dropped, not composited);
3. ``resize``: one number scales the shorter side to it (the longer one to
   ``int(size * long / short)``, torchvision's ``Resize`` rule), ``[height, width]``
   scales to exactly that; bilinear with antialiasing (Pillow's ``BILINEAR`` filter);
4. ``crop``: centre crop, the offsets rounded as torchvision's ``CenterCrop`` rounds them;
5. to float32, ``x * scale + shift``, then ``(x - mean[c]) / std[c]``, fused into one
   per-channel ``x * a[c] + b[c]``;
6. laid out as ``layout`` (``NCHW`` or ``NHWC``).

Rows are decoded in parallel on a thread pool (Pillow releases the GIL while it decodes
and resizes; NumPy while it scales), each thread writing its row straight into the batch.

Row errors (one row each; the message names the row, the field and the path as given,
never the worker's absolute path): a null or empty path, a path leaving the data
directory, a missing file, a directory, an unreadable or corrupt file, a file that is not
an image, an image smaller than the crop after resizing, and an image of more than
:data:`MAX_PIXELS` pixels, as stored or once resized (a 1 x 60,000 PNG of 200 bytes
resized to 224 on its shorter side would be 3 billion pixels). 16-bit greyscale images
are scaled to 8 bits before step 2.
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image, UnidentifiedImageError

from ml_framework.errors import DatasetPathError, ImageRowError, ObjectStoreError
from ml_framework.manifest import ModelManifest
from ml_framework.objectstore import describe_error, filesystem, is_object_uri, parse_uri
from ml_framework.paths import resolve_under
from ml_framework.settings import Settings, get_settings
from ml_framework.store import RowError
from worker.inputs.base import Converted, InputConverter

DRAFT_GAP = 2
"""A JPEG is decoded at a reduced scale only down to this many times the resize target
(Pillow's ``Image.thumbnail`` default ``reducing_gap``), so an antialiased resize of at
least this factor follows and the result stays close to a full decode."""
MAX_REASON_CHARS = 160
MAX_PIXELS = 89_478_485
"""Most pixels an image may have, as decoded and after resizing: a bigger one fails its
row before it is decoded (or resized), so that a small file cannot make a decoding thread
allocate gigabytes. The number is Pillow's own decompression-bomb threshold
(``PIL.Image.MAX_IMAGE_PIXELS``, about 0.25 GiB of 24-bit pixels), where Pillow only warns."""


def output_size(width: int, height: int, resize: int | list[int] | None) -> tuple[int, int]:
    """``(width, height)`` of an image of ``width`` x ``height`` pixels after ``resize``.

    One number sets the shorter side, the longer one becoming ``int(resize * long / short)``
    (torchvision's ``Resize`` rule); ``[height, width]`` is taken as it is; ``None`` keeps
    the size.
    """
    if resize is None:
        return width, height
    if isinstance(resize, list):
        return int(resize[1]), int(resize[0])
    if width <= height:
        return resize, int(resize * height / width)
    return int(resize * width / height), resize


def crop_box(width: int, height: int, crop: tuple[int, int]) -> tuple[int, int, int, int]:
    """Pillow's ``(left, top, right, bottom)`` of the centre ``crop`` (``(height, width)``)
    of a ``width`` x ``height`` image, the offsets rounded as torchvision's ``CenterCrop``."""
    top = round((height - crop[0]) / 2.0)
    left = round((width - crop[1]) / 2.0)
    return left, top, left + crop[1], top + crop[0]


class ImageConverter(InputConverter):
    """One column of image paths -> ``(n, C, H, W)`` or ``(n, H, W, C)`` float input (the
    manifest's ``row_shape`` and ``inputs.dtype``; see the module docstring).

    Args:
        manifest / directory / data_dir: see :class:`InputConverter`; ``data_dir`` is
            where the paths are resolved (without it every row fails).
        threads: decoding threads (default: the CPU count).
        settings: see :class:`InputConverter`: their ``s3_*`` reach ``s3://`` images.
    """

    def __init__(self, manifest: ModelManifest, directory: Path, data_dir: Path | None = None,
                 threads: int | None = None, settings: Settings | None = None) -> None:
        super().__init__(manifest, directory, data_dir, threads, settings)
        prep = self.preprocessing
        size = prep.image_size
        if size is None:  # the manifest refuses this; kept for converters built by hand
            raise ValueError("image inputs need a fixed image size (preprocessing.crop or resize [h, w])")
        self.size = size
        self.crop = (int(prep.crop), int(prep.crop)) if isinstance(prep.crop, int) else (
            tuple(prep.crop) if prep.crop is not None else None)
        self.mode = prep.color
        mean = np.asarray(prep.mean if prep.mean is not None else [0.0] * prep.channels, dtype=np.float64)
        std = np.asarray(prep.std if prep.std is not None else [1.0] * prep.channels, dtype=np.float64)
        # (p * scale + shift - mean) / std == p * a + b, per channel, computed once in float64
        self.a = (prep.scale / std).astype(np.float32)
        self.b = ((prep.shift - mean) / std).astype(np.float32)
        self.workers = max(1, threads or os.cpu_count() or 1)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    def _convert(self, table: pa.Table, columns: Sequence[str], row_start: int) -> Converted:
        """See :meth:`InputConverter.convert`. Rows are decoded on :attr:`workers` threads."""
        name = columns[0]
        paths = table.column(name).to_pylist()
        n = len(paths)
        x = np.empty((n, *self.manifest.row_shape), dtype=self.spec.dtype)
        rows = np.arange(row_start, row_start + n, dtype=np.int64)

        def one(i: int) -> RowError | None:
            try:
                self.prepare(paths[i], x[i])
            except ImageRowError as exc:
                return RowError(row_start + i, f"row {row_start + i}, field {name!r}: {exc}", name)
            return None

        if n <= 1 or self.workers == 1:
            results = [one(i) for i in range(n)]
        else:
            results = list(self._executor().map(one, range(n)))
        bad = {i: err for i, err in enumerate(results) if err is not None}
        return self.finish(x, rows, bad, row_start, n)

    def transform(self, x: np.ndarray) -> np.ndarray:
        """``x`` unchanged: :meth:`prepare` already applied ``scale`` / ``shift`` /
        ``mean`` / ``std`` per row, on the decoding threads."""
        return x

    def prepare(self, value: object, out: np.ndarray) -> None:
        """Decode the image at path ``value`` (relative to the data directory) into ``out``
        (one row of the batch: ``row_shape`` of the input dtype), fully prepared.

        Raises:
            ImageRowError: the row fails; the message says why and names the path as given.
        """
        pixels = self.load(value)
        if self.preprocessing.layout == "NCHW":
            pixels = pixels.transpose(2, 0, 1)
            a, b = self.a[:, None, None], self.b[:, None, None]
        else:
            a, b = self.a, self.b
        np.multiply(pixels, a, out=out, casting="unsafe")
        out += b

    def load(self, value: object) -> np.ndarray:
        """The image at path ``value`` decoded, converted to ``color``, resized and
        cropped: ``(H, W, C)`` uint8 pixels (0-255), ``(H, W)`` the manifest's image size.

        Raises:
            ImageRowError: no path, a path leaving the data directory, a missing, unreadable
                or corrupt file, or an image smaller than the crop.
        """
        if value is None:
            raise ImageRowError("missing image path (null)")
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                raise ImageRowError(f"image path {value[:60]!r} is not UTF-8 text") from None
        if not isinstance(value, str) or not value:
            raise ImageRowError("empty image path")
        if is_object_uri(value):
            source: Path | io.BytesIO = self._object(value)
            where = Path(value)  # nothing of the worker's to hide in a reason
        else:
            if self.data_dir is None:
                raise ImageRowError(f"image {value!r}: this worker has no data directory to read it from")
            try:
                source = where = resolve_under(self.data_dir, value)
            except DatasetPathError:
                raise ImageRowError(f"image {value!r}: leaves the data directory; refused without reading it") \
                    from None
        try:
            with Image.open(source) as im:
                return self._prepared(im, value)
        except ImageRowError:
            raise
        except FileNotFoundError:
            raise ImageRowError(f"image {value!r}: not found in the data directory") from None
        except IsADirectoryError:
            raise ImageRowError(f"image {value!r}: a directory, not an image file") from None
        except PermissionError:
            raise ImageRowError(f"image {value!r}: cannot be read (permission denied)") from None
        except UnidentifiedImageError:
            raise ImageRowError(f"image {value!r}: not an image file Pillow can read (corrupt, or "
                                "another kind of file)") from None
        except Exception as exc:  # noqa: BLE001 - any decoder failure fails this row only
            raise ImageRowError(f"image {value!r}: cannot be decoded: {self._reason(exc, where, value)}") from None

    def _prepared(self, im: Image.Image, value: str) -> np.ndarray:
        prep = self.preprocessing
        width, height = im.size
        if width * height > MAX_PIXELS:
            raise ImageRowError(f"image {value!r}: {width}x{height} (width x height) is {width * height:,} pixels, "
                                f"more than the {MAX_PIXELS:,} a worker decodes")
        target = output_size(width, height, prep.resize)
        if target[0] * target[1] > MAX_PIXELS:
            raise ImageRowError(f"image {value!r}: {width}x{height} (width x height) would be resized to "
                                f"{target[0]}x{target[1]}, more than the {MAX_PIXELS:,} pixels a worker prepares "
                                "(its sides are too unequal for this resize)")
        if im.mode == "F":
            raise ImageRowError(f"image {value!r}: floating-point pixels (Pillow mode F) are not supported; "
                                "save the image with 8 or 16 bits per channel")
        if im.mode == "I" or im.mode.startswith("I;16"):
            im = self._to_8_bits(im, value)
        if im.format == "JPEG" and prep.resize is not None:
            w, h = output_size(*im.size, prep.resize)
            if im.size[0] >= DRAFT_GAP * w and im.size[1] >= DRAFT_GAP * h:
                im.draft(None, (DRAFT_GAP * w, DRAFT_GAP * h))  # scale only; convert sets the mode
        if im.mode != self.mode:
            im = im.convert(self.mode)
        size = output_size(*im.size, prep.resize)
        if size != im.size:
            im = im.resize(size, Image.Resampling.BILINEAR)
        if self.crop is not None:
            if im.size[0] < self.crop[1] or im.size[1] < self.crop[0]:
                raise ImageRowError(f"image {value!r}: {im.size[0]}x{im.size[1]} (width x height) after "
                                    f"resizing, smaller than the crop {self.crop[1]}x{self.crop[0]}")
            if im.size != (self.crop[1], self.crop[0]):
                im = im.crop(crop_box(*im.size, self.crop))
        pixels = np.asarray(im)
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        if pixels.shape[:2] != self.size:  # resize [h, w] with no crop always gives the size
            raise ImageRowError(f"image {value!r}: {pixels.shape[1]}x{pixels.shape[0]} after preparing, the "
                                f"model takes {self.size[1]}x{self.size[0]}")
        return pixels

    def _object(self, value: str) -> io.BytesIO:
        """The bytes of the image object ``value`` (``s3://bucket/key``), read whole,
        through :attr:`settings` (the process's when ``None``).

        Raises:
            ImageRowError: a malformed URI, a missing object, a file that is not an image,
                or the store refused or could not be reached (naming the URI, never a
                credential).
        """
        try:
            location = parse_uri(value)
            with filesystem(get_settings() if self.settings is None else self.settings).open_input_file(location.path) as f:
                data = io.BytesIO(f.read())
        except ObjectStoreError as exc:
            raise ImageRowError(str(exc)) from None
        except FileNotFoundError:
            raise ImageRowError(f"image {value!r}: not found in object storage") from None
        except OSError as exc:
            raise ImageRowError(describe_error(value, exc, "read the image")[:MAX_REASON_CHARS + 80]) from None
        return data

    @staticmethod
    def _to_8_bits(im: Image.Image, value: str) -> Image.Image:
        """A 16-bit greyscale image (Pillow modes ``I;16*``, or ``I`` holding 0-65535) as
        8-bit ``L``: ``round(v * 255 / 65535)``. Pillow's ``convert`` would clip every value
        above 255 instead, turning the image nearly white."""
        pixels = np.asarray(im).astype(np.int64)
        if pixels.size and (pixels.min() < 0 or pixels.max() > 65535):
            raise ImageRowError(f"image {value!r}: 32-bit integer pixels outside 0-65535 are not supported")
        return Image.fromarray(((pixels * 255 + 32767) // 65535).astype(np.uint8), "L")

    def _reason(self, exc: Exception, path: Path, value: str) -> str:
        """``exc`` as text for a user: the worker's absolute paths replaced by the path as
        given, cut at :data:`MAX_REASON_CHARS`."""
        text = str(exc) or type(exc).__name__
        for secret, shown in ((str(path), value), (str(self.data_dir), "<data dir>"),
                              (os.path.abspath(self.data_dir or "."), "<data dir>")):
            text = text.replace(secret, shown)
        return text if len(text) <= MAX_REASON_CHARS else text[:MAX_REASON_CHARS] + "..."

    def _executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="mlf-image")
            return self._pool
