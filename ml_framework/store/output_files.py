"""Results in object storage: a job's shard results as Parquet files under its output prefix.

A job submitted with ``output_uri`` (``s3://bucket/prefix``, or a local directory for a
single host) keeps each shard's output table (what :mod:`ml_framework.store.outputs` would
store as a blob: ``row`` int64 first, then one column per output key, same types) as one
Parquet file, instead of in the results database::

    <output_uri>/<job_id>/part-<shard index, 6 digits>.parquet

The name depends only on the job and the shard, so a redelivered shard overwrites the same
file with the same rows: a whole-object PUT is atomic on S3, and a local file is written
under a temporary name then renamed (``os.replace``). The shard ledger counts a shard once,
as for any job; readers read the file of a shard only once the ledger holds it DONE with
rows. Row errors stay in the database (table ``row_errors``).
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ml_framework.errors import ObjectStoreError, ObjectStoreUnavailableError
from ml_framework.objectstore import (
    describe_error,
    filesystem,
    is_object_uri,
    parse_uri,
    store_error,
)

if TYPE_CHECKING:
    from ml_framework.settings import Settings

log = logging.getLogger(__name__)

PART_DIGITS = 6
"""Digits of the zero-padded shard index in a part's name (``part-000042.parquet``): names
sort in shard order up to a million shards (longer indexes just take more digits)."""
READ_THREADS = 8
"""Part files read at once when a page of results spans several shards."""
MAX_URI_CHARS = 2048


def part_name(shard_index: int) -> str:
    """The file name of shard ``shard_index``'s results: ``part-000042.parquet``."""
    return f"part-{shard_index:0{PART_DIGITS}d}.parquet"


def normalize(uri: str) -> str:
    """``uri`` as a job records it: ``s3://bucket/prefix`` (checked, no trailing ``/``) or an
    absolute local directory (``~`` expanded, ``..`` resolved against the working directory).

    Raises:
        ObjectStoreError: an empty value, a malformed ``s3://`` URI, or another scheme
            (``http://``, ``gs://``...), naming the value given.
    """
    text = uri.strip()
    if not text or len(text) > MAX_URI_CHARS or "\x00" in text:
        raise ObjectStoreError(f"output_uri {uri[:100]!r}: give s3://bucket/prefix or a directory path")
    if is_object_uri(text):
        return parse_uri(text).uri
    if "://" in text:
        raise ObjectStoreError(f"output_uri {text!r}: only s3://bucket/prefix or a local directory is supported")
    return str(Path(text).expanduser().absolute().resolve())


@dataclass(frozen=True)
class OutputPrefix:
    """An output prefix opened on its file system.

    Attributes:
        uri: the prefix as the job records it (see :func:`normalize`).
        filesystem: ``pyarrow.fs.S3FileSystem`` (shared by the process) or ``LocalFileSystem``.
        base: the prefix as ``filesystem`` names it (``bucket/key``, or the directory).
    """

    uri: str
    filesystem: pafs.FileSystem
    base: str

    @property
    def local(self) -> bool:
        """Whether the prefix is a local directory."""
        return not is_object_uri(self.uri)

    def job_path(self, job_id: str) -> str:
        """Where job ``job_id``'s parts go, as :attr:`filesystem` names it."""
        return f"{self.base.rstrip('/')}/{job_id}"

    def part_path(self, job_id: str, shard_index: int) -> str:
        """The path of one shard's part file."""
        return f"{self.job_path(job_id)}/{part_name(shard_index)}"

    def part_uri(self, job_id: str, shard_index: int) -> str:
        """The part file of one shard as users name it (``s3://...`` or a path), for messages."""
        return f"{self.uri.rstrip('/')}/{job_id}/{part_name(shard_index)}"

    def write(self, job_id: str, shard_index: int, table: pa.Table) -> None:
        """Write one shard's output table as its part file, replacing any earlier one whole.

        Raises:
            ObjectStoreError: the file cannot be written (no such bucket, refused, full
                disk...), naming the file's URI and the reason, never a credential.
        """
        path = self.part_path(job_id, shard_index)
        try:
            if self.local:
                os.makedirs(self.job_path(job_id), exist_ok=True)
                tmp = f"{path}.tmp-{uuid.uuid4().hex}"
                try:
                    pq.write_table(table, tmp)
                    os.replace(tmp, path)
                finally:
                    if os.path.exists(tmp):
                        os.unlink(tmp)
            else:
                pq.write_table(table, path, filesystem=self.filesystem)
        except (OSError, pa.ArrowException) as exc:
            raise store_error(self.part_uri(job_id, shard_index), exc, "write results") from exc

    def read(self, job_id: str, shard_indices: Sequence[int]) -> list[pa.Table]:
        """The output tables of these shards, in the order given (several read at once).

        Raises:
            ObjectStoreError: a part file is missing or unreadable, naming its URI.
        """
        def one(index: int) -> pa.Table:
            try:
                return pq.read_table(self.part_path(job_id, index), filesystem=self.filesystem)
            except (OSError, pa.ArrowException) as exc:
                # a part of a recorded shard: gone or unreadable is the server's fault, whatever the cause
                raise ObjectStoreUnavailableError(describe_error(self.part_uri(job_id, index), exc,
                                                                 "read results")) from exc

        if len(shard_indices) <= 1:
            return [one(i) for i in shard_indices]
        with ThreadPoolExecutor(min(READ_THREADS, len(shard_indices))) as pool:
            return list(pool.map(one, shard_indices))

    def schema(self, job_id: str, shard_index: int) -> pa.Schema:
        """The columns of one shard's part file, read from its footer only.

        Raises:
            ObjectStoreError: the file is missing or unreadable.
        """
        try:
            with self.filesystem.open_input_file(self.part_path(job_id, shard_index)) as f:
                return pq.read_schema(f)
        except (OSError, pa.ArrowException) as exc:
            raise ObjectStoreUnavailableError(describe_error(self.part_uri(job_id, shard_index), exc,
                                                             "read results")) from exc

    def delete_part(self, job_id: str, shard_index: int) -> None:
        """Remove one shard's part file, if it is there."""
        try:
            self.filesystem.delete_file(self.part_path(job_id, shard_index))
        except FileNotFoundError:
            pass
        except (OSError, pa.ArrowException) as exc:
            raise store_error(self.part_uri(job_id, shard_index), exc, "delete results") from exc

    def delete_job(self, job_id: str) -> int:
        """Remove every file under the job's directory, and the directory.

        Returns:
            The number of files removed (0 when there was none).

        Raises:
            ObjectStoreError: listing or deleting failed, naming the job's URI.
        """
        path = self.job_path(job_id)
        try:
            infos = self.filesystem.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=True))
            files = [i.path for i in infos if i.type == pafs.FileType.File]
            if files or infos:
                self.filesystem.delete_dir(path)
            return len(files)
        except FileNotFoundError:
            return 0
        except (OSError, pa.ArrowException) as exc:
            raise store_error(f"{self.uri.rstrip('/')}/{job_id}", exc, "delete results") from exc


