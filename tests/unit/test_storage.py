import os

import pytest

from talora.io.storage import StorageOptions, filesystem, read_bytes, write_bytes
from talora.batch.parts import PARQUET


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


def test_process_local_filesystems_are_refused_for_ray_jobs():
    from talora.io.storage import require_shared

    with pytest.raises(ValueError, match="memory:// lives inside one process"):
        require_shared("memory://bucket/x", "--output")
    require_shared("s3://b/x")
    require_shared("/tmp/x")


def test_redact_removes_secrets_from_env_options_and_urls(monkeypatch):
    from talora.io.storage import redact

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "envsecret123")
    options = StorageOptions(access_key_id="AKIAFLAG", secret_access_key="flagsecret456")
    text = "failed: envsecret123 flagsecret456 AKIAFLAG https://user:pw@host/x"
    assert redact(text, options) == "failed: *** *** *** https://***@host/x"
    assert "flagsecret456" not in repr(options) and "flagsecret456" not in str(options.public_dict())


def test_pyarrow_filesystem_reads_s3_through_the_endpoint(s3):
    from talora.io.storage import pyarrow_filesystem, write_bytes

    write_bytes("s3://talora-test/pa/x.bin", b"hello", s3)
    fs, path = pyarrow_filesystem("s3://talora-test/pa/x.bin", s3)
    assert path == "talora-test/pa/x.bin"
    with fs.open_input_stream(path) as f:
        assert f.read() == b"hello"


def test_objects_written_by_another_process_are_seen_despite_a_cached_listing(s3):
    import s3fs

    from talora.batch.commit import Manifest, RunOutput
    from talora.io.storage import filesystem

    run = RunOutput("s3://talora-test/out", "k", s3, PARQUET)
    run.commit(Manifest("a", [], {"x": 0}, {}))
    assert set(run.manifests()) == {"a"}  # this process has now listed the folders
    fs, _ = filesystem("s3://talora-test/out", s3)
    other = s3fs.S3FileSystem(endpoint_url=s3.endpoint_url, skip_instance_cache=True)  # "another worker"
    other.pipe_file("talora-test/out/k/_manifests/b.json", Manifest("b", [], {"y": 0}, {}).to_json())
    fs.ls("talora-test/out/k/_manifests")  # a listing cached before the next write
    other.pipe_file("talora-test/out/k/_manifests/c.json", Manifest("c", [], {"z": 0}, {}).to_json())
    assert set(run.manifests()) == {"a", "b", "c"}
    other.pipe_file("talora-test/out/k/s/part-000000.parquet", b"x")
    fs.ls("talora-test/out/k/s")
    other.pipe_file("talora-test/out/k/s/part-000001.parquet", b"y")
    assert read_bytes("s3://talora-test/out/k/s/part-000001.parquet", s3) == b"y"


def test_an_endpoint_that_does_not_answer_is_retried_and_then_named_while_other_errors_are_not(monkeypatch):
    import talora.io.storage as storage

    monkeypatch.setattr(storage, "RETRY_DELAYS_S", (0.0, 0.0))
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError("upload failed") from ConnectionRefusedError(111, "Connection refused")
        return "ok"

    assert storage.with_retries(flaky, "s3://b/k") == "ok" and len(calls) == 3
    options = StorageOptions(endpoint_url="http://127.0.0.1:9")
    with pytest.raises(storage.StorageUnavailable, match=r"object storage at http://127.0.0.1:9 did not answer \(3 attempts"):
        storage.with_retries(lambda: (_ for _ in ()).throw(TimeoutError("timed out")), "s3://b/k", options)
    missing = []
    with pytest.raises(FileNotFoundError):  # an answer about the object: raised at once
        storage.with_retries(lambda: missing.append(1) or (_ for _ in ()).throw(FileNotFoundError("k")), "s3://b/k")
    assert len(missing) == 1


def test_reading_from_a_closed_port_fails_with_the_endpoint_named(monkeypatch):
    import talora.io.storage as storage
    from talora.batch.cluster import free_port

    monkeypatch.setattr(storage, "RETRY_DELAYS_S", (0.0,))
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's own retries: what is tested here is talora's
    port = free_port()  # a loopback port nothing listens on
    options = StorageOptions(endpoint_url=f"http://127.0.0.1:{port}")
    with pytest.raises(storage.StorageUnavailable, match=f"http://127.0.0.1:{port} did not answer"):
        storage.read_bytes("s3://nowhere/key.jpg", options)


def test_a_relative_output_inside_a_ray_working_dir_copy_is_refused(tmp_path, monkeypatch):
    from talora.io.storage import require_kept

    copy = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_1"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    with pytest.raises(ValueError, match="--output runs/labels is a relative path.*temporary copy"):
        require_kept("runs/labels")
    require_kept(str(tmp_path / "labels"))  # absolute: kept
    require_kept("s3://bucket/labels")  # a URI: kept
    monkeypatch.chdir(tmp_path)
    require_kept("runs/labels")  # a relative path outside Ray's copy is the user's own folder


def test_a_python_without_talora_dependencies_is_told_where_to_run_from():
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-S", "-c", f"import sys; sys.path.insert(0, {str(repo)!r}); import talora"],
                          capture_output=True, text=True)
    assert done.returncode != 0
    assert "talora needs torch, ray" in done.stderr and "source .venv/bin/activate" in done.stderr
