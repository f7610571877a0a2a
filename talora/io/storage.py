"""URIs to fsspec filesystems: local paths, ``file://``, ``s3://`` (any endpoint), ``gs://``, ...

Credentials come from the standard places (AWS env vars, profiles, instance roles), or from
explicit keys in `StorageOptions`, which never appear in its repr, its `public_dict()` or in any
message: `redact()` scrubs every known secret from text before a job prints or saves it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import posixpath
import re
import time
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow.fs as pafs
from fsspec.core import url_to_fs


@dataclass(frozen=True)
class StorageOptions:
    endpoint_url: str | None = None  # e.g. http://127.0.0.1:5000 for MinIO/moto; None = AWS default
    profile: str | None = None  # an AWS profile name from ~/.aws/config
    anon: bool = False  # unsigned requests (public buckets)
    # Explicit keys, for endpoints without profiles; prefer env vars or roles. Never printed.
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)

    def public_dict(self) -> dict[str, Any]:
        """What may be logged or saved in a resolved config: no keys."""
        return {"endpoint_url": self.endpoint_url, "profile": self.profile, "anon": self.anon}

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
        if self.access_key_id and self.secret_access_key:
            kwargs["key"], kwargs["secret"] = self.access_key_id, self.secret_access_key
        return kwargs


_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "GOOGLE_APPLICATION_CREDENTIALS_JSON")
_URL_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


def redact(text: str, options: StorageOptions | None = None) -> str:
    """`text` with every secret this process knows of (env vars, explicit keys, URL user:password@)
    replaced by ``***``."""
    secrets = [os.environ.get(name) for name in _SECRET_ENV]
    if options is not None:
        secrets += [options.secret_access_key, options.access_key_id]
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return _URL_USERINFO.sub("***@", text)


# Filesystems that live inside one process: a Ray worker on another process or node cannot see them.
_PROCESS_LOCAL = ("memory",)


def require_shared(uri: str, what: str = "URI") -> None:
    """Refuses URIs that Ray workers in other processes cannot read, with a message saying why."""
    protocol = protocol_of(uri)
    if protocol in _PROCESS_LOCAL:
        raise ValueError(
            f"{what} {uri}: {protocol}:// lives inside one process, so Ray workers cannot see it; "
            "use a local path (single machine) or object storage such as s3://"
        )


def require_kept(uri: str, what: str = "--output") -> None:
    """Refuses a relative local path while running in Ray's temporary copy of a job's working dir
    (`ray job submit --working-dir`): what is written there is deleted with the Ray session."""
    if protocol_of(uri) == "file" and not os.path.isabs(resolve(uri).removeprefix("file://")) \
            and "runtime_resources/working_dir_files" in os.getcwd():
        raise ValueError(f"{what} {uri} is a relative path, and this job runs in Ray's temporary copy of its working "
                         f"dir ({os.getcwd()}), which is deleted with the Ray session: give an absolute path "
                         "(e.g. \"$PWD/runs/labels\") or a URI")


# The demo models shipped inside the package: ``demo://hypernet.safetensors`` is the same file on
# every machine that installed talora (a path would tie a hypernet's header to one checkout).
DEMO_SCHEME = "demo://"
DEMO_ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "demo")  # talora/assets/demo


def resolve(uri: str) -> str:
    """``demo://name`` -> the packaged file's local path; every other URI unchanged."""
    if uri.startswith(DEMO_SCHEME):
        return os.path.join(DEMO_ASSETS, uri.removeprefix(DEMO_SCHEME))
    return uri


def protocol_of(uri: str) -> str:
    """``s3`` for ``s3://b/k``, ``file`` for plain paths, ``file://`` and ``demo://``."""
    uri = resolve(uri)
    return uri.split("://", 1)[0] if "://" in uri else "file"


def filesystem(uri: str, options: StorageOptions | None = None, **fs_kwargs: Any) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for `uri` and the path inside it (no scheme); `fs_kwargs` go to the filesystem."""
    options = options or StorageOptions()
    uri = resolve(uri)
    fs, path = url_to_fs(uri, **options.fsspec_kwargs(protocol_of(uri)), **fs_kwargs)
    return fs, path


class StorageUnavailable(ConnectionError):
    """The storage endpoint did not answer (refused, reset, timed out), after retries."""


# Waits between attempts when the endpoint does not answer, on top of the client's own retries
# (botocore's and s3fs's): a store that is down for longer fails the job with one clear line.
RETRY_DELAYS_S = (1.0, 2.0, 4.0)
_UNREACHABLE = {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
                "ClientConnectorError", "ClientConnectionError", "ServerDisconnectedError", "ClientOSError",
                "FSTimeoutError"}


def unreachable(error: BaseException | None) -> bool:
    """Whether `error` (or one it came from) says the endpoint could not be reached, as opposed to
    an answer about the object (missing, forbidden, malformed)."""
    while error is not None:
        if isinstance(error, (ConnectionError, TimeoutError)) or type(error).__name__ in _UNREACHABLE:
            return True
        error = error.__cause__ or error.__context__
    return False


def endpoint_of(uri: str, options: StorageOptions | None = None) -> str:
    """Where requests for `uri` go, for messages: the S3 endpoint URL, or the URI's scheme."""
    if protocol_of(uri) in ("s3", "s3a"):
        return (options or StorageOptions()).fsspec_kwargs("s3").get("endpoint_url") or "the AWS S3 endpoint"
    return f"{protocol_of(uri)}://"