class OutputFiles:
    """Opens output prefixes for one process: S3 ones on the process's S3 file system
    (:func:`ml_framework.objectstore.filesystem`), local ones on the local file system.

    Args:
        settings: the ``s3_*`` settings to reach object storage with; ``None``: the
            process's settings (:func:`~ml_framework.settings.get_settings`), read on first
            use of an ``s3://`` prefix.
    """

    def __init__(self, settings: Settings | None = None) -> None:
        self._settings = settings
        self._lock = threading.Lock()
        self._opened: dict[str, OutputPrefix] = {}

    def open(self, uri: str) -> OutputPrefix:
        """The prefix ``uri`` (as a job records it, see :func:`normalize`) on its file system.

        Raises:
            ObjectStoreError: a malformed URI, or settings that give one S3 credential
                without the other.
        """
        with self._lock:
            found = self._opened.get(uri)
        if found is not None:
            return found
        if is_object_uri(uri):
            location = parse_uri(uri)
            settings = self._settings
            if settings is None:
                from ml_framework.settings import get_settings

                settings = get_settings()
            prefix = OutputPrefix(location.uri, filesystem(settings), location.path)
        else:
            prefix = OutputPrefix(uri, pafs.LocalFileSystem(), uri)
        with self._lock:
            return self._opened.setdefault(uri, prefix)

    def check(self, uri: str) -> str:
        """Normalize ``uri`` and prove, before a job is recorded, that results can go there:
        an ``s3://`` prefix's bucket exists and answers with these credentials; a local
        directory is created if missing and takes a file.

        Returns:
            The URI the job records (:func:`normalize`).

        Raises:
            ObjectStoreError: malformed, unknown bucket, refused, unreachable, or a
                directory that cannot be written, naming ``uri`` and never a credential.
        """
        value = normalize(uri)
        prefix = self.open(value)
        if prefix.local:
            try:
                os.makedirs(value, exist_ok=True)
                probe = Path(value) / f".mlf-probe-{uuid.uuid4().hex}"
                probe.write_bytes(b"")
                probe.unlink()
            except OSError as exc:
                raise ObjectStoreError(f"output_uri {value}: cannot write there: {exc.strerror or exc}") from None
            return value
        bucket = parse_uri(value).bucket
        try:
            info = prefix.filesystem.get_file_info(bucket)
        except (OSError, pa.ArrowException) as exc:
            error = store_error(value, exc, "reach the bucket")
            raise type(error)(f"output_uri {error}") from None
        if info.type != pafs.FileType.Directory:
            raise ObjectStoreError(f"output_uri {value}: no bucket {bucket!r} on the object store "
                                   "(create it, or name another)")
        return value
