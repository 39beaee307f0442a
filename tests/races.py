"""What the two processes of tests/test_growth.py's races run. A module of its own, importing
only the registry and the level numbering: each spawned process imports it afresh, and the test
module's imports (Ray, the jobs, pandas) would cost it about 5 s of CPU on these 2 cores."""

import os

from pipeline.core import registry
from pipeline.core.config import StorageConfig
from pipeline.core.rundir import RunDir
from pipeline.grow import levels
from pipeline.training.runs import run_name


def register(uri: str, endpoint: str | None, writer: int, n: int) -> None:
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
    run = RunDir(uri, StorageConfig(s3_endpoint_url=endpoint))
    for i in range(n):
        registry.put(run, {"name": run_name("expert", 100 * writer + i), "kind": "expert",
                           "finished_at": f"{i:04d}"})


def claim(uri: str, endpoint: str | None, writer: int, n: int) -> None:
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
    run = RunDir(uri, StorageConfig(s3_endpoint_url=endpoint))
    for i in range(n):      # sizes differ per claim, so a misnumbered one would overlap another
        levels.claim(run, f"w{writer}-{i}", 1 + (writer + i) % 3, 5 + i, 4, 64)
