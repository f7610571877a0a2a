"""URIs to fsspec filesystems: local paths, ``file://``, ``s3://`` (any endpoint), ``gs://``, ...

Credentials come from the standard places (AWS env vars, profiles, instance roles); only the
endpoint URL, the profile and anonymous access are options here. Nothing in this module logs or
formats a credential.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.core import url_to_fs


@dataclass(frozen=True)
class StorageOptions:
    endpoint_url: str | None = None  # e.g. http://127.0.0.1:5000 for MinIO/moto; None = AWS default
    profile: str | None = None  # an AWS profile name from ~/.aws/config
    anon: bool = False  # unsigned requests (public buckets)

    def fsspec_kwargs(self, protocol: str) -> dict[str, Any]:
        if protocol not in ("s3", "s3a"):
            return {}
        kwargs: dict[str, Any] = {}
        endpoint = self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            kwargs["endpoint_url"] = endpoint
        if self.profile:
            kwargs["profile"] = self.profile
        if self.anon:
            kwargs["anon"] = True
        return kwargs


def protocol_of(uri: str) -> str:
    """``s3`` for ``s3://b/k``, ``file`` for plain paths and ``file://``."""
    return uri.split("://", 1)[0] if "://" in uri else "file"


def filesystem(uri: str, options: StorageOptions | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for `uri` and the path inside it (no scheme)."""
    options = options or StorageOptions()
    fs, path = url_to_fs(uri, **options.fsspec_kwargs(protocol_of(uri)))
    return fs, path


def read_bytes(uri: str, options: StorageOptions | None = None) -> bytes:
    """The whole object at `uri`; FileNotFoundError names the URI."""
    fs, path = filesystem(uri, options)
    try:
        with fs.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError as e:
        raise FileNotFoundError(f"no such file: {uri}") from e


def write_bytes(uri: str, data: bytes, options: StorageOptions | None = None) -> None:
    """Writes `data` to `uri` in one put (atomic on local disk via a temp name + os.replace)."""
    fs, path = filesystem(uri, options)
    if protocol_of(uri) == "file":
        folder, name = os.path.split(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f"_{name}.tmp-{os.getpid()}")  # "_" hides it from readers
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    fs.pipe_file(path, data)
