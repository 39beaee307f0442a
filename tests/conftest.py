import hashlib
import os
import socket
from pathlib import Path

import pytest

# Credentials for the local S3 server only. Set before Ray starts so its workers inherit them,
# as they would inherit an instance role's on a real cluster.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# What pipeline.core.raycluster.init_ray does for a local Ray: one parquet footer-reading actor per
# read instead of Ray Data's 32 (each a new process on these 2 cores), and no preemption watcher.
os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


@pytest.fixture(scope="session")
def ray_local():
    """One private local Ray for the whole test run (never `ray stop`: it kills other users')."""
    import ray
    from ray.data import DataContext

    from pipeline.core.raycluster import LOG_MONITOR_ENV

    for name, value in LOG_MONITOR_ENV.items():     # as init_ray sets them for a local Ray
        os.environ.setdefault(name, value)
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
    from pipeline.core.config import DemoConfig, StorageConfig
    from pipeline.data.demo_world import generate

    out = tmp_path_factory.mktemp("world")
    cfg = DemoConfig(samples=600, samples_per_shard=200, new_domain_samples=100,
                     eval_per_class=2, seed=3)
    generate(str(out), cfg, StorageConfig(), log=lambda *_: None)
    return out


@pytest.fixture(scope="session")
def hostile_world(tiny_world, tmp_path_factory):
    """Hostile shards (tests/hostile.py: every kind of bad record, and good rows that need
    repairs) beside one of the tiny world's tars (linked). Returns (folder, what was planted)."""
    import tarfile

    from tests import hostile

    first = tiny_world / "train" / "00000.tar"
    with tarfile.open(first) as tar:     # the world's own captions for the good hostile rows
        captions = [tar.extractfile(m).read().decode().strip() for m in tar.getmembers()
                    if m.name.endswith(".txt")]
    folder = tmp_path_factory.mktemp("hostile") / "train"
    planted = hostile.write(folder, "webdataset", [c for c in captions if c][:40])
    (folder / first.name).symlink_to(first)
    return folder, planted


@pytest.fixture(scope="session")
def hostile_run(ray_local, hostile_world, tmp_path_factory):
    """The tiny run's jobs over ``hostile_world``: ingest, embed, cluster, assign,
    training_data and the seed, which trains past one pass over its rows (384 samples of about
    230), so that its ``fed`` keys are every good row."""
    from jobs import assign, cluster, embed, ingest, train_seed
    from tests.tiny import TINY

    run_dir = tmp_path_factory.mktemp("hostile-run")
    common = ["--run-dir", str(run_dir), *TINY]
    assert ingest.main([*common, "--data", str(hostile_world[0])]) == 0
    for job in (embed, cluster, assign, train_seed):
        assert job.main(common) == 0
    return run_dir


@pytest.fixture(scope="session")
def seeded(ray_local, tiny_world, tmp_path_factory):
    """A tiny run up to a trained seed: ingest, embed, cluster, assign, training_data, seed."""
    from jobs import assign, cluster, embed, ingest, train_seed
    from tests.tiny import TINY

    run_dir = tmp_path_factory.mktemp("run")
    common = ["--run-dir", str(run_dir), *TINY]
    assert ingest.main([*common, "--data", str(tiny_world / "train")]) == 0
    assert embed.main(common) == 0
    assert cluster.main(common) == 0
    assert assign.main(common) == 0
    assert train_seed.main(common) == 0
    return run_dir


@pytest.fixture(scope="session")
def trained(seeded, tmp_path_factory):
    """The seeded run with every expert and a run of every baseline kind trained
    (jobs/train_experts.py; tests.tiny.BASELINES)."""
    from jobs import train_experts
    from tests.tiny import BASELINES, copy_run

    run = copy_run(seeded, tmp_path_factory.mktemp("trained") / "run")
    # Three at once: dense-matched (the longest) starts first, next to expert-0 and expert-1.
    assert train_experts.main(["--run-dir", run.uri, "--baselines", ",".join(BASELINES),
                               "--set", "train.max_concurrent=3",
                               "--set", "train.cpus_per_worker=0.3"]) == 0
    return Path(run.uri)


# The tiny run has 4 experts of about 125 samples; a new one needs at least 50 novel samples.
GROW = ["--set", "grow.min_novel_rows=50"]


def digests(root: Path) -> dict[str, str]:
    """sha256 of every file under a run directory, by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def grown(trained, tiny_world, tmp_path_factory):
    """The trained tiny run, evaluated, then grown by the held-out domain (arrows) by one
    add_experts job, then evaluated again. With the digests of its files before the growth and
    the report before it. (A killed add_experts job: make test-reliability.) Shared by the
    growth and serving tests: a test that changes it puts it back."""
    from jobs import add_experts as add_job
    from jobs import evaluate as evaluate_job
    from pipeline.core.config import StorageConfig
    from pipeline.core.rundir import RunDir
    from pipeline.evaluation import eval as evaluation
    from tests.tiny import copy_run

    run_dir = tmp_path_factory.mktemp("grown") / "run"
    copy_run(trained, run_dir)
    tasks = [arg for t in ("shapes", "digits", "arrows") for arg in ("--tasks", str(tiny_world / "eval" / t))]
    assert evaluate_job.main(["--run-dir", str(run_dir), *tasks]) == 0
    before = digests(run_dir)
    report_before = evaluation.load_report(RunDir(str(run_dir), StorageConfig()))
    assert add_job.main(["--run-dir", str(run_dir), "--data", str(tiny_world / "new_domain"),
                         "--name", "arrows", *GROW]) == 0
    assert evaluate_job.main(["--run-dir", str(run_dir), *tasks]) == 0
    return run_dir, before, report_before


# The fixtures that train models (Ray Train runs): a test that uses one trains, and is marked
# ``trains`` so that `make test-fast` can leave it out.
TRAINING_FIXTURES = {"seeded", "trained", "grown", "runs", "killed", "hostile_run"}


def pytest_collection_modifyitems(config, items):
    """Every test on a training fixture is marked ``trains``. The multi-node tests run first, in
    file order: their cluster is three more Ray nodes on the same 2 cores, and it runs a third
    faster before the test run's local Ray (``ray_local``) and its idle workers exist (12 min
    inside the suite after it, 7.5 min alone)."""
    for item in items:
        if TRAINING_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.trains)
    items.sort(key=lambda item: 0 if item.get_closest_marker("multinode") else 1)
