"""What a request to the HTTP API names, checked before anything is read: the dataset path
(relative to the data directory, or an ``s3://`` URI under an allowed prefix), the job's
``output_uri`` (under an operator-allowed prefix) and the ``Idempotency-Key`` header."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from ml_framework.errors import (
    DatasetNotFoundError,
    DatasetPathError,
    IdempotencyKeyError,
    JobOptionError,
    ObjectStoreError,
)
from ml_framework.objectstore import is_object_uri, parse_uri
from ml_framework.paths import exists, resolve_under, suggest_under
from ml_framework.settings import Settings
from ml_framework.store.idempotency import check_key
from producer.api.errors import public

_SF_STRING = re.compile(r'"((?:[^"\\]|\\["\\])*)"')
_SF_ESCAPE = re.compile(r'\\(["\\])')
IDEMPOTENCY_KEY_PATTERN = r'^(?:"(?:[ !#-\[\]-~]|\\["\\]){1,255}"|[!#-~](?:[ -~]{0,253}[!-~])?)$'
"""A key of 1 to 255 printable ASCII characters, bare or as a structured-field string."""
IDEMPOTENCY_DOC = ("Makes a retry safe (IETF draft-ietf-httpapi-idempotency-key-header): a repeat with this key "
                   "and the same body from the same API key within idempotency_window (default 24 h) returns the "
                   "job it submitted, with 200; the same key with another body is refused with 422. A quoted "
                   "string or bare; 1 to 255 printable ASCII characters, e.g. a UUID.")


def sf_string(value: str) -> str:
    """An ``Idempotency-Key`` header's key: the draft sends it as a structured-field string
    (RFC 8941: ``"..."``, with ``\\"`` and ``\\\\`` escaped); a bare value is taken as it is.

    Raises:
        IdempotencyKeyError: an empty or malformed key.
    """
    value = value.strip()
    if value.startswith('"'):
        quoted = _SF_STRING.fullmatch(value)
        if quoted is None:
            raise IdempotencyKeyError('Idempotency-Key: a quoted key must end with \'"\' and escape \'"\' and '
                                      "'\\\\' inside with a backslash")
        value = _SF_ESCAPE.sub(r"\1", quoted.group(1))
    return check_key(value)


def dataset_of(settings: Settings, given: str) -> Path | str:
    """The dataset a request names: the real path under the data directory
    (:func:`dataset_under`), or an ``s3://`` URI under one of the operator's
    ``api_object_prefixes`` (:func:`object_allowed`).

    Raises:
        DatasetNotFoundError, DatasetPathError, ObjectStoreError: public messages naming
            ``given``.
    """
    if is_object_uri(given):
        return object_allowed(settings.api_object_prefixes, given)
    return dataset_under(settings.data_dir, given)


def object_allowed(prefixes: list[str], given: str) -> str:
    """``given`` (``s3://bucket/key``), when it lies under one of ``prefixes``
    (``s3://bucket/prefix`` entries, whole path parts: ``s3://b/data`` admits
    ``s3://b/data/x.csv``, not ``s3://b/database.csv``).

    Raises:
        ObjectStoreError: a public message: a malformed URI, or one under no prefix (the
            prefixes are not listed: they are the operator's).
    """
    shown = given if len(given) <= 200 else given[:200] + "..."
    try:
        location = parse_uri(given)
    except ObjectStoreError as exc:
        raise public(ObjectStoreError(str(exc)[:300])) from None
    if location.under_any(prefixes):
        return location.uri
    raise public(ObjectStoreError(
        f"dataset {shown!r}: this server reads no object storage location outside the prefixes its operator "
        "allows (setting api_object_prefixes" + ("; none is set)" if not prefixes else ")")))


def dataset_under(data_dir: Path, given: str) -> Path:
    """The real path of the dataset a request names (``given``, relative to ``data_dir``).

    The path goes through :func:`ml_framework.paths.resolve_under`, the rule the workers
    apply too.

    Raises:
        DatasetNotFoundError, DatasetPathError: public messages naming ``given`` (never a
            server path), saying that paths are relative to the data directory and which
            path under it exists, when a tail of ``given`` does (``data/digits.csv`` ->
            ``digits.csv``; see :func:`~ml_framework.paths.suggest_under`).
    """
    def hint() -> str:
        suggestion = suggest_under(data_dir, given)
        return "dataset paths are relative to the data directory" + (f"; did you mean {suggestion!r}?"
                                                                     if suggestion else "")

    shown = given if len(given) <= 200 else given[:200] + "..."
    try:
        path = resolve_under(data_dir, given, name=shown)
    except DatasetPathError as exc:  # outside, or leading out through a link or '..'
        raise public(DatasetPathError(f"{exc}: {hint()}")) from exc
    if not exists(path):
        raise public(DatasetNotFoundError(f"dataset {shown!r} not found: {hint()}"))
    return path


def output_uri_allowed(given: str, prefixes: Sequence[str]) -> str:
    """The ``output_uri`` a request names, if the HTTP API may write results there: an
    ``s3://`` URI equal to or under one of ``prefixes`` (the ``api_output_prefixes``
    setting, ``s3://bucket/prefix`` each), compared part by part (``s3://b/out`` allows
    ``s3://b/out/x``, not ``s3://b/out-x``). Local paths are never allowed over HTTP: a
    caller must not make the server write where it likes.

    Messages name the location as ``bucket/key`` (the API's error bodies show no URLs).

    Raises:
        JobOptionError: (400) no prefix is allowed, a local path or another scheme, a
            malformed URI, or a location outside every allowed prefix.
    """
    shown = given if len(given) <= 200 else given[:200] + "..."
    if not prefixes:
        raise public(JobOptionError("output_uri: this server does not accept output_uri (the operator allows no "
                                    "prefix: api_output_prefixes); leave it out to keep results in the database"))
    if not is_object_uri(given):
        raise public(JobOptionError("output_uri: only s3://bucket/prefix locations are accepted over HTTP"))
    try:
        location = parse_uri(given)
    except ObjectStoreError:
        raise public(JobOptionError(f"output_uri: {shown!r} is not an s3://bucket/prefix location")) from None
    if location.under_any(prefixes):
        return location.uri
    raise public(JobOptionError(f"output_uri: {location.uri!r} is not under a prefix this server allows "
                                "(api_output_prefixes)"))
