"""Flower's pages link job ids to the job pages (producer/flower.py): the output transform
adds the link script to whole HTML pages only, with a correct Content-Length, and the
base address cannot break out of the script."""

from __future__ import annotations

from tornado.httputil import HTTPHeaders

from producer.flower import JobPageLinks, link_script

PAGE = b"<html><body><table id='tasks-table'></table></body></html>"


def transformed(chunk: bytes, content_type: str = "text/html; charset=UTF-8", status: int = 200,
                finishing: bool = True, script: bytes = b"<script>x</script>") -> tuple[HTTPHeaders, bytes]:
    JobPageLinks.script = script
    headers = HTTPHeaders({"Content-Type": content_type, "Content-Length": str(len(chunk))})
    _, headers, out = JobPageLinks(None).transform_first_chunk(status, headers, chunk, finishing)
    return headers, out


def test_an_html_page_gets_the_script_before_body_and_its_length():
    headers, out = transformed(PAGE)
    assert out == PAGE.replace(b"</body>", b"<script>x</script></body>")
    assert headers["Content-Length"] == str(len(out))


def test_json_errors_and_streamed_bodies_pass_unchanged():
    body = b'{"data": "</body>"}'
    assert transformed(body, "application/json")[1] == body
    assert transformed(PAGE, status=404)[1] == PAGE
    assert transformed(PAGE, finishing=False)[1] == PAGE
    assert transformed(PAGE, script=b"")[1] == PAGE


def test_the_script_links_to_the_job_pages_and_escapes_the_address():
    script = link_script("https://mlf.example.com/api").decode()
    assert '"https://mlf.example.com/api"' in script and '"/ui/jobs/"' in script
    hostile = link_script('https://x/</script><script>alert(1)</script>').decode()
    assert hostile.count("</script>") == 1 and "\\u003c/script>" in hostile
