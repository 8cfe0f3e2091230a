"""Secrets in settings: API key entries, passwords in URLs, values read from files,
masking, and the placeholder values a production deployment refuses.

Used by :mod:`ml_framework.settings`; nothing here logs or returns a secret in clear
except :func:`with_password` (a URL to connect with) and :func:`key_digest`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from pydantic import SecretStr

MASK = "**********"
HASH_PREFIX = "sha256:"
KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
"""A key's name: what logs, metrics and the ``jobs.owner`` column show (64 characters at most)."""
MIN_KEY_CHARS = 16
"""Shortest API key a production deployment accepts in clear: 16 random URL-safe
characters carry 96 bits (``secrets.token_urlsafe(32)`` gives 43)."""
PLACEHOLDER = re.compile(
    r"(?i)^(?:change[-_ .]?me\b.*|replace[-_ .]?me\b.*|password|passw0rd|secret|example|default|admin|test|todo"
    r"|x{3,}|\*+|<[^>]*>)$")
"""Values copied from examples and never meant for production: ``change-me`` and its
variants (what ``.env.prod.example`` holds), ``<your key>``, ``xxx``, ``password``..."""


def is_placeholder(value: str) -> bool:
    """True for an empty value or one that :data:`PLACEHOLDER` matches."""
    return not value.strip() or bool(PLACEHOLDER.match(value.strip()))


def url_password(url: str) -> str | None:
    """The password in ``scheme://user:password@host/...``, or ``None``."""
    try:
        return urlsplit(url).password
    except ValueError:  # a malformed port or netloc: no password we can find
        return None


