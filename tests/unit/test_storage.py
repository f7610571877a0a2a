import os

import pytest

from talora.storage import StorageOptions, filesystem, read_bytes, write_bytes


def test_local_paths_and_file_uris_resolve_to_the_same_file(tmp_path):
    path = tmp_path / "x" / "blob.bin"
    write_bytes(str(path), b"abc")
    assert read_bytes(f"file://{path}") == b"abc"
    assert not [p for p in os.listdir(path.parent) if p != "blob.bin"]  # no temp file left behind


def test_s3_uris_use_the_endpoint_and_return_scheme_less_paths(s3):
    fs, path = filesystem("s3://talora-test/a/b.bin", s3)
    assert path == "talora-test/a/b.bin"
    write_bytes("s3://talora-test/a/b.bin", b"xyz", s3)
    assert fs.cat_file(path) == b"xyz"
    assert read_bytes("s3://talora-test/a/b.bin", s3) == b"xyz"


def test_endpoint_comes_from_the_standard_aws_env_var(s3, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint_url)
    write_bytes("s3://talora-test/env.bin", b"1")  # no options: the env var alone reaches moto
    assert read_bytes("s3://talora-test/env.bin") == b"1"


def test_missing_objects_name_the_uri(s3):
    with pytest.raises(FileNotFoundError, match="s3://talora-test/missing"):
        read_bytes("s3://talora-test/missing", s3)


def test_options_only_apply_to_s3():
    options = StorageOptions(endpoint_url="http://127.0.0.1:1", profile="p", anon=True)
    assert options.fsspec_kwargs("file") == {}
    assert options.fsspec_kwargs("s3") == {"endpoint_url": "http://127.0.0.1:1", "profile": "p", "anon": True}
