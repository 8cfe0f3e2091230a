"""Flower's pages link job ids to the job pages (producer/flower.py): the output transform
adds the link script to whole HTML pages only, with a correct Content-Length, and the
base address cannot break out of the script."""

from __future__ import annotations

import importlib

import pytest
from tornado.httputil import HTTPHeaders

PAGE = b"<html><body><table id='tasks-table'></table></body></html>"


@pytest.fixture(scope="module")
def flower():
    """``producer.flower``, imported when the tests run, not at collection: the module
    reads the settings on import (``celery -A producer.flower`` needs its app there)."""
    return importlib.import_module("producer.flower")


def transformed(flower, chunk: bytes, content_type: str = "text/html; charset=UTF-8", status: int = 200,
                finishing: bool = True, script: bytes = b"<script>x</script>") -> tuple[HTTPHeaders, bytes]:
    flower.JobPageLinks.script = script
    headers = HTTPHeaders({"Content-Type": content_type, "Content-Length": str(len(chunk))})
    _, headers, out = flower.JobPageLinks(None).transform_first_chunk(status, headers, chunk, finishing)
    return headers, out


def test_an_html_page_gets_the_script_before_body_and_its_length(flower):
    headers, out = transformed(flower, PAGE)
    assert out == PAGE.replace(b"</body>", b"<script>x</script></body>")
    assert headers["Content-Length"] == str(len(out))


def test_json_errors_and_streamed_bodies_pass_unchanged(flower):
    body = b'{"data": "</body>"}'
    assert transformed(flower, body, "application/json")[1] == body
    assert transformed(flower, PAGE, status=404)[1] == PAGE
    assert transformed(flower, PAGE, finishing=False)[1] == PAGE
    assert transformed(flower, PAGE, script=b"")[1] == PAGE


def test_the_script_links_to_the_job_pages_and_escapes_the_address(flower):
    script = flower.link_script("https://mlf.example.com/api").decode()
    assert '"https://mlf.example.com/api"' in script and '"/ui/jobs/"' in script
    hostile = flower.link_script('https://x/</script><script>alert(1)</script>').decode()
    assert hostile.count("</script>") == 1 and "\\u003c/script>" in hostile
