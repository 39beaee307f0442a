"""One way to reach local paths and any fsspec URL (``s3://``, ``gs://``, ``az://``...), for our
own files and for Ray's readers and writers.

Credentials are never configured here: each store's client reads them from the environment
(``AWS_ACCESS_KEY_ID``, ``GOOGLE_APPLICATION_CREDENTIALS``...), a profile or the instance's role.
Only the endpoint of an S3-compatible store and the region come from ``StorageConfig``.

Two clients reach S3: s3fs (fsspec) for the project's own small files (manifests, registry,
plots), and Arrow's native ``S3FileSystem`` for everything Ray Data and Ray Train read and write
(``pyarrow_filesystem``): Arrow's C++ client streams parquet without passing every byte through
Python, as a wrapped fsspec filesystem would. Other schemes go through their fsspec package
(``gcsfs`` for ``gs://``, ``adlfs`` for ``az://``: ``pip install gcsfs`` or ``adlfs``), wrapped for
Arrow.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import uuid
from typing import Any

import fsspec
import fsspec.core
import pyarrow.fs

from pipeline.core.config import StorageConfig

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
# The package fsspec needs for a scheme, named in the error when it is missing.
PACKAGES = {"gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs", "abfss": "adlfs"}


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def scheme(uri: str) -> str:
    """The scheme of a remote URI with its ``://`` (``"s3://"``, ``"gs://"``); ``""`` for a local
    path or a ``file://`` URI."""
    m = _SCHEME.match(uri)
    return "" if m is None or m.group(1) == "file" else m.group(0)


def is_remote(uri: str) -> bool:
    """True for a URI of an object store or any other non-local fsspec filesystem."""
    return scheme(uri) != ""


def strip_scheme(uri: str) -> str:
    """The path inside the filesystem: a remote URI without its scheme, a local path as is."""
    return uri[len(scheme(uri)):]


def filesystem(uri: str, storage: StorageConfig) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return an fsspec filesystem for ``uri`` and the path inside it (no scheme)."""
    if is_s3(uri):
        import s3fs  # late import: aiobotocore costs 0.3 s in every process, and only S3 needs it

        client_kwargs: dict[str, Any] = {}
        if storage.s3_endpoint_url:
            client_kwargs["endpoint_url"] = storage.s3_endpoint_url
        if storage.s3_region:
            client_kwargs["region_name"] = storage.s3_region
        # A fresh instance rather than fsspec's cache: tests start S3 servers on new ports.
        fs = s3fs.S3FileSystem(client_kwargs=client_kwargs, skip_instance_cache=True)
        return fs, uri[len("s3://"):].rstrip("/")
    if is_remote(uri):
        name = scheme(uri)[:-3]
        try:
            fs, path = fsspec.core.url_to_fs(uri)
        except ImportError as e:
            package = PACKAGES.get(name, "the fsspec implementation")
            raise ValueError(f"{uri}: {name}:// needs {package}, which is not installed "
                             f"(pip install {package}; docs/cloud.md)") from e
        except ValueError as e:     # fsspec: "Protocol not known"
            raise ValueError(f"unsupported URI scheme in {uri!r}: use a local path or a URL "
                             f"fsspec knows (s3://, gs://, az://...): {e}") from None
        return fs, path.rstrip("/")
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    return fsspec.filesystem("file", auto_mkdir=True), os.path.abspath(path)


def pyarrow_filesystem(fs: fsspec.AbstractFileSystem) -> pyarrow.fs.FileSystem:
    """The filesystem Ray Data and Ray Train get for ``fs``: Arrow's native S3 client for S3
    (same endpoint and region), else ``fs`` wrapped for Arrow."""
    if "s3" in _protocols(fs):
        kwargs = getattr(fs, "client_kwargs", None) or {}
        endpoint, region = kwargs.get("endpoint_url"), kwargs.get("region_name")
        options: dict[str, Any] = {}
        if endpoint:
            m = _SCHEME.match(endpoint)
            options["endpoint_override"] = endpoint[m.end():] if m else endpoint
            options["scheme"] = m.group(1) if m else "https"
        if region:
            options["region"] = region
        return pyarrow.fs.S3FileSystem(**options)
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


def join(base: str, *parts: str) -> str:
    return posixpath.join(base, *parts)


def write_bytes_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``path`` so that readers see the old file or the whole new one, never a part.

    Local files go through a temporary name and ``os.replace``. An S3 PUT is already atomic
    per object, so it is written in one request.
    """
    if "file" in fs.protocol:
        os.replace(_local_temp(path, data), path)
    else:
        fs.pipe_file(path, data)


def _local_temp(path: str, data: bytes) -> str:
    """``data`` written and synced under a unique temporary name next to ``path``."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def create_json(fs: fsspec.AbstractFileSystem, path: str, obj: Any) -> bool:
    """Write ``path`` only if nothing is there: True if this call created it, False if it
    existed. Readers see the whole file or none; of several writers racing for one path
    exactly one wins.

    Locally: a complete temporary file, then ``os.link`` (fails when the name exists). On S3:
    one PUT with ``If-None-Match: *`` (S3's conditional write; s3fs raises FileExistsError
    when the key exists). No lock is taken, so a killed writer leaves nothing that blocks.
    """
    data = (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()
    if "file" in fs.protocol:
        tmp = _local_temp(path, data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
        return True
    if "s3" not in _protocols(fs):
        # Stores without a conditional PUT in their fsspec client: check, then write. Two
        # writers racing within one request's time may both win; S3 and local paths cannot.
        if fs.exists(path):
            return False
        fs.pipe_file(path, data)
        return True
    try:
        fs.pipe_file(path, data, mode="create")
    except FileExistsError:
        return False
    return True


def write_json_atomic(fs: fsspec.AbstractFileSystem, path: str, obj: Any) -> None:
    write_bytes_atomic(fs, path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    with fs.open(path, "rb") as f:
        return json.loads(f.read())


def expand_shards(uri: str, storage: StorageConfig, suffixes: tuple[str, ...]) -> list[str]:
    """List the shard files under a folder/prefix (or matching a glob), sorted, as full URIs."""
    fs, path = filesystem(uri, storage)
    if any(c in path for c in "*?["):
        found = fs.glob(path)
    elif fs.isfile(path):
        found = [path]
    elif fs.isdir(path):
        found = [p for p in fs.find(path) if p.endswith(suffixes)]
    else:
        raise FileNotFoundError(f"no shards at {uri!r} (nothing exists there)")
    found = sorted(p for p in found if p.endswith(suffixes))
    if not found:
        raise FileNotFoundError(f"no {'/'.join(suffixes)} shards under {uri!r}")
    return [scheme(uri) + p for p in found]
