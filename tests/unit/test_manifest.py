"""Manifests and the read-only model repository."""

from __future__ import annotations

import pytest
import yaml

from ml_framework.errors import ManifestError, ModelNotFoundError
from ml_framework.manifest import ModelManifest, ModelRepository

BASE = {
    "name": "m", "version": 1, "framework": "torch", "artifact": "model.pt2",
    "inputs": {"columns": ["a", "b", "c", "d"], "shape": [2, 2]},
    "outputs": {"kind": "classification", "labels": ["x", "y"]},
}


def put(root, data):
    d = root / data["name"] / str(data["version"])
    d.mkdir(parents=True)
    (d / "manifest.yaml").write_text(yaml.safe_dump(data))
    return d


def test_resolve_picks_highest_version(tmp_path):
    """version=None resolves to the highest integer version."""
    put(tmp_path, BASE)
    put(tmp_path, {**BASE, "version": 10})
    put(tmp_path, {**BASE, "version": 2})
    repo = ModelRepository(tmp_path)
    assert repo.versions("m") == [1, 2, 10]
    assert repo.resolve("m").version == 10
    assert repo.resolve("m", 2).version == 2


def test_unknown_model_lists_known_models(tmp_path):
    """An unknown model's error names it and lists the models that exist."""
    put(tmp_path, BASE)
    with pytest.raises(ModelNotFoundError, match="'zzz' not found.*models there: m"):
        ModelRepository(tmp_path).resolve("zzz")
    with pytest.raises(ModelNotFoundError, match="no version 3"):
        ModelRepository(tmp_path).resolve("m", 3)


@pytest.mark.parametrize(("change", "needle"), [
    ({"framework": "caffe"}, "framework"),
    ({"inputs": {"columns": ["a", "b", "c"], "shape": [2, 2]}}, "holds 4 values"),
    ({"outputs": {"kind": "classification"}}, "labels is required"),
    ({"artifact": "../x"}, "inside the version directory"),
    ({"surprise": 1}, "surprise"),
])
def test_invalid_manifest_names_the_field(tmp_path, change, needle):
    """Invalid manifests fail with the file's path and the offending field."""
    d = put(tmp_path, {**BASE, **change})
    with pytest.raises(ManifestError, match=needle) as info:
        ModelRepository(tmp_path).resolve("m", 1)
    assert str(d / "manifest.yaml") in str(info.value)


def test_manifest_directory_mismatch(tmp_path):
    """A manifest whose name/version disagrees with its directory is refused."""
    d = tmp_path / "m" / "1"
    d.mkdir(parents=True)
    ModelManifest.model_validate({**BASE, "version": 2}).write(d)
    with pytest.raises(ManifestError, match="directory says m/1"):
        ModelRepository(tmp_path).resolve("m")


def test_row_shape_defaults_to_column_count():
    """Without a shape each row is a vector of the columns."""
    m = ModelManifest.model_validate({**BASE, "inputs": {"columns": ["a", "b", "c"]}})
    assert m.inputs.row_shape == (3,)


def test_only_canonical_integer_directories_are_versions(tmp_path):
    """Directories like '²', '01' or '0' are not versions and break nothing (regression)."""
    put(tmp_path, BASE)
    for odd in ("²", "01", "0", "v2"):
        d = tmp_path / "m" / odd
        d.mkdir()
        (d / "manifest.yaml").write_text(yaml.safe_dump(BASE))
    repo = ModelRepository(tmp_path)
    assert repo.versions("m") == [1]
    assert repo.resolve("m").version == 1
    with pytest.raises(ModelNotFoundError, match="'other' not found"):
        repo.resolve("other")


def test_labels_that_yaml_reads_as_dates_are_refused(tmp_path):
    """Unquoted date labels would not serialise into results: refused at the manifest."""
    d = tmp_path / "m" / "1"
    d.mkdir(parents=True)
    (d / "manifest.yaml").write_text(yaml.safe_dump(BASE).replace("- x\n  - y", "- 2020-01-01\n  - 2020-01-02"))
    with pytest.raises(ManifestError, match="outputs.labels.0"):
        ModelRepository(tmp_path).resolve("m")


@pytest.mark.parametrize(("labels", "needle"), [
    ("[no, yes]", "outputs.labels.0"),          # YAML booleans
    ("[.nan, 1]", "outputs.labels.0"),          # NaN
    ("[1, 1.0]", "duplicates"),
    ("['a', 'a']", "duplicates"),
])
def test_ambiguous_labels_are_refused(tmp_path, labels, needle):
    """Labels must be distinct strings or finite numbers (YAML booleans and NaN are refused)."""
    d = tmp_path / "m" / "1"
    d.mkdir(parents=True)
    data = {**BASE, "outputs": {"kind": "classification", "labels": "PLACEHOLDER"}}
    text = yaml.safe_dump(data).replace("labels: PLACEHOLDER", f"labels: {labels}")
    (d / "manifest.yaml").write_text(text)
    with pytest.raises(ManifestError, match=needle):
        ModelRepository(tmp_path).resolve("m")


def test_versions_must_fit_the_store():
    """A version beyond the store's INTEGER range is refused in the manifest."""
    with pytest.raises(Exception, match="less than or equal to 2147483647"):
        ModelManifest.model_validate({**BASE, "version": 3_000_000_000})
