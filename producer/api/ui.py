"""The job pages: server-rendered HTML over the results store, for a browser.

==========================  ==================================================================
``GET /ui/jobs``            open jobs, then the most recently ended (:data:`JOBS_SHOWN` in
                            all), and the live worker processes
``GET /ui/jobs/{id}``       one job (id or 8+ character prefix): state, shards and rows done,
                            rows ok and failed, the first row errors, elapsed time and rows/s,
                            model and version, links to the result downloads; and the workers
``GET /ui/login``           a form taking an API key; ``POST /ui/login`` sets the session
                            cookie and goes on to the page asked for
``POST /ui/logout``         ends the session: its token is refused from then on
==========================  ==================================================================

Who sees what is the API's rule (:mod:`producer.api.auth`): a key of role ``user`` sees its
own jobs, ``admin`` every job, ``metrics`` none. A browser signs in once with its key in a
form (a POST body, never a URL, so no access log holds it); the cookie it gets holds a
session token, not the key, and is taken on GET requests only, so it also opens the result
downloads (``/v1/jobs/{id}/results?format=csv``) but cancels and submits nothing. Scripts may
send ``X-API-Key`` or ``Authorization: Bearer`` as to ``/v1``. Without either, a page answers
401 with the sign-in form.

Pages refresh themselves every :data:`REFRESH_S` seconds while something can change (a meta
refresh: no JavaScript). Every value from users or models (job ids, model names, datasets,
row errors, worker names) goes through Jinja2 with autoescaping on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs, urlsplit

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, PackageLoader, StrictUndefined

from ml_framework.constants import WORKER_LIVE_S
from ml_framework.errors import JobNotFoundError, RequestTooLargeError, UnauthorizedError
from ml_framework.store import JobState, JobStatus, RowError, WorkerInfo
from producer.api.auth import (
    API_KEY,
    BEARER,
    UI_COOKIE,
    UI_SESSION_S,
    KeyTable,
    Principal,
    caller,
    owned_job_id,
)
from producer.api.deps import read_body
from producer.api.errors import scrub, shown_dataset
from producer.durations import duration, job_rows_per_s, when

log = logging.getLogger(__name__)

JOBS_SHOWN = 50
"""Jobs on ``/ui/jobs``: the open ones first, then the most recently ended."""
ROW_ERRORS_SHOWN = 10
"""Row errors on a job's page, the first by row; the CSV download has them all."""
REFRESH_S = 5
"""Seconds between refreshes of a page that can still change."""
MAX_LOGIN_BYTES = 4096
"""Largest sign-in form read, bytes."""



_ENV = Environment(loader=PackageLoader("producer", "templates/ui"), autoescape=True, undefined=StrictUndefined)
_ENV.filters.update(duration=duration, when=when)
templates = Jinja2Templates(env=_ENV)
router = APIRouter(prefix="/ui", include_in_schema=False)


@dataclass(frozen=True)
class Refusal:
    """Why a request may not see the pages: ``status`` 401 (no or unknown key) or 403."""

    status: int
    message: str


async def _viewer(request: Request) -> Principal | Refusal:
    """The caller, as :func:`~producer.api.auth.caller` finds it (header or session
    cookie), or why it is refused: the pages answer refusals with HTML, not JSON."""
    try:
        principal = await caller(request, await API_KEY(request), await BEARER(request))
    except UnauthorizedError:
        return Refusal(401, "Sign in with an API key to see the jobs.")
    if principal.role not in ("user", "admin"):
        return Refusal(403, f"The role of key {principal.name!r} ({principal.role}) does not show jobs.")
    return principal


Viewer = Annotated[Principal | Refusal, Depends(_viewer)]


@dataclass(frozen=True)
class JobView:
    """What the pages show of one job.

    Attributes:
        status: the store's snapshot.
        dataset: the dataset relative to the data directory (no server path).
        rows_per_s: rows recorded per second since the first shard started; ``None``
            before it did or while no row was scored ok (:func:`job_rows_per_s`).
        url: the job page's path.
    """

    status: JobStatus
    dataset: str
    rows_per_s: float | None
    url: str

    @property
    def open(self) -> bool:
        """PENDING or RUNNING: the page still changes."""
        return self.status.state in (JobState.PENDING, JobState.RUNNING)


def _path(request: Request, name: str, **params: Any) -> str:
    """The path of route ``name``, under the app's root path (behind a proxy prefix)."""
    return request.scope.get("root_path", "") + request.app.url_path_for(name, **params)


def _job_view(request: Request, status: JobStatus) -> JobView:
    settings = request.app.state.client.settings
    return JobView(status, shown_dataset(status.dataset, settings.data_dir), job_rows_per_s(status),
                   _path(request, "job_page", job_id=status.job_id))


def _workers(request: Request) -> list[WorkerInfo]:
    return request.app.state.client.workers(WORKER_LIVE_S)


