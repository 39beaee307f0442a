"""A stand-in for an object store that is neither S3 nor a local path (GCS, Azure): an fsspec
filesystem with its own scheme, ``bucket://``, whose objects are files. ``bucket:///tmp/x`` is
the file ``/tmp/x``. Importing this module registers the scheme with fsspec (Ray workers import
it when they unpickle the filesystem)."""

import fsspec
from fsspec.implementations.local import LocalFileSystem


class LocalBucket(LocalFileSystem):
    protocol = ("bucket",)
    root_marker = "/"

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("auto_mkdir", True)    # an object store has no folders to make first
        super().__init__(*args, **kwargs)

    @classmethod
    def _strip_protocol(cls, path):
        path = path[0] if isinstance(path, list) else path
        return super()._strip_protocol(path.removeprefix("bucket://"))

    def unstrip_protocol(self, name: str) -> str:
        return f"bucket://{self._strip_protocol(name)}"


fsspec.register_implementation("bucket", LocalBucket, clobber=True)