def with_retries(action, uri: str, options: StorageOptions | None = None):
    """`action()`, retried with backoff (RETRY_DELAYS_S) while the endpoint does not answer; then
    StorageUnavailable naming the endpoint. Any other error (a missing object, say) is raised at once."""
    for delay in (*RETRY_DELAYS_S, None):
        try:
            return action()
        except Exception as e:
            if not unreachable(e):
                raise
            if delay is None:
                raise StorageUnavailable(
                    f"object storage at {endpoint_of(uri, options)} did not answer ({len(RETRY_DELAYS_S) + 1} "
                    f"attempts over {sum(RETRY_DELAYS_S):g} s, last: {type(e).__name__}) while reaching {uri}"
                ) from e
            time.sleep(delay)


def read_bytes(uri: str, options: StorageOptions | None = None, start: int | None = None,
               end: int | None = None) -> bytes:
    """The object at `uri` (bytes [start, end) if given: one ranged GET); FileNotFoundError names the
    URI; StorageUnavailable when the endpoint does not answer (after retries)."""
    fs, path = filesystem(uri, options)

    def read() -> bytes:
        try:
            return fs.cat_file(path, start=start, end=end)
        except FileNotFoundError:
            # Object-store filesystems cache listings per process; an object written since (by a Ray
            # worker, say) is missing from a stale listing, so look once more without the cache.
            fs.invalidate_cache(path)
            try:
                return fs.cat_file(path, start=start, end=end)
            except FileNotFoundError as e:
                raise FileNotFoundError(f"no such file: {uri}") from e

    return with_retries(read, uri, options)


def write_bytes(uri: str, data: bytes, options: StorageOptions | None = None) -> None:
    """Writes `data` to `uri` in one put (atomic on local disk via a temp name + os.replace);
    StorageUnavailable when the endpoint does not answer (after retries)."""
    fs, path = filesystem(uri, options)
    if protocol_of(uri) == "file":
        folder, name = os.path.split(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f"_{name}.tmp-{os.getpid()}")  # "_" hides it from readers
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    with_retries(lambda: fs.pipe_file(path, data), uri, options)


def absolute(uri: str | None) -> str | None:
    """Local paths made absolute (Ray workers may run in another directory); URIs unchanged."""
    if uri is None or protocol_of(uri) != "file" or uri.startswith(DEMO_SCHEME):
        return uri
    return os.path.abspath(uri.removeprefix("file://"))


def join(uri: str, *parts: str) -> str:
    """`uri` / parts, keeping the scheme (``s3://b/p`` + ``x`` -> ``s3://b/p/x``)."""
    return posixpath.join(uri.rstrip("/"), *parts)


def pyarrow_filesystem(uri: str, options: StorageOptions | None = None):
    """(pyarrow filesystem, scheme-less path) for Ray Data readers and Ray Train's storage: the same
    fsspec filesystem as every other read (endpoint, profile, keys), wrapped by pyarrow's FSSpecHandler."""
    # Its own instance, without a listing cache: Ray Train lists checkpoints that other workers wrote.
    fresh = {} if protocol_of(uri) == "file" else {"skip_instance_cache": True, "use_listings_cache": False}
    fs, path = filesystem(uri, options, **fresh)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def file_identity(uri: str, options: StorageOptions | None = None) -> dict[str, Any]:
    """What identifies a file's content cheaply (size + ETag or mtime), for run keys: hashing a
    2.5 GB remote checkpoint on the driver would mean downloading it."""
    fs, path = filesystem(uri, options)
    try:
        info = fs.info(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"no such file: {uri}") from e
    return {"uri": uri, "size": info.get("size"),
            "version": str(info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified"))}


def local_copy(uri: str, options: StorageOptions | None = None, cache_dir: str | None = None) -> str:
    """A local path for `uri`: the file itself when local, else a copy cached once per node
    (keyed by URI and identity; a file lock makes concurrent actors on a node download once).

    Not fsspec's ``simplecache::``: it downloads straight into the cache file (``get_file``), so a
    second actor on the node can open a half-written checkpoint; here the copy lands atomically."""
    if protocol_of(uri) == "file":
        return resolve(uri).removeprefix("file://")
    cache_dir = cache_dir or os.environ.get("TALORA_CACHE", os.path.expanduser("~/.cache/talora"))
    os.makedirs(cache_dir, exist_ok=True)
    identity = json.dumps(file_identity(uri, options), sort_keys=True)
    name = hashlib.sha256(identity.encode()).hexdigest()[:16] + "-" + posixpath.basename(uri)
    target = os.path.join(cache_dir, name)
    with open(target + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(target):
            write_bytes(target, read_bytes(uri, options))
    return target
