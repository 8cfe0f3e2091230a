"""Completion callbacks, the contract (ml_framework.callbacks): signatures and their
verification, the event body, the backoff schedule, which callback URLs a job may carry,
and the callback settings. No service, no clock but injected ones."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from ml_framework.callbacks import (
    backoff_s,
    check_callback_url,
    delivery_id,
    event_body,
    headers,
    parse_host_rule,
    public_url,
    sign,
    verify_signature,
)
from ml_framework.errors import CallbackError, JobError
from ml_framework.settings import load_settings
from producer.plan import JobOptions

SECRET = "whsec_test"
BODY = b'{"a":1}'
NOW = 1_700_000_000
# printf '1700000000.{"a":1}' | openssl dgst -sha256 -hmac 'whsec_test'
OPENSSL_HEX = "38877139021993b830af32feea6e18a8da83eb2f6e49ee50bd9e4cf4ca4d3789"


def test_signature_is_hmac_sha256_over_timestamp_dot_body():
    """The signature matches openssl's HMAC-SHA256 of "<timestamp>.<body>", as sha256=<hex>."""
    assert sign(SECRET, BODY, NOW) == f"sha256={OPENSSL_HEX}"
    assert sign(SECRET.encode(), BODY, NOW) == f"sha256={OPENSSL_HEX}"


def test_verify_accepts_the_genuine_delivery_and_refuses_any_change():
    """verify_signature takes the genuine triple (timestamp as text, as headers carry it)
    and refuses another body, secret, timestamp or a malformed signature."""
    sig = sign(SECRET, BODY, NOW)
    assert verify_signature(SECRET, BODY, str(NOW), sig, now=NOW + 10)
    assert not verify_signature(SECRET, b'{"a":2}', NOW, sig, now=NOW)
    assert not verify_signature("other", BODY, NOW, sig, now=NOW)
    assert not verify_signature(SECRET, BODY, NOW + 1, sig, now=NOW)
    assert not verify_signature(SECRET, BODY, "soon", sig, now=NOW)
    assert not verify_signature(SECRET, BODY, NOW, OPENSSL_HEX, now=NOW)  # without sha256=


def test_verify_refuses_a_timestamp_outside_the_tolerance():
    """An old (replayed) or far-future timestamp is refused, even with a valid signature."""
    sig = sign(SECRET, BODY, NOW)
    assert verify_signature(SECRET, BODY, NOW, sig, now=NOW + 300)
    assert not verify_signature(SECRET, BODY, NOW, sig, now=NOW + 301)
    assert not verify_signature(SECRET, BODY, NOW, sig, now=NOW - 301)
    assert verify_signature(SECRET, BODY, NOW, sig, tolerance_s=3600, now=NOW + 3000)
    # a NaN tolerance (a bad config value) refuses, rather than turning replay protection off
    assert not verify_signature(SECRET, BODY, NOW, sig, tolerance_s=float("nan"), now=NOW + 10**9)


def test_verify_refuses_a_decoded_body_and_a_timestamp_that_is_not_plain_digits():
    """A body already decoded to text, or a timestamp like ``+1_000``, is refused (False),
    never an exception."""
    sig = sign(SECRET, BODY, NOW)
    assert not verify_signature(SECRET, BODY.decode(), NOW, sig, now=NOW)
    assert verify_signature(SECRET, bytearray(BODY), f" {NOW} ", sig, now=NOW)
    for odd in (f"+{NOW}", f"{NOW:_}", "\u0661\u0662"):
        assert not verify_signature(SECRET, BODY, odd, sign(SECRET, BODY, NOW), now=NOW)


def test_headers_name_the_delivery_and_sign_the_body():
    """A delivery's headers: JSON, the timestamp, its signature, the stable delivery id."""
    h = headers(SECRET, BODY, "ab" * 16, NOW)
    assert h == {"Content-Type": "application/json", "X-MLF-Timestamp": str(NOW),
                 "X-MLF-Signature": sign(SECRET, BODY, NOW), "X-MLF-Delivery": delivery_id("ab" * 16)}