def _page(request: Request, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    """Render ``template``; every page gets the request, the time and the sign-out form."""
    context.setdefault("refresh_s", None)
    context.setdefault("viewer", None)
    return templates.TemplateResponse(
        request, template, {"now": datetime.now(UTC), "root": request.scope.get("root_path", ""), **context},
        status_code=status_code, headers={"Cache-Control": "no-store"})


def _refused(request: Request, refusal: Refusal) -> HTMLResponse:
    return _page(request, "refused.html", refusal.status, message=refusal.message,
                 login=refusal.status == 401, next=request.url.path)


@router.get("", response_class=RedirectResponse)
def ui_root(request: Request) -> RedirectResponse:
    """``/ui`` is the job list."""
    return RedirectResponse(_path(request, "jobs_page"), status_code=303)


@router.get("/jobs", response_class=HTMLResponse)
def jobs_page(request: Request, viewer: Viewer) -> HTMLResponse:
    """The open jobs, then the most recently ended; and the live worker processes."""
    if isinstance(viewer, Refusal):
        return _refused(request, viewer)
    store = request.app.state.client.store
    jobs = store.recent_jobs(JOBS_SHOWN, owned_by=None if viewer.sees_all_jobs else viewer.name)
    return _page(request, "jobs.html", jobs=[_job_view(request, j) for j in jobs], workers=_workers(request),
                 viewer=viewer, refresh_s=REFRESH_S)


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(job_id: str, request: Request, viewer: Viewer) -> HTMLResponse:
    """One job's state, progress, counts, first row errors and downloads; the workers."""
    if isinstance(viewer, Refusal):
        return _refused(request, viewer)
    store = request.app.state.client.store
    try:
        status = store.job(owned_job_id(job_id, request, viewer))
    except JobNotFoundError as exc:  # public: names only what was sent; else (deleted meanwhile) a fixed text
        message = getattr(exc, "public_message", f"No job {job_id[:64]!r}.")
        return _page(request, "refused.html", 404, message=message, login=False, next="", viewer=viewer)
    job = _job_view(request, status)
    settings = request.app.state.client.settings
    errors = [RowError(e.row_index, scrub(e.message, [settings.data_dir]), e.field)
              for e in store.row_errors(status.job_id, ROW_ERRORS_SHOWN)]
    results = _path(request, "job_results", job_id=status.job_id)
    downloads = {"CSV": f"{results}?format=csv", "Parquet": f"{results}?format=parquet", "JSON": results}
    return _page(request, "job.html", job=job, errors=errors, downloads=downloads, workers=_workers(request),
                 viewer=viewer, refresh_s=REFRESH_S if job.open else None)


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, next: str = "") -> HTMLResponse:
    """The sign-in form."""
    return _page(request, "refused.html", message="Sign in with an API key.", login=True, next=_next(next, request))


@router.post("/login", response_class=HTMLResponse)
async def login(request: Request) -> Response:
    """Check the form's ``key``; on success set the session cookie (HttpOnly, SameSite=Lax,
    Secure over HTTPS) and go on to ``next`` (a path under ``/ui``)."""
    origin = request.headers.get("origin")
    if origin and urlsplit(origin).netloc != request.url.netloc:  # a form posted from another site
        return _page(request, "refused.html", 403, message="Sign in from this site's own form.", login=False,
                     next="")
    try:  # declared or streamed, a form over the limit is read no further: no key
        body = await read_body(request, MAX_LOGIN_BYTES)
    except RequestTooLargeError:
        body = b""
    form = parse_qs(body.decode("utf-8", "replace")[:MAX_LOGIN_BYTES])
    key, target = (form.get("key") or [""])[0].strip(), _next((form.get("next") or [""])[0], request)
    table: KeyTable = request.app.state.keys
    principal = table.lookup(key) if key and table.enabled else None
    if principal is None:
        log.warning("request %s: sign-in with %s key from %s", getattr(request.state, "request_id", "-"),
                    "an unknown" if key else "no", request.client.host if request.client else "-")
        message = "That key is not known." if table.enabled else "Authentication is off: no sign-in is needed."
        return _page(request, "refused.html", 401 if table.enabled else 400, message=message,
                     login=table.enabled, next=target)
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(UI_COOKIE, table.session_token(principal), max_age=UI_SESSION_S, httponly=True,
                        samesite="lax", secure=request.url.scheme == "https",
                        path=request.scope.get("root_path") or "/")
    return response


@router.post("/logout", response_class=RedirectResponse)
def logout(request: Request) -> RedirectResponse:
    """End the session: its token is refused from now on, by every API process (recorded
    in the results store until it would have expired), and the cookie is deleted; back
    to the sign-in form."""
    token = request.cookies.get(UI_COOKIE)
    table: KeyTable = request.app.state.keys
    expires_s = table.session_expires_s(token) if token and table.enabled else None
    if expires_s is not None:
        request.app.state.client.store.revoke_session(token, datetime.fromtimestamp(expires_s, UTC))
    response = RedirectResponse(_path(request, "login_form"), status_code=303)
    response.delete_cookie(UI_COOKIE, path=request.scope.get("root_path") or "/")
    return response


def _next(target: str, request: Request) -> str:
    """``target`` when it is a path under the job pages (no open redirect), else the list."""
    prefix = request.scope.get("root_path", "") + "/ui/"
    parts = urlsplit(target)
    if target.startswith(prefix) and not (parts.scheme or parts.netloc) and "\\" not in target:
        return target
    return _path(request, "jobs_page")


def template_dir() -> Path:
    """Where the page templates are (packaged with :mod:`producer`)."""
    return Path(__file__).parent.parent / "templates" / "ui"
