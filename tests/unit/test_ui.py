"""The job pages (/ui): behind the API's keys, a browser session that reads but changes
nothing, counts taken from the store, and user data escaped. The app runs in process on the
embedded broker with no worker; shards are recorded through the store's own API (what a
worker calls), and a heartbeat row stands for a worker."""

from __future__ import annotations

import html
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from ml_framework.settings import load_settings
from ml_framework.store import RowError, WorkerInfo
from producer.api import create_app
from producer.api.auth import UI_COOKIE, UI_SESSION_S, KeyTable, Principal
from tests.unit.conftest import model_root

KEYS = {"alice": "alice-key-0123456789abcdef", "bob": "bob-key-0123456789abcdef",
        "ops": "ops-key-0123456789abcdef", "prom": "prom-key-0123456789abcdef"}
ROLES = {"ops": "admin", "prom": "metrics"}
EVIL = '<img src=x onerror="alert(1)">'


def hdr(name: str) -> dict[str, str]:
    return {"X-API-Key": KEYS[name]}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return model_root(tmp_path_factory.mktemp("ui"))


@pytest.fixture(scope="module")
def http(root):
    settings = load_settings(models_dir=root / "models", data_dir=root / "data", var_dir=root / "var",
                             bulk_queue="mlf.ui.bulk", online_queue="mlf.ui.online", api_keys=KEYS,
                             api_key_roles=ROLES)
    with TestClient(create_app(settings)) as client:
        yield client


def store(http):
    return http.app.state.client.store


def partial_job(http, owner: str = "alice", model: str = "m") -> str:
    """A job of 3 shards of 4 rows: shard 0 all scored, shard 1 with two row errors (one
    with HTML in its message and field), shard 2 still pending."""
    s = store(http)
    job = s.create_job(model=model, model_version=1, dataset=str(http.app.state.client.settings.data_dir / "d.csv"),
                       n_rows=12, shard_ranges=[(0, 4), (4, 8), (8, 12)], batch_size=4, owner=owner)
    for shard in (0, 1):
        assert s.claim_shard(job, shard, "cpu0@test").value == "RUN"
    s.complete_shard(job, 0, [(i, {"prediction": 1.0}) for i in range(4)], [])
    s.complete_shard(job, 1, [(4, {"prediction": 1.0}), (7, {"prediction": 2.0})],
                     [RowError(6, f"row 6: {EVIL} is not a number", "<b>col</b>"), RowError(5, "row 5: empty")])
    return job


def text_of(page: str, element_id: str) -> str:
    """The text of the element with ``id``, unescaped (the page holds no nested markup there)."""
    found = re.search(rf'id="{element_id}"[^>]*>([^<]*)<', page)
    assert found, element_id
    return html.unescape(found.group(1))


def test_pages_need_a_key_and_refuse_a_browser_with_the_sign_in_form(http):
    """No key or an unknown one: 401 with an HTML sign-in form; a metrics key: 403; a user
    key (header or bearer) sees the pages."""
    for headers in ({}, {"X-API-Key": "wrong-key-0123456789"}):
        r = http.get("/ui/jobs", headers=headers)
        assert r.status_code == 401 and r.headers["content-type"].startswith("text/html")
        assert 'name="key"' in r.text and 'action="/ui/login"' in r.text
    refused = http.get("/ui/jobs", headers=hdr("prom"))
    assert refused.status_code == 403 and "metrics" in text_of(refused.text, "message")
    assert http.get("/ui/jobs", headers=hdr("alice")).status_code == 200
    assert http.get("/ui/jobs", headers={"Authorization": f"Bearer {KEYS['alice']}"}).status_code == 200
    job = partial_job(http)
    assert http.get(f"/ui/jobs/{job}").status_code == 401