def test_event_body_is_compact_json_with_every_field():
    """The event: compact UTF-8 JSON, keys in order, finished_at in UTC with Z, the
    results URL under api_public_url, the same delivery id whatever the attempt."""
    finished = datetime(2026, 12, 1, 5, 6, 7, 890000, tzinfo=UTC)
    one = event_body(job_id="f" * 32, state="PARTIAL", rows_ok=9, rows_failed=1, n_rows=10, finished_at=finished,
                     attempt=1, api_public_url="https://mlf.example.com/base/")
    three = event_body(job_id="f" * 32, state="PARTIAL", rows_ok=9, rows_failed=1, n_rows=10, finished_at=finished,
                       attempt=3)
    assert b" " not in one
    event = json.loads(one)
    assert list(event) == ["type", "job_id", "state", "rows_ok", "rows_failed", "n_rows", "finished_at",
                           "results_url", "delivery_id", "attempt"]
    assert event == {"type": "job.finished", "job_id": "f" * 32, "state": "PARTIAL", "rows_ok": 9, "rows_failed": 1,
                     "n_rows": 10, "finished_at": "2026-12-01T05:06:07.890Z",
                     "results_url": f"https://mlf.example.com/base/v1/jobs/{'f' * 32}/results",
                     "delivery_id": delivery_id("f" * 32), "attempt": 1}
    later = json.loads(three)
    assert later["results_url"] == f"/v1/jobs/{'f' * 32}/results"
    assert (later["delivery_id"], later["attempt"]) == (event["delivery_id"], 3)
    assert delivery_id("a" * 32) != delivery_id("b" * 32)


def test_backoff_doubles_with_equal_jitter_capped_at_five_minutes():
    """Delays: half of 1, 2, 4 ... s plus a jittered half, never over 300 s."""
    assert [backoff_s(n, rng=lambda: 0.0) for n in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 4.0]
    assert [backoff_s(n, rng=lambda: 0.999999) for n in (1, 2, 3)] == pytest.approx([1.0, 2.0, 4.0], abs=1e-5)
    assert backoff_s(9, rng=lambda: 0.0) == 128.0  # 256 s, halved
    assert backoff_s(10, rng=lambda: 0.0) == 150.0 and backoff_s(10, rng=lambda: 1.0) == 300.0  # 512 s, capped
    assert backoff_s(10_000, rng=lambda: 1.0) == 300.0  # no overflow
    assert backoff_s(2, base_s=0.1, rng=lambda: 1.0) == pytest.approx(0.2)


@pytest.mark.parametrize(("url", "allowed"), [
    ("https://hooks.example.com/mlf?token=x", ["hooks.example.com"]),
    ("https://HOOKS.example.com:443/", ["hooks.example.com:443"]),
    ("http://a.b.example.org:8080/x", ["*.example.org"]),
    ("http://10.1.2.3:9000/h", ["10.0.0.0/8"]),
    ("http://[::1]:8000/h", ["[::1]:8000"]),
    ("http://127.0.0.1:5000/h", ["127.0.0.1"]),
])
def test_allowed_callback_urls_pass(url, allowed):
    """URLs whose host (and port) an allowlist entry names are taken as they are."""
    assert check_callback_url(url, allowed) == url


