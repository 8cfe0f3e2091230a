"""Signed-out browser sessions: the server-side half of the stateless session tokens of
:mod:`producer.api.auth`. A token is recorded here, by its SHA-256, when its browser signs
out, and refused from then until it would have expired anyway; rows past that are pruned
on each sign-out. Every API process and host reads the same table, so a sign-out holds
everywhere at once."""

from __future__ import annotations

import hashlib
from datetime import datetime

from sqlalchemy import Engine, delete, insert, select
from sqlalchemy.exc import IntegrityError

from ml_framework.store.engine import read
from ml_framework.store.models import RevokedSessionRow, utc_now


def token_digest(token: str) -> str:
    """The SHA-256 (hex, 64 characters) a token is recorded by: the table holds no token."""
    return hashlib.sha256(token.encode()).hexdigest()


def revoke(engine: Engine, token: str, expires_at: datetime) -> None:
    """Refuse ``token`` until ``expires_at`` (aware UTC); idempotent. Prunes the rows of
    tokens that expired meanwhile."""
    try:
        with engine.begin() as conn:
            conn.execute(delete(RevokedSessionRow).where(RevokedSessionRow.expires_at < utc_now()))
            if conn.execute(select(RevokedSessionRow.token_sha256)
                            .where(RevokedSessionRow.token_sha256 == token_digest(token))).first() is None:
                conn.execute(insert(RevokedSessionRow).values(token_sha256=token_digest(token), expires_at=expires_at))
    except IntegrityError:  # the same token signed out by another request at the same moment
        pass


def revoked(engine: Engine, token: str) -> bool:
    """Whether ``token`` was signed out (:func:`revoke`)."""
    with read(engine) as conn:
        return conn.execute(select(RevokedSessionRow.token_sha256)
                            .where(RevokedSessionRow.token_sha256 == token_digest(token))).first() is not None