def test_job_page_shows_the_stores_counts_and_escapes_user_data(http):
    """A PARTIAL-so-far job: shards and rows done, rows ok and failed as recorded, the row
    errors by row with their HTML escaped, and links to the three downloads."""
    job = partial_job(http, model="m")
    status = store(http).job(job)
    page = http.get(f"/ui/jobs/{job[:10]}", headers=hdr("alice"))
    assert page.status_code == 200, page.text
    t = page.text
    assert text_of(t, "state") == status.state.value == "RUNNING"
    assert (text_of(t, "shards-done"), text_of(t, "n-shards")) == (str(status.shards_done), "3")
    assert (text_of(t, "rows-done"), text_of(t, "n-rows")) == (str(status.rows_done), "12")
    assert (text_of(t, "rows-ok"), text_of(t, "rows-failed")) == (str(status.rows_ok), str(status.rows_failed))
    assert (status.rows_ok, status.rows_failed, status.shards_done) == (6, 2, 2)
    assert EVIL not in t and "<b>col</b>" not in t
    assert EVIL in html.unescape(t) and "<b>col</b>" in html.unescape(t)  # shown, as text
    assert t.index("row 5: empty") < t.index("row 6:")  # by row
    assert str(http.app.state.client.settings.data_dir) not in t  # the dataset as given, no server path
    for fmt in ("?format=csv", "?format=parquet", ""):
        assert f'href="/v1/jobs/{job}/results{fmt}"' in t
    assert '<meta http-equiv="refresh"' in t  # still running


def test_a_malicious_model_name_and_worker_data_are_escaped_everywhere(http):
    """A model name, worker name and loaded-model names holding markup are shown as text
    on both pages; the job id is linked."""
    job = partial_job(http, owner="ops", model=f"{EVIL}-model")
    store(http).heartbeat(WorkerInfo(hostname=f"cpu0@{EVIL}", pid=42, started_at=datetime.now(UTC), rows_per_s=12.5,
                                     models=[f"{EVIL}/1"], shards_done=3, rows_done=99))
    for url in ("/ui/jobs", f"/ui/jobs/{job}"):
        t = http.get(url, headers=hdr("ops")).text
        assert EVIL not in t and html.unescape(t).count(EVIL) >= 3  # model, worker, loaded model: as text
        assert ">12.5<" in t and ">99<" in t  # the worker's rows/s and rows done
    assert f'href="/ui/jobs/{job}"' in http.get("/ui/jobs", headers=hdr("ops")).text


def test_users_see_their_own_jobs_and_admins_every_job(http):
    """The list and the job page follow the API's ownership rule: another key's job is
    absent from the list and answered 404, as on /v1."""
    mine, theirs = partial_job(http, owner="alice"), partial_job(http, owner="bob")
    listed = http.get("/ui/jobs", headers=hdr("alice")).text
    assert mine in listed and theirs not in listed
    other = http.get(f"/ui/jobs/{theirs}", headers=hdr("alice"))
    assert other.status_code == 404 and theirs[:12] in text_of(other.text, "message")
    everyone = http.get("/ui/jobs", headers=hdr("ops")).text
    assert mine in everyone and theirs in everyone
    assert http.get(f"/ui/jobs/{theirs}", headers=hdr("ops")).status_code == 200


def test_open_jobs_come_first_then_the_most_recently_ended(http):
    """recent_jobs: PENDING/RUNNING first (newest first), then ended jobs by end time, up to
    the limit, for one owner or all."""
    s = store(http)
    ended = s.create_job(model="m", model_version=1, dataset="x", n_rows=1, shard_ranges=[(0, 1)], batch_size=1,
                         owner="carol")
    s.claim_shard(ended, 0, "cpu0@test")
    s.complete_shard(ended, 0, [(0, {"prediction": 0.0})], [])
    older_open = s.create_job(model="m", model_version=1, dataset="x", n_rows=1, shard_ranges=[(0, 1)],
                              batch_size=1, owner="carol")
    newer_open = s.create_job(model="m", model_version=1, dataset="x", n_rows=1, shard_ranges=[(0, 1)],
                              batch_size=1, owner="carol")
    ids = [j.job_id for j in s.recent_jobs(10, owned_by="carol")]
    assert ids == [newer_open, older_open, ended]
    assert [j.job_id for j in s.recent_jobs(2, owned_by="carol")] == [newer_open, older_open]
    assert s.cancel(older_open).state.value == "CANCELLED"
    assert [j.job_id for j in s.recent_jobs(10, owned_by="carol")] == [newer_open, older_open, ended]
    assert [e.row_index for e in s.row_errors(partial_job(http), limit=1)] == [5]


