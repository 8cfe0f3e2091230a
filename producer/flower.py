"""Flower as ``mlf flower`` runs it: ``celery -A producer.flower flower ...``.

The Celery app is the producers' (:func:`ml_framework.celery_app.create_app`: the broker,
our queues declared so that Flower's Broker page lists them from the start); this module
imports no worker code and no ML framework.

When ``api_public_url`` is set, Flower's pages link each job id to the job's own page
(``<api_public_url>/ui/jobs/<job id>``, :mod:`producer.api.ui`): every shard task's
``kwargs`` column reads ``job=<id> shard=… model=…`` (:meth:`ScoreShard.summary`), and a
small script added to Flower's HTML pages turns that ``job=<id>`` into a link, in the task
list (which Flower fills in the browser) and on a task's page. Flower has no setting for
links of its own; the script is added by a Tornado output transform
(:class:`JobPageLinks`), so Flower's files are not changed.
"""

from __future__ import annotations

import json

import tornado.web

from ml_framework.celery_app import create_app
from ml_framework.settings import get_settings

settings = get_settings()
app = create_app(settings)

LINK_SCRIPT = """<script>
(function () {
  // Turns "job=<32 hex>" in Flower's text into a link to the job's page (ml-framework).
  var base = %s, pattern = /\\bjob=([0-9a-f]{32})\\b/;
  function link(root) {
    var walker = document.createTreeWalker(root, NodeFilter.SHOW_TEXT), nodes = [], node;
    while ((node = walker.nextNode())) {
      if (pattern.test(node.data) && !node.parentNode.closest("a, script, style, textarea, input")) {
        nodes.push(node);
      }
    }
    nodes.forEach(function (text) {
      var match = pattern.exec(text.data), rest = text.splitText(match.index), after = rest.splitText(match[0].length);
      var a = document.createElement("a");
      a.href = base + "/ui/jobs/" + match[1];
      a.className = "mlf-job-link";
      a.title = "the job's page";
      a.textContent = rest.data;
      rest.parentNode.replaceChild(a, rest);
      if (pattern.test(after.data)) { link(after.parentNode); }
    });
  }
  function start() {
    link(document.body);
    new MutationObserver(function (changes) {
      changes.forEach(function (c) { c.addedNodes.forEach(function (n) { if (n.nodeType === 1) { link(n); } }); });
    }).observe(document.body, {childList: true, subtree: true});
  }
  if (document.readyState === "loading") { document.addEventListener("DOMContentLoaded", start); } else { start(); }
})();
</script>"""
"""The script added before ``</body>`` of Flower's HTML pages (``%s``: the base address
as a JSON string). Job ids are 32 lowercase hex digits (``uuid4().hex``)."""


def link_script(base_url: str) -> bytes:
    """:data:`LINK_SCRIPT` for job pages under ``base_url`` (``api_public_url``), UTF-8.
    The address is a JSON string with ``<`` escaped, so it cannot end the script."""
    return (LINK_SCRIPT % json.dumps(base_url).replace("<", "\\u003c")).encode()


class JobPageLinks(tornado.web.OutputTransform):
    """A Tornado output transform that adds :func:`link_script` to each whole HTML page
    (status 200, ``text/html``, written in one piece, as Flower's pages are) and fixes its
    ``Content-Length``. Other responses (the JSON API, static files, streamed bodies) pass
    unchanged.

    Attributes:
        script: the bytes added before ``</body>``; set by :func:`install`.
    """

    script: bytes = b""

    def transform_first_chunk(self, status_code: int, headers, chunk: bytes, finishing: bool):
        """Add the script to a whole HTML page (Tornado's ``OutputTransform`` interface)."""
        if (finishing and status_code == 200 and self.script and b"</body>" in chunk
                and headers.get("Content-Type", "").startswith("text/html")
                and not headers.get("Content-Encoding")):
            at = chunk.rindex(b"</body>")
            chunk = chunk[:at] + self.script + chunk[at:]
            if "Content-Length" in headers:
                headers["Content-Length"] = str(len(chunk))
        return status_code, headers, chunk


def install(base_url: str | None) -> bool:
    """Make every Flower web app made from now on add :class:`JobPageLinks`, linking job
    ids to ``<base_url>/ui/jobs/<id>``. Returns ``False`` (and changes nothing) when
    ``base_url`` is ``None``: no ``api_public_url``, no links."""
    if base_url is None:
        return False
    from flower.app import Flower

    JobPageLinks.script = link_script(base_url)
    if getattr(Flower, "_mlf_job_links", False):
        return True
    made = Flower.__init__

    def __init__(self, *args, **kwargs):
        made(self, *args, **kwargs)
        self.add_transform(JobPageLinks)

    Flower.__init__ = __init__
    Flower._mlf_job_links = True
    return True


install(settings.api_public_url)
