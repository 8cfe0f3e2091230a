"""Directories of image files as datasets: one row per image, in path order.

Such a dataset has one column, :data:`IMAGE_COLUMN`, of paths. The producer lists the
directory once, at submit, and sends each shard's paths in its message (relative to the
data directory), so a file added later does not shift the rows of a running job. Workers
read and decode the files themselves (see ``worker.inputs.image``), so the directory must
lie under the data directory.
"""

from __future__ import annotations

from pathlib import Path

from ml_framework.datasets.common import DatasetInfo
from ml_framework.errors import DatasetFormatError

IMAGE_COLUMN = "path"
"""The one column of a directory of images."""
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
"""Files taken as images (case-insensitive); Pillow decodes each of these formats."""


def image_files(path: Path) -> list[str]:
    """The image files under directory ``path`` at any depth, relative to it, in path
    order (names starting with ``.`` or ``_`` skipped, as for Parquet parts)."""
    files = []
    for p in path.rglob("*"):
        rel = p.relative_to(path)
        if p.suffix.lower() in IMAGE_SUFFIXES and not any(s.startswith((".", "_")) for s in rel.parts) and p.is_file():
            files.append(rel.as_posix())
    return sorted(files)


def inspect_images(path: Path) -> DatasetInfo:
    """The image files of a directory, as a one-column dataset.

    Raises:
        DatasetFormatError: the directory holds no image file (nor Parquet part).
    """
    files = image_files(path)
    if not files:
        raise DatasetFormatError(f"{path}: is a directory holding no Parquet parts (.parquet, .pq) and no image "
                                 f"files ({', '.join(IMAGE_SUFFIXES)}); a dataset is a CSV, Parquet, Arrow or .npy "
                                 "file, a directory of Parquet parts, or a directory of images")
    return DatasetInfo(path, "images", [IMAGE_COLUMN], len(files), files=tuple(files))
