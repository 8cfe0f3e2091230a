"""Directories of image files as datasets: one row per image, in path order.

Such a dataset has one column, :data:`IMAGE_COLUMN`, of paths. The producer lists the
directory once, at submit, and sends each shard's paths in its message (relative to the
data directory; the full ``s3://`` URIs of images under an object prefix), so a file added
later does not shift the rows of a running job. Workers read and decode the files
themselves (see ``worker.inputs.image``), so a local directory must lie under the data
directory.
"""

from __future__ import annotations

from ml_framework.datasets.common import DatasetInfo
from ml_framework.datasets.source import Source
from ml_framework.errors import DatasetFormatError

IMAGE_COLUMN = "path"
"""The one column of a directory of images."""
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
"""Files taken as images (case-insensitive); Pillow decodes each of these formats."""


def skipped(relative: str) -> bool:
    """Whether a file of a dataset directory is left out: a part of its path (relative to
    the directory) starts with ``.`` or ``_`` (as Spark and pyarrow skip such files)."""
    return any(s.startswith((".", "_")) for s in relative.split("/"))


def image_files(path: Source) -> list[str]:
    """The image files under directory ``path`` at any depth, relative to it, in path
    order (names starting with ``.`` or ``_`` skipped, as for Parquet parts)."""
    if path.local is not None:
        root = path.local
        files = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES]
        return sorted(f for f in files if not skipped(f) and (root / f).is_file())
    return [rel for rel, file in path.listing() if file.suffix in IMAGE_SUFFIXES and not skipped(rel)]


def inspect_images(path: Source) -> DatasetInfo:
    """The image files of a directory, as a one-column dataset.

    Raises:
        DatasetFormatError: the directory holds no image file (nor Parquet part).
    """
    files = image_files(path)
    if not files:
        raise DatasetFormatError(f"{path}: is a directory holding no Parquet parts (.parquet, .pq) and no image "
                                 f"files ({', '.join(IMAGE_SUFFIXES)}); a dataset is a CSV, Parquet, Arrow or .npy "
                                 "file, a directory of Parquet parts, or a directory of images")
    return DatasetInfo(path.shown, "images", [IMAGE_COLUMN], len(files), files=tuple(files), source=path)
