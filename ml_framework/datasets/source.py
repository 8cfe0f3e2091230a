"""Where a dataset's bytes are: a local path or an object (``s3://bucket/key``), behind one
``pyarrow.fs`` filesystem, so that every reader opens either the same way.

A :class:`Source` is a file or a directory (a prefix of objects). Readers open it as a
random-access file (:meth:`Source.open_file`: an object is read with ranged GETs, never
downloaded whole), as a sequential stream (:meth:`Source.open_stream`, CSV) or as text
(:meth:`Source.text`); they list a directory with :meth:`Source.listing`. Local paths keep
their fast paths (``np.load`` memory maps, ``stat``-keyed caches) through
:attr:`Source.local`. Caches of a reader are keyed by :meth:`Source.version`: inode, size,
mtime and ctime of a local file; size and modification time of an object.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.fs as pafs

from ml_framework.errors import DatasetNotFoundError, ObjectStoreError
from ml_framework.objectstore import filesystem, is_object_uri, parse_uri, store_error

if TYPE_CHECKING:
    from ml_framework.settings import Settings

__all__ = ["Source", "as_source", "fingerprint", "object_source", "require"]

_LOCAL = pafs.LocalFileSystem()


@dataclass(frozen=True)
class Source:
    """A dataset file or directory on a filesystem.

    Attributes:
        fs: the ``pyarrow.fs`` filesystem holding it (local, or S3).
        path: the location as ``fs`` names it (an absolute local path, or ``bucket/key``).
        shown: what messages and :attr:`DatasetInfo.path` show: the absolute local
            :class:`~pathlib.Path`, or the ``s3://`` URI (``str``).
        stamp: the object's version when already known from a listing (see :meth:`version`).
    """

    fs: pafs.FileSystem = field(compare=False, repr=False)
    path: str
    shown: Path | str
    stamp: tuple | None = field(default=None, compare=False, repr=False)

    @classmethod
    def of_path(cls, path: Path | str) -> Source:
        """A local file or directory (made absolute)."""
        path = Path(path).absolute()
        return cls(_LOCAL, str(path), path)

    @property
    def local(self) -> Path | None:
        """The local path; ``None`` for an object."""
        return self.shown if isinstance(self.shown, Path) else None

    @property
    def name(self) -> str:
        """The last part of the path (the file name)."""
        return PurePosixPath(self.path).name

    @property
    def suffix(self) -> str:
        """The file name's suffix, lower case (``.csv``)."""
        return PurePosixPath(self.path).suffix.lower()

    def __str__(self) -> str:
        return str(self.shown)

    def info(self) -> pafs.FileInfo:
        """The file's type, size and modification time (one HEAD or listing for an object).

        Raises:
            ObjectStoreError: the store refused or could not be reached (naming the URI).
        """
        try:
            return self.fs.get_file_info(self.path)
        except OSError as exc:
            raise store_error(self.shown, exc, "read") from exc

    def version(self) -> tuple:
        """What changes when the file does: ``(inode, size, mtime_ns, ctime_ns)`` of a local
        file (a copy that keeps the mtime still changes the ctime), ``(size, mtime_ns)`` of
        an object (pyarrow does not expose ETags).

        Raises:
            OSError: the file cannot be examined (readers name it).
        """
        if self.local is not None:
            st = self.local.stat()
            return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns
        if self.stamp is not None:
            return self.stamp
        info = self.fs.get_file_info(self.path)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"{self.shown}: no such object")
        return info.size, info.mtime_ns

    def is_dir(self) -> bool:
        """Whether this is a directory (a prefix of objects) rather than one file."""
        if self.local is not None:
            return self.local.is_dir()
        return self.stamp is None and self.info().type == pafs.FileType.Directory

    def open_file(self) -> pa.NativeFile:
        """The file for random access (an object: ranged GETs as it is read)."""
        if self.local is not None:
            return pa.OSFile(self.path, "rb")
        return self.fs.open_input_file(self.path)

    def open_stream(self) -> pa.NativeFile:
        """The file for reading front to back."""
        return self.fs.open_input_stream(self.path)

    @contextmanager
    def text(self, encoding: str, errors: str = "strict") -> Iterator[io.TextIOBase]:
        """The file as text, newlines untranslated (what the ``csv`` module reads)."""
        if self.local is not None:
            with open(self.local, newline="", encoding=encoding, errors=errors) as f:
                yield f
            return
        with self.open_stream() as raw, io.TextIOWrapper(raw, encoding=encoding, errors=errors, newline="") as f:
            yield f

    def child(self, relative: str, stamp: tuple | None = None) -> Source:
        """The file ``relative`` (POSIX) under this directory."""
        if self.local is not None:
            return Source.of_path(self.local / relative)
        return Source(self.fs, f"{self.path}/{relative}", f"{self.shown}/{relative}", stamp)

    def listing(self) -> list[tuple[str, Source]]:
        """Every file under this directory at any depth, as ``(path relative to it, file)``
        in path order; an object's version comes from the listing (no HEAD per file).

        Raises:
            ObjectStoreError: the store refused or could not be reached (naming the URI).
        """
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=True))
        except OSError as exc:
            raise store_error(self.shown, exc, "list") from exc
        out = []
        for info in infos:
            if info.type == pafs.FileType.File:
                rel = info.path[len(self.path.rstrip("/")) + 1:]
                out.append((rel, self.child(rel, (info.size, info.mtime_ns))))
        return sorted(out, key=lambda item: item[0])


