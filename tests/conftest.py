import os
import socket

import pytest

# Credentials for the local S3 server only. Set before Ray starts so its workers inherit them,
# as they would inherit an instance role's on a real cluster.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# What pipeline.raycluster.init_ray does for a local Ray: one parquet footer-reading actor per
# read instead of Ray Data's 32 (each a new process on these 2 cores).
os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")


@pytest.fixture(scope="session")
def ray_local():
    """One private local Ray for the whole session (never `ray stop`: it kills other users')."""
    import ray
    from ray.data import DataContext

    ray.init(address="local", num_cpus=2, object_store_memory=300 * 1024**2,
             include_dashboard=False, log_to_driver=False)
    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 protocol server (moto) on 127.0.0.1, with a bucket named `mode`."""
    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="mode")
    yield endpoint
    server.stop()


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """A small demo world shared by the tests that only read it."""
    from pipeline.config import DemoConfig, StorageConfig
    from pipeline.demo_world import generate

    out = tmp_path_factory.mktemp("world")
    cfg = DemoConfig(samples=600, samples_per_shard=200, new_domain_samples=100,
                     eval_per_class=2, seed=3)
    generate(str(out), cfg, StorageConfig(), log=lambda *_: None)
    return out
