"""The README and docs/ describe the repository as it is: links resolve inside it, every
module is on the architecture page, and the test order the README states is the order
pytest runs."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("ml_framework", "producer", "worker")
DOC = ROOT / "docs" / "architecture.md"


def _section(package: str) -> str:
    text = DOC.read_text()
    start = text.index(f"### `{package}/`")
    end = text.find("\n## ", start)
    nxt = text.find("\n### ", start + 1)
    ends = [e for e in (end, nxt) if e != -1]
    return text[start:min(ends) if ends else len(text)]


def _modules(package: str) -> list[Path]:
    base = ROOT / package
    return sorted(p.relative_to(base) for p in base.rglob("*.py")
                  if p.name != "__init__.py" and "migrations" not in p.parts)


@pytest.mark.parametrize("package", PACKAGES)
def test_every_module_is_on_the_architecture_page(package: str) -> None:
    section = _section(package)
    missing = []
    for rel in _modules(package):
        named = f"`{rel.as_posix()}`" in section or (
            len(rel.parts) > 1 and f"`{rel.parts[0]}/`" in section and f"`{rel.name}`" in section)
        if not named:
            missing.append(rel.as_posix())
    assert not missing, f"docs/architecture.md does not name {package}/{missing}"


@pytest.mark.parametrize("package", PACKAGES)
def test_every_module_the_page_names_exists(package: str) -> None:
    names = set(re.findall(r"`([\w/]+\.py)`", _section(package)))
    existing = {p.name for p in (ROOT / package).rglob("*.py")} | {
        p.relative_to(ROOT / package).as_posix() for p in (ROOT / package).rglob("*.py")}
    assert names, "no module named in the section"
    assert names <= existing, f"named but absent in {package}/: {sorted(names - existing)}"


DOCS = ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))]


def outside_or_missing(doc: Path, text: str) -> list[str]:
    """The relative references in markdown ``text`` of file ``doc`` that lead outside the
    repository or to no file: link targets ``[x](target)``, and paths in code spans that
    climb out of the doc's directory (`` `../x` ``: a clone has no sibling directories)."""
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    targets += [s for s in re.findall(r"`([^`\s]+)`", text) if s.startswith("../")]
    broken = []
    for target in targets:
        if re.match(r"[a-z]+://|mailto:", target):
            continue
        resolved = (doc.parent / target).resolve()
        if not resolved.is_relative_to(ROOT) or not resolved.exists():
            broken.append(target)
    return broken


@pytest.mark.parametrize("doc", DOCS)
def test_relative_links_resolve_inside_the_repository(doc: str) -> None:
    """No link or path in README.md and docs/*.md leads outside the repository or to nothing."""
    broken = outside_or_missing(ROOT / doc, (ROOT / doc).read_text())
    assert not broken, f"{doc} links outside the repository or to nothing: {broken}"


def test_the_link_check_sees_paths_in_code_spans() -> None:
    """A `../shared/x.md` path in a code span (a clone has no ../shared) counts as a broken link."""
    doc = ROOT / "docs" / "x.md"
    assert outside_or_missing(doc, "see `../shared/ARCHITECTURE.md` and [y](../../y.md)") == [
        "../../y.md", "../shared/ARCHITECTURE.md"]
    assert outside_or_missing(doc, "see [a](architecture.md), `../README.md` and `var/results.sqlite`") == []


def test_make_test_runs_unit_tests_first_as_the_readme_says() -> None:
    paths = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["testpaths"]
    assert paths[0] == "tests/unit"
    assert set(paths) == {str(p.relative_to(ROOT)) for p in (ROOT / "tests").iterdir()
                          if p.is_dir() and p.name != "__pycache__"}
    readme = (ROOT / "README.md").read_text()
    assert "unit tests first" in readme


def test_readme_names_the_prometheus_binary_and_the_suite_duration() -> None:
    readme = (ROOT / "README.md").read_text()
    setup, testing = readme.split("## Using Redis")[0], readme.split("\n## Testing\n")[1]
    assert "[Testing](#testing)" in setup  # the set-up section points at what the tests need
    assert "prometheus" in testing.lower()
    assert re.search(r"\d+\s*(?:to|-)\s*\d+\s*min", testing), "the testing section says how long the suite takes"
