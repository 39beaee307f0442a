"""Where data and runs may live: local paths and any fsspec URL, with Arrow's own S3 client on the
data path (pipeline/core/storage.py)."""

import importlib.util
import shutil

import pyarrow.fs
import pytest

from pipeline.core import stages
from pipeline.core.config import StorageConfig, load_config
from pipeline.core.rundir import RunDir
from pipeline.core.storage import filesystem, is_remote, pyarrow_filesystem, scheme, strip_scheme
from tests import buckets
from tests.tiny import TINY


def test_schemes_are_read_from_the_uri():
    for uri, want in [("s3://b/x", "s3://"), ("gs://b/x", "gs://"), ("az://c/x", "az://"),
                      ("bucket:///tmp/x", "bucket://"), ("file:///tmp/x", ""), ("/tmp/x", ""),
                      ("runs/demo", "")]:
        assert scheme(uri) == want, uri
        assert is_remote(uri) == bool(want)
    assert strip_scheme("gs://b/x") == "b/x" and strip_scheme("/tmp/x") == "/tmp/x"


@pytest.mark.skipif(importlib.util.find_spec("gcsfs") is not None, reason="gcsfs is installed")
def test_a_scheme_whose_package_is_missing_names_it():
    with pytest.raises(ValueError, match=r"gs:// needs gcsfs.*pip install gcsfs"):
        filesystem("gs://bucket/run", StorageConfig())
    with pytest.raises(ValueError, match="unsupported URI scheme"):
        filesystem("nosuchscheme://bucket/run", StorageConfig())


def test_ray_gets_arrows_own_s3_client_with_the_configured_endpoint(s3_endpoint):
    fs, _ = filesystem("s3://mode/x", StorageConfig(s3_endpoint_url=s3_endpoint, s3_region="eu-west-1"))
    arrow = pyarrow_filesystem(fs)
    assert isinstance(arrow, pyarrow.fs.S3FileSystem) and arrow.region == "eu-west-1"
    arrow.create_dir("mode/arrow-probe")
    with arrow.open_output_stream("mode/arrow-probe/a.txt") as f:
        f.write(b"written by Arrow")
    assert fs.cat_file("mode/arrow-probe/a.txt") == b"written by Arrow"   # the same server
    local, _ = filesystem("/tmp", StorageConfig())
    assert isinstance(pyarrow_filesystem(local), pyarrow.fs.PyFileSystem)


def test_a_run_on_another_object_store_runs_its_data_stages(ray_local, tiny_world, tmp_path):
    """A run directory and shards under a scheme that is neither s3:// nor local (the stand-in
    for gs:// or az://) go through ingest, embeddings, clusters and assignments as a local run
    does: fsspec for the project's files, the filesystem wrapped for Ray's readers and writers."""
    shutil.copytree(tiny_world / "train", tmp_path / "shards")
    data, run_uri = f"bucket://{tmp_path}/shards", f"bucket://{tmp_path}/run"
    cfg = load_config("demo", [o for o in TINY if o != "--set"])
    run = RunDir(run_uri, cfg.storage)
    assert isinstance(run.fs, buckets.LocalBucket) and run.stage_uri("ingest").startswith("bucket:///")
    quiet = {"log": lambda *_: None}
    ingested = stages.run_stage("ingest", cfg, run, data=data, **quiet)
    for name in ("embeddings", "clusters", "assignments"):
        stages.run_stage(name, cfg, run, **quiet)
    assert ingested["inputs"]["external"]["data"] == data
    assert run.manifest("assignments")["rows_out"] == ingested["rows_out"] > 0
    assert (tmp_path / "run" / "assignments" / "_manifest.json").is_file()    # the objects are files
