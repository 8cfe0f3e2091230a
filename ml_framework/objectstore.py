"""Object storage: ``s3://bucket/key`` locations on AWS S3 or an S3-compatible server
(SeaweedFS, MinIO, Ceph), for datasets and result prefixes.

Every process reaches the store through :func:`filesystem`, one ``pyarrow.fs.S3FileSystem``
per process built from the settings (``s3_endpoint_url``, ``s3_region``,
``s3_access_key_id``, ``s3_secret_access_key``; unset keys fall back to the AWS SDK's
default chain). A location is parsed once (:func:`parse_uri`) into an
:class:`ObjectLocation`; pyarrow addresses objects as ``bucket/key``
(:attr:`ObjectLocation.path`). Errors name the URI, never a credential.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ml_framework.errors import ObjectStoreError, ObjectStoreUnavailableError

if TYPE_CHECKING:
    import pyarrow.fs as pafs

    from ml_framework.settings import Settings

SCHEME = "s3://"
DEFAULT_REGION = "us-east-1"
"""The region sent to an S3-compatible server when none is set (what such servers accept)."""
MAX_KEY_BYTES = 1024
"""The longest object key S3 takes, in UTF-8 bytes (AWS S3 User Guide, "Naming Amazon S3
objects")."""
CONNECT_TIMEOUT_S = 5.0
REQUEST_TIMEOUT_S = 60.0

_FILESYSTEMS: dict[tuple, Any] = {}
_LOCK = threading.Lock()


def is_object_uri(value: str | os.PathLike[str]) -> bool:
    """Whether ``value`` names object storage (``s3://...``) rather than a local path."""
    return isinstance(value, str) and value[:5].lower() == SCHEME


@dataclass(frozen=True)
class ObjectLocation:
    """An object or a prefix in a bucket.

    Attributes:
        bucket: the bucket name.
        key: the object key or prefix, without a leading or trailing ``/`` (``""``: the
            whole bucket).
    """

    bucket: str
    key: str

    @property
    def uri(self) -> str:
        """``s3://bucket/key``."""
        return f"{SCHEME}{self.bucket}/{self.key}" if self.key else f"{SCHEME}{self.bucket}"

    @property
    def path(self) -> str:
        """The location as pyarrow's filesystem names it: ``bucket/key``."""
        return f"{self.bucket}/{self.key}" if self.key else self.bucket

    @property
    def name(self) -> str:
        """The last part of the key (the file name)."""
        return self.key.rsplit("/", 1)[-1]

    def child(self, relative: str) -> ObjectLocation:
        """The location ``relative`` (``a/b.parquet``) under this prefix."""
        relative = relative.strip("/")
        return ObjectLocation(self.bucket, f"{self.key}/{relative}" if self.key else relative)

    def under_any(self, prefixes: Iterable[str]) -> bool:
        """Whether this location is one of ``prefixes`` (``s3://bucket/prefix`` each) or lies
        under one, compared by whole key parts: ``s3://b/data`` holds ``s3://b/data/x.csv``,
        not ``s3://b/database.csv``; ``s3://b`` holds the whole bucket.

        Raises:
            ObjectStoreError: an entry of ``prefixes`` is not an ``s3://`` URI.
        """
        for entry in prefixes:
            allowed = parse_uri(entry)
            if self.bucket == allowed.bucket and (
                    not allowed.key or self.key == allowed.key or self.key.startswith(allowed.key + "/")):
                return True
        return False

    def __str__(self) -> str:
        return self.uri


def parse_uri(uri: str) -> ObjectLocation:
    """Split ``s3://bucket/key`` into an :class:`ObjectLocation`.

    Raises:
        ObjectStoreError: not an ``s3://`` URI, no bucket, a bucket name S3 refuses, a
            query or fragment, or ``.`` / ``..`` parts in the key.
    """
    if not is_object_uri(uri):
        raise ObjectStoreError(f"{uri!r} is not an object storage URI (s3://bucket/key)")
    parts = urlsplit(uri)
    bucket = parts.netloc
    key = parts.path.strip("/")
    if "@" in bucket:  # credentials in the URI: never echoed
        shown = f"{SCHEME}***@{bucket.rsplit('@', 1)[1]}{parts.path}"
        raise ObjectStoreError(f"{shown}: an object URI carries no credentials (set s3_access_key_id and "
                               "s3_secret_access_key)")
    if parts.query or parts.fragment:
        raise ObjectStoreError(f"{uri}: an object URI is s3://bucket/key, without query or fragment")
    if not bucket or not (3 <= len(bucket) <= 63) or not all(c.islower() or c.isdigit() or c in ".-" for c in bucket):
        raise ObjectStoreError(f"{uri}: {bucket!r} is not a bucket name (3-63 lower-case letters, digits, '.', '-')")
    if len(key.encode()) > MAX_KEY_BYTES:
        raise ObjectStoreError(f"{uri[:200]}...: a key is at most {MAX_KEY_BYTES} bytes (S3's limit), this one "
                               f"{len(key.encode())}")
    if any(p in ("", ".", "..") for p in key.split("/")) and key:
        raise ObjectStoreError(f"{uri}: empty, '.' or '..' parts in the key")
    return ObjectLocation(bucket, key)


def filesystem(settings: Settings) -> pafs.S3FileSystem:
    """The process's ``pyarrow.fs.S3FileSystem`` for these settings (made once per set of
    endpoint, region and credentials; thread-safe).

    The settings hold both credentials or neither (refused at load otherwise).

    Raises:
        ObjectStoreError: pyarrow was built without S3 support.
    """
    key_id = settings.s3_access_key_id.get_secret_value() if settings.s3_access_key_id else None
    secret = settings.s3_secret_access_key.get_secret_value() if settings.s3_secret_access_key else None
    ident = (settings.s3_endpoint_url, settings.s3_region, key_id, secret)
    with _LOCK:
        fs = _FILESYSTEMS.get(ident)
        if fs is None:
            fs = _FILESYSTEMS[ident] = _make(settings.s3_endpoint_url, settings.s3_region, key_id, secret)
        return fs


def _make(endpoint: str | None, region: str | None, key_id: str | None, secret: str | None) -> pafs.S3FileSystem:
    try:
        from pyarrow.fs import S3FileSystem
    except ImportError as exc:  # pragma: no cover - every pyarrow wheel has S3
        raise ObjectStoreError("this pyarrow has no S3 support (install the pyarrow wheel from PyPI)") from exc
    kwargs: dict[str, Any] = {"connect_timeout": CONNECT_TIMEOUT_S, "request_timeout": REQUEST_TIMEOUT_S,
                              "region": region or (DEFAULT_REGION if endpoint else None)}
    if endpoint:
        parts = urlsplit(endpoint)
        kwargs.update(endpoint_override=parts.netloc, scheme=parts.scheme)
    if key_id is not None:
        kwargs.update(access_key=key_id, secret_key=secret)
    return S3FileSystem(**{k: v for k, v in kwargs.items() if v is not None})


_SERVER_FAULTS = ("ACCESS_DENIED", "AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId", "NETWORK_CONNECTION",
                  "connect", "Connection", "Timeout", "timed out", "SERVICE_UNAVAILABLE", "INTERNAL_FAILURE",
                  "SlowDown", "HTTP response code: 5")
"""Words of pyarrow's (AWS SDK's) error text that mean the store refused this process's
credentials, could not be reached or failed: not the caller's doing."""


def store_error(location: ObjectLocation | str, exc: BaseException, doing: str) -> ObjectStoreError:
    """The error to raise for a failed ``doing`` on ``location``:
    :class:`~ml_framework.errors.ObjectStoreUnavailableError` when the store refused this
    process's credentials, could not be reached or failed (:data:`_SERVER_FAULTS`), else
    :class:`~ml_framework.errors.ObjectStoreError`; the message as :func:`describe_error`."""
    text = str(exc)
    kind = ObjectStoreUnavailableError if any(word in text for word in _SERVER_FAULTS) else ObjectStoreError
    return kind(describe_error(location, exc, doing))


def describe_error(location: ObjectLocation | str, exc: BaseException, doing: str) -> str:
    """A one-line message for a failed ``doing`` on ``location``, naming the URI and the
    server's reason without any credential (pyarrow's messages carry none; the settings'
    secrets are removed anyway)."""
    reason = " ".join(str(exc).split())
    return f"{location}: cannot {doing}: {reason}"
