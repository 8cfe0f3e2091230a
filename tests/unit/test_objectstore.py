"""Object storage locations and settings (no server: see tests/integration/test_object_store*.py)."""

from __future__ import annotations

import pytest

from ml_framework import objectstore
from ml_framework.errors import ObjectStoreError
from ml_framework.settings import load_settings


def test_an_s3_uri_splits_into_bucket_and_key():
    loc = objectstore.parse_uri("s3://my-bucket/some/prefix/data.parquet")
    assert (loc.bucket, loc.key, loc.path, loc.name) == ("my-bucket", "some/prefix/data.parquet",
                                                         "my-bucket/some/prefix/data.parquet", "data.parquet")
    assert loc.uri == "s3://my-bucket/some/prefix/data.parquet"
    assert objectstore.parse_uri("s3://b-1/p/").child("shard-3.parquet").uri == "s3://b-1/p/shard-3.parquet"
    assert objectstore.parse_uri("s3://b-1").child("x").uri == "s3://b-1/x"


@pytest.mark.parametrize("uri", ["s3://", "s3://UPPER/x", "s3://b/../x", "s3://b/a//c",
                                 "s3://bkt/x?versionId=1", "gs://bkt/x", "s3://ab/x"])
def test_a_malformed_uri_is_refused_naming_it(uri):
    with pytest.raises(ObjectStoreError) as err:
        objectstore.parse_uri(uri)
    assert uri in str(err.value)


def test_credentials_in_a_uri_are_refused_and_not_echoed():
    with pytest.raises(ObjectStoreError) as err:
        objectstore.parse_uri("s3://key:hunter2@bkt/x.csv")
    assert "hunter2" not in str(err.value) and "bkt/x.csv" in str(err.value)


def test_s3_credentials_are_masked_and_come_from_files(tmp_path, monkeypatch):
    secret_file = tmp_path / "s3_secret"
    secret_file.write_text("very-secret-value-123\n")
    monkeypatch.setenv("ML_FRAMEWORK_S3_SECRET_ACCESS_KEY_FILE", str(secret_file))
    settings = load_settings(s3_endpoint_url="http://127.0.0.1:8333/", s3_access_key_id="AKIAEXAMPLE")
    assert settings.s3_secret_access_key.get_secret_value() == "very-secret-value-123"
    assert settings.s3_endpoint_url == "http://127.0.0.1:8333"
    shown = repr(settings) + str(settings.public_dump())
    assert "very-secret-value-123" not in shown and "AKIAEXAMPLE" not in shown


def test_one_credential_without_the_other_is_refused_when_settings_load():
    """A host given the key id but not the secret (a missing *_FILE) fails at start, naming
    both, instead of failing every shard it takes later."""
    from ml_framework.errors import SettingsError

    with pytest.raises(SettingsError, match="s3_access_key_id is set but s3_secret_access_key is not") as err:
        load_settings(s3_access_key_id="AKIAEXAMPLE")
    assert "AKIAEXAMPLE" not in str(err.value)
    with pytest.raises(SettingsError, match="s3_secret_access_key is set but s3_access_key_id is not"):
        load_settings(s3_secret_access_key="very-secret")


@pytest.mark.parametrize("endpoint", ["127.0.0.1:8333", "ftp://host", "http://user:pw@host", "http://host/path"])
def test_an_endpoint_that_is_not_a_base_url_is_refused(endpoint):
    from ml_framework.errors import SettingsError

    with pytest.raises(SettingsError, match="s3_endpoint_url"):
        load_settings(s3_endpoint_url=endpoint)


def test_a_location_is_under_a_prefix_by_whole_key_parts():
    loc = objectstore.parse_uri("s3://b-1/data/x.csv")
    assert loc.under_any(["s3://b-1/data"]) and loc.under_any(["s3://other", "s3://b-1"])
    assert objectstore.parse_uri("s3://b-1/data").under_any(["s3://b-1/data"])
    assert not objectstore.parse_uri("s3://b-1/database.csv").under_any(["s3://b-1/data"])
    assert not loc.under_any(["s3://b-2/data"]) and not loc.under_any([])


@pytest.mark.parametrize("key, value", [("s3_endpoint_url", "http://user:URLPASS@127.0.0.1:1"),
                                        ("api_object_prefixes", "s3://AKIAXXX:URLPASS@bucket/x"),
                                        ("api_output_prefixes", "s3://AKIAXXX:URLPASS@bucket/x")])
def test_credentials_put_into_a_url_setting_are_not_echoed_by_its_error(key, value):
    from ml_framework.errors import SettingsError

    with pytest.raises(SettingsError) as err:
        load_settings(**{key: value})
    assert "URLPASS" not in str(err.value) and "***@" in str(err.value) and key in str(err.value)


def test_a_key_longer_than_s3_allows_is_refused_shortened():
    long_key = "k" * 1025
    with pytest.raises(ObjectStoreError, match="1024") as err:
        objectstore.parse_uri(f"s3://b-1/{long_key}")
    assert long_key not in str(err.value)
    assert objectstore.parse_uri(f"s3://b-1/{'k' * 1024}").key == "k" * 1024
