"""Completion callbacks, the contract: which URLs a job may carry, the event delivered when
it ends, its signature, and the delay between attempts.

A job submitted with a ``callback_url`` gets one ``job.finished`` event, POSTed by the
HTTP API's side (:mod:`producer.api.callbacks`) once the job has ended. The event is
signed the way Stripe and GitHub sign webhooks: an HMAC-SHA256 over the timestamp and the
raw body, with a secret the receiver shares (the ``callback_secrets`` entry of the key that
submitted the job, ``default`` for jobs submitted without a key). Receivers check it with
:func:`verify_signature`.

Headers of a delivery:

- ``Content-Type: application/json``
- ``X-MLF-Timestamp: <Unix seconds>``
- ``X-MLF-Signature: sha256=<hex HMAC-SHA256(secret, timestamp + "." + body)>``
- ``X-MLF-Delivery: <delivery id>``: the same for every attempt of one job's event, so a
  receiver drops a repeat (an attempt whose answer was lost is sent again).

Sources: Stripe, "Check the webhook signatures" (``Stripe-Signature: t=<ts>,v1=<hex>``,
signed payload ``"<ts>.<body>"``, 5-minute tolerance); GitHub, "Validating webhook
deliveries" (``X-Hub-Signature-256: sha256=<hex>``, ``X-GitHub-Delivery``, compare with a
constant-time function).

Nothing here reads settings or does I/O: callers pass the values in.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import random
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import urlsplit, urlunsplit

from ml_framework.constants import (
    CALLBACK_BACKOFF_BASE_S,
    CALLBACK_BACKOFF_MAX_S,
    CALLBACK_TOLERANCE_S,
    CALLBACK_URL_MAX_CHARS,
)
from ml_framework.errors import CallbackError

__all__ = [
    "DEFAULT_SECRET",
    "DELIVERY_HEADER",
    "EVENT_TYPE",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "HostRule",
    "backoff_s",
    "check_callback_url",
    "delivery_id",
    "event_body",
    "headers",
    "host_allowed",
    "parse_host_rule",
    "public_url",
    "sign",
    "verify_signature",
]

EVENT_TYPE = "job.finished"
SIGNATURE_HEADER = "X-MLF-Signature"
TIMESTAMP_HEADER = "X-MLF-Timestamp"
DELIVERY_HEADER = "X-MLF-Delivery"
DEFAULT_SECRET = "default"
"""The ``callback_secrets`` entry that signs jobs submitted without an API key (the Python
client, ``mlf score``)."""
_DEFAULT_PORTS = {"http": 80, "https": 443}
_DELIVERY_NAMESPACE = uuid.UUID("6f1d2c3e-8a4b-5c6d-9e0f-1a2b3c4d5e6f")


# --------------------------------------------------------------------- allowed hosts
@dataclass(frozen=True)
class HostRule:
    """One entry of ``callback_allowed_hosts``.

    Attributes:
        host: a host name, lower case (``hooks.example.com``; ``*.example.com`` takes every
            name under it, not the name itself), or ``None`` for a network.
        port: the only port allowed, or ``None`` for any.
        network: IP addresses written in the URL that fall in it (``10.0.0.0/8``,
            ``127.0.0.1``); host names are not resolved to match it.
    """

    host: str | None = None
    port: int | None = None
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None

    def allows(self, host: str, port: int) -> bool:
        """Whether a URL's ``host`` (lower case, IPv6 without brackets) and ``port`` match."""
        if self.port is not None and port != self.port:
            return False
        if self.network is not None:
            try:
                return ipaddress.ip_address(host) in self.network
            except ValueError:
                return False
        assert self.host is not None
        if self.host.startswith("*."):
            return host.endswith(self.host[1:])
        return host == self.host


def parse_host_rule(entry: str) -> HostRule:
    """An entry of ``callback_allowed_hosts``: ``host``, ``host:port``, ``*.domain``,
    an IP address, ``[v6 address]:port`` or a network in CIDR notation.

    Raises:
        ValueError: anything else, naming the entry.
    """
    text = entry.strip().lower()
    try:
        return HostRule(network=ipaddress.ip_network(text, strict=False))
    except ValueError:
        pass
    try:
        parts = urlsplit("//" + text)
        host, port = parts.hostname, parts.port
    except ValueError:
        host = port = None
    if not host or parts.username is not None or parts.path or parts.query or parts.fragment:
        raise ValueError(f"callback_allowed_hosts: {entry[:200]!r} is not a host name, host:port or CIDR network")
    try:
        return HostRule(network=ipaddress.ip_network(host), port=port)
    except ValueError:
        label = host[2:] if host.startswith("*.") else host
        if not all(part and all(c.isalnum() or c in "-_" for c in part) for part in label.split(".")):
            raise ValueError(f"callback_allowed_hosts: {entry[:200]!r} is not a host name, host:port or CIDR "
                             "network") from None
        return HostRule(host=host, port=port)