def fingerprint(source: Source) -> str:
    """What identifies the dataset's bytes as they are now, for a worker to check that the
    rows of its shard are still the rows the job was planned over: ``size-mtime_ns`` of a
    file or object (pyarrow exposes no ETag), or for a directory or prefix ``dir-`` and the
    first 16 hex digits of the SHA-256 of every file's path, size and modification time
    (one listing).

    Raises:
        OSError, ObjectStoreError: the file cannot be examined (readers name it).
    """
    if source.is_dir():
        digest = hashlib.sha256()
        for rel, part in source.listing():
            size, mtime = _size_mtime(part)
            digest.update(f"{rel}\0{size}\0{mtime}\n".encode())
        return "dir-" + digest.hexdigest()[:16]
    size, mtime = _size_mtime(source)
    return f"{size}-{mtime}"


def _size_mtime(source: Source) -> tuple[int, int]:
    version = source.version()  # local: (inode, size, mtime_ns, ctime_ns); object: (size, mtime_ns)
    return (version[1], version[2]) if source.local is not None else (version[0], version[1])


def object_source(uri: str, settings: Settings) -> Source:
    """The object or prefix ``uri`` (``s3://bucket/key``) on the store the settings name.

    Raises:
        ObjectStoreError: a malformed URI, or settings with one credential of two.
    """
    location = parse_uri(uri)
    return Source(filesystem(settings), location.path, location.uri)


def as_source(path: Path | str | Source) -> Source:
    """``path`` as a :class:`Source` (a local path; a :class:`Source` as it is).

    Raises:
        ObjectStoreError: an ``s3://`` URI given as text: it needs the settings'
            filesystem (:func:`object_source`).
    """
    if isinstance(path, Source):
        return path
    if is_object_uri(path):
        raise ObjectStoreError(f"{path}: an object URI is opened with object_source(uri, settings)")
    return Source.of_path(path)


def require(source: Source) -> pafs.FileInfo:
    """``source``'s info, when it exists.

    Raises:
        DatasetNotFoundError: no such file, object or prefix (naming it).
        ObjectStoreError: the store refused or could not be reached.
    """
    info = source.info()
    if info.type == pafs.FileType.NotFound:
        raise DatasetNotFoundError(f"dataset not found: {source}")
    return info