def test_signing_in_gives_a_cookie_that_reads_pages_and_downloads_but_changes_nothing(http):
    """POST /ui/login with the key in the form body: a redirect to the page asked for, and
    an HttpOnly SameSite cookie that holds no key. With it alone, the pages, the job's
    status and its CSV download answer; cancelling is refused. A wrong key, an outside
    'next' and a form posted from another site get nowhere."""
    job = partial_job(http)
    with TestClient(http.app) as browser:  # a client of its own: its cookie jar
        bad = browser.post("/ui/login", data={"key": "nope", "next": "/ui/jobs"}, follow_redirects=False)
        assert bad.status_code == 401 and UI_COOKIE not in bad.cookies
        r = browser.post("/ui/login", data={"key": KEYS["alice"], "next": f"/ui/jobs/{job}"}, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == f"/ui/jobs/{job}"
        cookie = r.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=lax" in cookie and KEYS["alice"] not in cookie
        assert browser.get(f"/ui/jobs/{job}").status_code == 200
        assert browser.get(f"/v1/jobs/{job}").json()["rows_ok"] == 6
        assert browser.get(f"/v1/jobs/{job}/results", params={"format": "csv"}).status_code == 200
        assert browser.post(f"/v1/jobs/{job}/cancel").status_code == 401
        assert store(http).job(job).state.value == "RUNNING"
        away = browser.post("/ui/login", data={"key": KEYS["alice"], "next": "https://evil.example/ui/"},
                            follow_redirects=False)
        assert away.headers["location"] == "/ui/jobs"
        foreign = browser.post("/ui/login", data={"key": KEYS["alice"]}, headers={"Origin": "https://evil.example"},
                               follow_redirects=False)
        assert foreign.status_code == 403 and "set-cookie" not in foreign.headers
        out = browser.post("/ui/logout", follow_redirects=False)
        assert out.status_code == 303 and f"{UI_COOKIE}=" in out.headers["set-cookie"]
        assert browser.get("/ui/jobs").status_code == 401


def test_signing_out_ends_the_session_token_before_it_expires(http):
    """After POST /ui/logout, the signed-out token is refused (401) even when a client
    kept it and sends it again; a session signed in later still reads the pages."""
    job = partial_job(http)
    with TestClient(http.app) as browser:
        browser.post("/ui/login", data={"key": KEYS["alice"]}, follow_redirects=False)
        token = browser.cookies[UI_COOKIE]
        assert browser.get("/ui/jobs").status_code == 200
        assert browser.post("/ui/logout", follow_redirects=False).status_code == 303
    assert store(http).session_revoked(token)
    with TestClient(http.app, cookies={UI_COOKIE: token}) as replay:
        assert replay.get("/ui/jobs").status_code == 401
        assert replay.get(f"/v1/jobs/{job}").status_code == 401
    later = KeyTable(http.app.state.client.settings).session_token(Principal("alice", "user"))
    with TestClient(http.app, cookies={UI_COOKIE: later}) as other:
        assert other.get("/ui/jobs").status_code == 200


def test_session_tokens_expire_and_cannot_be_forged(root, clean_env):
    """A token is taken for UI_SESSION_S after it was issued; one whose name, time or MAC
    was changed, or signed for a key since removed, is not."""
    settings = load_settings(models_dir=root / "models", api_keys=KEYS, api_key_roles=ROLES)
    table = KeyTable(settings)
    alice = table.lookup(KEYS["alice"])
    token = table.session_token(alice, now_s=1_000_000)
    assert table.lookup_session(token, now_s=1_000_000 + UI_SESSION_S) == alice
    assert table.lookup_session(token, now_s=1_000_001 + UI_SESSION_S) is None
    name, issued, nonce, mac = token.split(".")
    bob_name = table.session_token(table.lookup(KEYS["bob"]), now_s=1_000_000).split(".")[0]
    assert table.session_token(alice, now_s=1_000_000) != token  # each sign-in its own token (its nonce)
    for forged in (f"{bob_name}.{issued}.{nonce}.{mac}", f"{name}.{int(issued) + 1}.{nonce}.{mac}",
                   f"{name}.{issued}.{'0' * 16}.{mac}", f"{name}.{issued}.{nonce}.{'0' * 64}",
                   "garbage", f"{name}.{issued}.{mac}", f"{name}.{issued}"):
        assert table.lookup_session(forged, now_s=1_000_000) is None, forged
    without_alice = KeyTable(load_settings(models_dir=root / "models", api_keys={"bob": KEYS["bob"]}))
    assert without_alice.lookup_session(token, now_s=1_000_000) is None
    with pytest.raises(KeyError):
        table.session_token(Principal("mallory", "admin"))


def test_api_public_url_gives_the_job_page_address(clean_env):
    """api_public_url: the job page is <url>/ui/jobs/<id> (trailing slash dropped); unset:
    no address; not an http(s) base URL: refused naming the setting."""
    job = "0" * 32
    assert load_settings(api_public_url="https://mlf.example.com/api/").job_page_url(job) == \
        f"https://mlf.example.com/api/ui/jobs/{job}"
    assert load_settings().job_page_url(job) is None
    with pytest.raises(Exception, match="api_public_url"):
        load_settings(api_public_url="mlf.example.com")


def test_every_template_is_package_data():
    """pyproject's package-data globs for producer cover every file under
    producer/templates, so an installed wheel renders the pages (checked by hand:
    `pip wheel --no-deps .` holds producer/templates/ui/*.html)."""
    import tomllib

    from producer.api.ui import template_dir

    package = template_dir().parent.parent
    globs = tomllib.loads((package.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    packaged = {p for pattern in globs["producer"] for p in package.glob(pattern)}
    templates = {p for p in (package / "templates").rglob("*") if p.is_file()}
    assert templates and templates <= packaged, templates - packaged


def test_a_job_without_rows_shows_full_bars(http):
    """A job of no rows (an empty day's file) is SUCCEEDED at once: its bars are full, not
    empty, on both pages."""
    s = store(http)
    job = s.create_job(model="m", model_version=1, dataset="empty.csv", n_rows=0, shard_ranges=[],
                       batch_size=4, owner="alice")
    assert s.job(job).state.value == "SUCCEEDED"
    page = http.get(f"/ui/jobs/{job}", headers=hdr("alice")).text
    for bar in ("shards-bar", "rows-bar"):
        found = re.search(rf'<progress id="{bar}" max="(\d+)" value="(\d+)"', page)
        assert found and found.group(1) == found.group(2), bar
    listed = http.get("/ui/jobs", headers=hdr("alice")).text
    row = listed[listed.index(job):]
    found = re.search(r'<progress max="(\d+)" value="(\d+)"', row)
    assert found and found.group(1) == found.group(2)


def test_a_sign_in_form_over_the_limit_is_read_no_further_even_without_a_length(http):
    """The sign-in form is held to MAX_LOGIN_BYTES whether its length is declared or the
    body is streamed in chunks without one: a form over it signs nobody in (before, a
    chunked body was read whole, and a key in its first bytes signed in)."""
    from producer.api.ui import MAX_LOGIN_BYTES

    form = f"key={KEYS['alice']}&next=/ui/jobs&pad=".encode()
    padding = b"x" * MAX_LOGIN_BYTES

    def chunks():
        yield form
        yield padding

    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    with TestClient(http.app) as browser:
        streamed = browser.post("/ui/login", content=chunks(), headers=headers, follow_redirects=False)
        assert "content-length" not in {k.lower() for k in streamed.request.headers}
        assert streamed.status_code == 401 and UI_COOKIE not in streamed.cookies
        declared = browser.post("/ui/login", content=form + padding, headers=headers, follow_redirects=False)
        assert declared.status_code == 401 and UI_COOKIE not in declared.cookies
        fits = browser.post("/ui/login", content=form + b"x", headers=headers, follow_redirects=False)
        assert fits.status_code == 303 and UI_COOKIE in fits.cookies