def mask_url(url: str) -> str:
    """``url`` with its password replaced by :data:`MASK` (``redis://:**********@redis:6379/0``)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    userinfo, _, host = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:{MASK}@{host}"))


_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@'\"]*@")


def scrub_userinfo(text: str) -> str:
    """``text`` with the user and password of every URL in it replaced by ``***``
    (``http://***@host``): for messages that quote a value given for a setting that is not
    itself a secret (an endpoint, a prefix) but where someone put credentials."""
    return _USERINFO.sub(r"\1***@", text)


def with_password(url: str, password: str) -> str:
    """``url`` with ``password`` put into its user information, URL-quoted.

    Raises:
        ValueError: ``url`` carries a password already, or has no host.
    """
    parts = urlsplit(url)
    if parts.password is not None:
        raise ValueError("carries a password already: give it in the URL or in the password setting, not both")
    if not parts.hostname:
        raise ValueError("has no host to give the password for")
    userinfo, _, host = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{userinfo}:{quote(password, safe='')}@{host}"))


def read_secret_file(variable: str, path: str) -> str:
    """The content of the file named by ``variable`` (``ML_FRAMEWORK_<KEY>_FILE``), without
    surrounding whitespace (``echo secret > file`` adds a newline).

    Raises:
        ValueError: the file cannot be read; the message names the variable and the file,
            never any content.
    """
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{variable}={path}: cannot read it ({type(exc).__name__}: "
                         f"{getattr(exc, 'strerror', None) or 'not UTF-8 text'})") from None


def key_digest(value: str) -> bytes:
    """The SHA-256 digest a configured key value stands for: the hex after
    ``sha256:``, or the hash of a key given in clear."""
    if value.startswith(HASH_PREFIX):
        return bytes.fromhex(value[len(HASH_PREFIX):])
    return hashlib.sha256(value.encode()).digest()


def hash_key(key: str) -> str:
    """The ``sha256:<hex>`` form of ``key`` to put in ``api_keys`` instead of the key."""
    return HASH_PREFIX + hashlib.sha256(key.encode()).hexdigest()


def _split(text: str) -> list[str]:
    return [part.strip() for part in re.split(r"[,\n]", text) if part.strip()]


def parse_key_entries(value: Any) -> dict[str, str]:
    """The ``api_keys`` setting in every form it is given, as ``{name: key or sha256:hex}``.

    Forms: a mapping ``{name: value}`` (YAML); a list of entries (YAML); text with entries
    separated by commas or new lines (environment, ``ML_FRAMEWORK_API_KEYS_FILE``). An
    entry is ``name=value`` or a bare key (the form of earlier releases), which is named
    ``key-`` and the first 8 hex characters of its SHA-256, so that a job's owner stays the
    same whatever the order of the keys.

    Raises:
        ValueError: a bad name, a malformed ``sha256:`` value, an empty key, a name given
            twice, or one key under two names. Messages name entries by name or position,
            never by value.
    """
    if isinstance(value, Mapping):
        pairs = [(str(k), _plain(v)) for k, v in value.items()]
    else:
        entries = _split(value) if isinstance(value, str) else [_plain(v) for v in value or []]
        pairs = []
        for i, entry in enumerate(entries):
            name, sep, key = entry.partition("=")
            if not sep or not key.strip() or not KEY_NAME.match(name.strip()):  # a bare key
                name, key = "", entry
            pairs.append((name.strip() or _auto_name(key.strip(), i), key.strip()))
    keys: dict[str, str] = {}
    digests: dict[bytes, str] = {}
    for name, key in pairs:
        if not KEY_NAME.match(name):
            raise ValueError(f"key name {name[:70]!r}: use 1 to 64 letters, digits, '_', '.' or '-'")
        if not key:
            raise ValueError(f"key {name!r} is empty")
        if key.startswith(HASH_PREFIX) and not re.fullmatch(r"[0-9a-fA-F]{64}", key[len(HASH_PREFIX):]):
            raise ValueError(f"key {name!r}: sha256: must be followed by 64 hex digits (`mlf api-key` prints it)")
        if name in keys:
            raise ValueError(f"key name {name!r} is given twice")
        digest = key_digest(key)
        if digest in digests:
            raise ValueError(f"keys {digests[digest]!r} and {name!r} are the same key: a job would have two owners")
        keys[name], digests[digest] = key, name
    return keys


def _plain(value: Any) -> str:
    return value.get_secret_value() if isinstance(value, SecretStr) else str(value)


def _auto_name(key: str, index: int) -> str:
    if not key:
        return f"key{index + 1}"
    return "key-" + key_digest(key).hex()[:8]


def parse_pairs(value: Any) -> dict[str, str]:
    """``name=value`` entries (comma- or newline-separated text, or a list) or a mapping, as a dict."""
    if isinstance(value, Mapping):
        return {str(k): str(v) for k, v in value.items()}
    entries = _split(value) if isinstance(value, str) else [str(v) for v in value or []]
    out = {}
    for entry in entries:
        name, sep, item = entry.partition("=")
        if not sep:
            raise ValueError(f"{entry!r}: expected name=value")
        out[name.strip()] = item.strip()
    return out


def parse_secret_entries(value: Any, setting: str) -> dict[str, Any]:
    """``name=secret`` entries (:func:`parse_pairs`; a mapping's values kept as given, so
    that a ``SecretStr`` stays one), each name a :data:`KEY_NAME` and each secret non-empty.

    Raises:
        ValueError: a malformed entry, name or empty secret, naming ``setting`` and the
            entry's name, never a secret.
    """
    if isinstance(value, Mapping):
        pairs = {str(k): v for k, v in value.items()}
    else:
        try:
            pairs = parse_pairs(value)
        except ValueError:  # parse_pairs names the entry, which holds the secret
            raise ValueError(f"{setting}: give name=secret entries, comma-separated") from None
    for name, secret in pairs.items():
        if not KEY_NAME.match(name):
            raise ValueError(f"{setting}: name {name[:70]!r}: use 1 to 64 letters, digits, '_', '.' or '-'")
        if not _plain(secret).strip():
            raise ValueError(f"{setting}: the secret of {name!r} is empty")
    return pairs


def masked(value: Any) -> Any:
    """``value`` as it may be shown: secrets as :data:`MASK`, URL passwords masked,
    containers walked."""
    if isinstance(value, SecretStr):
        return MASK
    if isinstance(value, str) and "://" in value:
        return mask_url(value)
    if isinstance(value, Mapping):
        return {k: masked(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [masked(v) for v in value]
    return value


def placeholders(named_values: Iterable[tuple[str, str]]) -> list[str]:
    """The names of the ``(name, value)`` pairs whose value is a placeholder."""
    return [name for name, value in named_values if is_placeholder(value)]


def complete_urls(data: dict[str, Any], url_passwords: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """Settings input with each ``(url key, password key)``'s password put into its URL,
    which must then carry none; and ``redis_url`` as ``broker_url`` when that is unset.

    Raises:
        ValueError: a password without its URL, or for a URL that carries one already;
            the message names the keys only.
    """
    data = dict(data)
    for url_key, password_key in url_passwords:
        password = data.get(password_key)
        if password is None:
            continue
        if not data.get(url_key):
            raise ValueError(f"{password_key} is set but {url_key} is not")
        try:
            data[url_key] = with_password(str(data[url_key]), _plain(password))
        except ValueError as exc:
            raise ValueError(f"{url_key} {exc} ({password_key} is set)") from None
    if not data.get("broker_url") and data.get("redis_url"):
        data["broker_url"] = data["redis_url"]
    return data


def weak_secrets(settings: Any) -> list[str]:
    """What a production deployment refuses in ``settings``, by name: placeholder passwords
    in the server URLs (a URL without a password may use another way in: TLS, peer),
    placeholder API keys or keys in clear shorter than :data:`MIN_KEY_CHARS`, and placeholder
    Flower passwords."""
    named = [(f"the password in {key}", password) for key in ("broker_url", "redis_url", "database_url")
             if (url := getattr(settings, key)) and (password := url_password(url)) is not None]
    named += [(f"api_keys[{name}]", key.get_secret_value()) for name, key in settings.api_keys.items()]
    named += [(f"callback_secrets[{name}]", secret.get_secret_value())
              for name, secret in getattr(settings, "callback_secrets", {}).items()]
    for entry in settings.flower_basic_auth:
        user, _, password = entry.get_secret_value().partition(":")
        named.append((f"flower_basic_auth[{user}]", password))
    bad = placeholders(named)
    bad += [f"api_keys[{name}] (shorter than {MIN_KEY_CHARS} characters)" for name, key in settings.api_keys.items()
            if not key.get_secret_value().startswith(HASH_PREFIX) and len(key.get_secret_value()) < MIN_KEY_CHARS
            and f"api_keys[{name}]" not in bad]
    return bad