def host_allowed(host: str, port: int, rules: Iterable[HostRule]) -> bool:
    """Whether some rule of ``rules`` allows ``host`` and ``port`` (none: nothing is)."""
    return any(rule.allows(host.lower(), port) for rule in rules)


def public_url(url: str) -> str:
    """``url`` as logs may show it: scheme, host, port and path, without user information,
    query or fragment (where tokens live)."""
    try:
        parts = urlsplit(url)
        netloc = parts.hostname or ""
        if ":" in netloc:
            netloc = f"[{netloc}]"
        if parts.port is not None:
            netloc += f":{parts.port}"
    except ValueError:
        return "<malformed URL>"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def check_callback_url(url: str, allowed: Iterable[HostRule | str]) -> str:
    """``url`` if a job may carry it as its ``callback_url``.

    Args:
        url: the URL given at submit.
        allowed: the ``callback_allowed_hosts`` rules (or entries, parsed by
            :func:`parse_host_rule`); none: every URL is refused (secure
            by default: deliveries leave from inside the deployment, see docs/security.md).

    Returns:
        ``url``, unchanged.

    Raises:
        CallbackError: not ``http`` / ``https``, no host, user information (a password) in
            it, longer than :data:`~ml_framework.constants.CALLBACK_URL_MAX_CHARS`, or a
            host the rules do not allow; the message names the host, never the whole URL.
    """
    if len(url) > CALLBACK_URL_MAX_CHARS:
        raise CallbackError(f"callback_url is {len(url)} characters long; at most {CALLBACK_URL_MAX_CHARS} are "
                            "accepted")
    if any(c.isspace() or ord(c) < 32 for c in url):
        raise CallbackError("callback_url holds spaces or control characters; percent-encode them")
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        raise CallbackError(f"callback_url is not a valid URL ({exc})") from None
    if parts.scheme not in _DEFAULT_PORTS:
        scheme = parts.scheme[:20] or "no scheme"
        raise CallbackError(f"callback_url must use the http or https scheme, not {scheme!r}")
    if not host:
        raise CallbackError("callback_url has no host")
    if parts.username is not None or parts.password is not None:
        raise CallbackError("callback_url must not carry credentials (user:password@); the receiver checks the "
                            "X-MLF-Signature header instead")
    port = port or _DEFAULT_PORTS[parts.scheme]
    rules = [parse_host_rule(r) if isinstance(r, str) else r for r in allowed]
    if not rules:
        raise CallbackError("callbacks are off on this server: no host is allowed; the operator sets "
                            "callback_allowed_hosts (ML_FRAMEWORK_CALLBACK_ALLOWED_HOSTS) to the receivers' hosts")
    if not host_allowed(host, port, rules):
        raise CallbackError(f"callback_url host {host[:255]!r} (port {port}) is not allowed; the operator adds it "
                            "to callback_allowed_hosts (ML_FRAMEWORK_CALLBACK_ALLOWED_HOSTS)")
    return url


# --------------------------------------------------------------------- the event
def delivery_id(job_id: str) -> str:
    """The id of job ``job_id``'s ``job.finished`` event: a UUID derived from the job id
    (UUID version 5), the same for every attempt and every API process."""
    return str(uuid.uuid5(_DELIVERY_NAMESPACE, f"{EVENT_TYPE}:{job_id}"))