@pytest.mark.parametrize(("url", "allowed", "says"), [
    ("https://hooks.example.com/", [], "callback_allowed_hosts"),
    ("https://evil.example.net/", ["hooks.example.com"], "'evil.example.net' (port 443) is not allowed"),
    ("https://hooks.example.com:8443/", ["hooks.example.com:443"], "port 8443"),
    ("http://example.org/", ["*.example.org"], "not allowed"),
    ("http://169.254.169.254/latest", ["10.0.0.0/8"], "not allowed"),
    ("http://internal.local/", ["10.0.0.0/8"], "not allowed"),  # names are not resolved to match networks
    ("ftp://hooks.example.com/", ["hooks.example.com"], "http or https"),
    ("hooks.example.com/x", ["hooks.example.com"], "http or https"),
    ("https://user:pw@hooks.example.com/", ["hooks.example.com"], "credentials"),
    ("https:///nohost", ["hooks.example.com"], "no host"),
    ("https://hooks.example.com/a b", ["hooks.example.com"], "spaces"),
    ("https://hooks.example.com/" + "x" * 2048, ["hooks.example.com"], "at most 2048"),
    ("https://hooks.example.com:99999/", ["hooks.example.com"], "not a valid URL"),
])
def test_refused_callback_urls_say_why(url, allowed, says):
    """Each refused URL raises CallbackError (a JobError: 400 over HTTP) saying why, and
    never echoes the password."""
    with pytest.raises(CallbackError, match="callback") as info:
        check_callback_url(url, allowed)
    assert says in str(info.value) and "pw" not in str(info.value)
    assert isinstance(info.value, JobError)


@pytest.mark.parametrize("entry", ["", "a b", "http://x.com", "x.com/path", "user@x.com", "x..com"])
def test_bad_allowlist_entries_are_refused(entry):
    """An entry that is no host, host:port or network is refused, naming it."""
    with pytest.raises(ValueError, match="callback_allowed_hosts"):
        parse_host_rule(entry)


def test_public_url_drops_query_and_credentials():
    """Logs show scheme, host, port and path only."""
    assert public_url("https://u:p@h.example.com:8443/hook?token=secret#f") == "https://h.example.com:8443/hook"
    assert public_url("http://[::1]:80/x?q") == "http://[::1]:80/x"


def test_callback_settings_from_the_environment(clean_env, monkeypatch, tmp_path):
    """callback_allowed_hosts and callback_secrets read comma-separated entries; secrets come
    from *_FILE too, are masked in repr and mlf config; a bad entry fails at start."""
    monkeypatch.setenv("ML_FRAMEWORK_CALLBACK_ALLOWED_HOSTS", "hooks.example.com, 10.0.0.0/8")
    (tmp_path / "secrets").write_text("default=s3cr3t-default\nalice=s3cr3t-alice\n")
    monkeypatch.setenv("ML_FRAMEWORK_CALLBACK_SECRETS_FILE", str(tmp_path / "secrets"))
    settings = load_settings()
    assert settings.callback_allowed_hosts == ["hooks.example.com", "10.0.0.0/8"]
    assert {k: v.get_secret_value() for k, v in settings.callback_secrets.items()} == {
        "default": "s3cr3t-default", "alice": "s3cr3t-alice"}
    assert "s3cr3t" not in repr(settings) and "s3cr3t" not in json.dumps(settings.public_dump())
    assert settings.callback_max_attempts == 8
    monkeypatch.setenv("ML_FRAMEWORK_CALLBACK_ALLOWED_HOSTS", "http://hooks.example.com/")
    with pytest.raises(Exception, match="callback_allowed_hosts"):
        load_settings()


def test_callback_secret_entries_are_checked_without_echoing_secrets(clean_env):
    """A malformed callback_secrets entry is refused naming the setting, never the secret."""
    for bad in ("justasecretvalue", "bad name=xyz-secret-1", "alice="):
        with pytest.raises(Exception, match="callback_secrets") as info:
            load_settings(callback_secrets=bad)
        assert "justasecretvalue" not in str(info.value) and "xyz-secret-1" not in str(info.value)


def test_production_refuses_placeholder_callback_secrets(clean_env):
    """deployment: production refuses a placeholder callback secret, by name."""
    with pytest.raises(Exception, match=r"callback_secrets\[default\]"):
        load_settings(deployment="production", callback_secrets={"default": "change-me"})


def test_job_options_carry_the_callback_url_into_the_idempotency_hash():
    """callback_url is a job option: of() takes it, and it is part of request()."""
    options = JobOptions.of("m", callback_url="https://hooks.example.com/x")
    assert options.callback_url == "https://hooks.example.com/x"
    assert options.request()["callback_url"] == "https://hooks.example.com/x"
    with pytest.raises(ValidationError):
        JobOptions(model="m", callback_url=5)