def event_body(*, job_id: str, state: str, rows_ok: int, rows_failed: int, n_rows: int, finished_at: datetime | None,
               attempt: int, api_public_url: str | None = None) -> bytes:
    """The ``job.finished`` event of a job, as compact UTF-8 JSON.

    Keys, in order: ``type``, ``job_id``, ``state`` (SUCCEEDED, PARTIAL, FAILED, CANCELLED),
    ``rows_ok``, ``rows_failed``, ``n_rows``, ``finished_at`` (ISO-8601, UTC, ``Z``),
    ``results_url`` (``<api_public_url>/v1/jobs/<id>/results``, or the path alone when
    ``api_public_url`` is unset), ``delivery_id`` (:func:`delivery_id`), ``attempt`` (1 for
    the first).
    """
    finished = None if finished_at is None else \
        finished_at.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    path = f"/v1/jobs/{job_id}/results"
    event = {"type": EVENT_TYPE, "job_id": job_id, "state": state, "rows_ok": rows_ok, "rows_failed": rows_failed,
             "n_rows": n_rows, "finished_at": finished,
             "results_url": f"{api_public_url.rstrip('/')}{path}" if api_public_url else path,
             "delivery_id": delivery_id(job_id), "attempt": attempt}
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()


# --------------------------------------------------------------------- signature
def _bytes(value: str | bytes) -> bytes:
    return value.encode() if isinstance(value, str) else value


def sign(secret: str | bytes, body: bytes, timestamp: int) -> str:
    """The ``X-MLF-Signature`` value of ``body`` sent at ``timestamp`` (Unix seconds):
    ``sha256=`` and the hex HMAC-SHA256 (RFC 2104) of ``"<timestamp>.<body>"`` under
    ``secret``."""
    mac = hmac.new(_bytes(secret), f"{timestamp}.".encode() + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def headers(secret: str | bytes, body: bytes, job_id: str, timestamp: int) -> dict[str, str]:
    """Every header of a delivery of ``body`` (see the module docstring)."""
    return {"Content-Type": "application/json", TIMESTAMP_HEADER: str(timestamp),
            SIGNATURE_HEADER: sign(secret, body, timestamp), DELIVERY_HEADER: delivery_id(job_id)}


def verify_signature(secret: str | bytes, body: bytes, timestamp: str | int, signature: str,
                     tolerance_s: float = CALLBACK_TOLERANCE_S, *, now: float | None = None) -> bool:
    """Whether a delivery is genuine: ``signature`` (the ``X-MLF-Signature`` header) is
    :func:`sign` of the raw ``body`` and ``timestamp`` (the ``X-MLF-Timestamp`` header)
    under ``secret``, and the timestamp is within ``tolerance_s`` seconds of ``now``.

    For receivers::

        ok = verify_signature(secret, request.body, request.headers["X-MLF-Timestamp"],
                              request.headers["X-MLF-Signature"])

    Args:
        secret: the shared secret (the ``callback_secrets`` entry).
        body: the request body exactly as received (bytes, before any JSON parsing).
        timestamp: Unix seconds, as sent.
        signature: ``sha256=<hex>``.
        tolerance_s: largest age (or lead) of the timestamp, seconds; refuses replays of
            an old delivery (``float("inf")`` turns the check off).
        now: the receiver's clock, Unix seconds; default ``time.time()``.

    Returns:
        True if genuine. The comparison takes constant time (``hmac.compare_digest``).
    """
    if not isinstance(body, bytes | bytearray) or not isinstance(signature, str):
        return False  # a decoded body was not what was signed
    if isinstance(timestamp, str) and not (timestamp.strip().isascii() and timestamp.strip().isdigit()):
        return False  # only plain digits, as sent
    try:
        sent_at = int(timestamp)
    except (TypeError, ValueError):
        return False
    age = abs((time.time() if now is None else now) - sent_at)
    if not age <= tolerance_s:  # also False for a NaN tolerance: never "no check" by accident
        return False
    return hmac.compare_digest(sign(secret, bytes(body), sent_at).encode(), signature.strip().encode())


# --------------------------------------------------------------------- retries
def backoff_s(attempt: int, *, base_s: float = CALLBACK_BACKOFF_BASE_S, max_s: float = CALLBACK_BACKOFF_MAX_S,
              rng: Callable[[], float] = random.random) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1 for the first):
    ``min(max_s, base_s * 2 ** (attempt - 1))``, with "equal jitter": half of it, plus a
    random share of the other half, so that callbacks that failed together do not all
    come back together (AWS Architecture Blog, "Exponential Backoff And Jitter", 2015).

    Args:
        rng: a draw in ``[0, 1)``; tests pass a fixed one.
    """
    ceiling = min(max_s, base_s * 2.0 ** min(max(attempt - 1, 0), 62))
    return ceiling / 2 + rng() * ceiling / 2
