"""The whole pipeline on a Ray cluster of three nodes on this machine, every job by `ray job
submit --working-dir`, shards and run directory on a local S3 server (moto), as on a real cluster.

A head that runs no task and two 1-CPU worker nodes, each declaring one `accel`: a custom
resource standing in for a GPU (`train.worker_resources=accel=1` puts one expert on each node,
as `use_gpu` would on one-GPU nodes). The tests run in file order and share the cluster and the
run: the seed (module fixture), then the two experts at once, then the report. Distinctive random
S3 keys sit in every node's environment (as an instance role would provide them) and must appear
in no artifact or job log.

`make test` trains the experts in one plain job. The faults are `make test-reliability`'s (marker
``reliability``): there the experts lose a worker node mid-run, and a `train_experts` job is
stopped and submitted again; the report then holds the dense-matched run too.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import time
from pathlib import Path

import pytest

from pipeline.core.localnodes import LocalCluster
from tests.tiny import TINY

# In `make test`, and first in it (tests/conftest.py): 7.5 min alone on 2 cores. `pytest -m
# multinode` runs it with the autoscaling test (docs/development.md).
pytestmark = [pytest.mark.slow, pytest.mark.multinode]

REPO = Path(__file__).resolve().parents[1]
RUN = "s3://mode/mn/run"
DATA = "s3://mode/mn/data"
# Two experts, one per worker node (`accel`). The workers reserve no CPU, as Ray Train's GPU
# workers do by default: a node's CPU goes to Ray Data, half a CPU per read (and a whole one
# for the listing of a read's files, which Ray Data always asks for: pipeline/training/resources.py).
# T=2,048: 32 steps per expert, 8 checkpoints (every 4 steps), long enough to lose a node in
# the middle. Worker groups may restart twice (train.max_failures).
T = 2048
SEED_SAMPLES = T // 2              # TINY's train.seed_fraction=0.5; each expert trains the rest
CONFIG = [*TINY, "--set", "cluster.num_experts=2", "--set", f"train.total_samples={T}",
          "--set", "train.warmup_samples=256", "--set", "train.cpus_per_worker=0",
          "--set", "train.data_cpus=0.5", "--set", "train.worker_resources=accel=1",
          "--set", "train.max_failures=2", "--set", "train.max_concurrent=2",
          "--set", "embed.num_cpus_per_actor=0.5"]


class Cluster(LocalCluster):
    def __init__(self, workdir: Path, s3_endpoint: str):
        self.keys = {"AWS_ACCESS_KEY_ID": f"AKIA{secrets.token_hex(8).upper()}",
                     "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(30)}
        super().__init__(workdir, head_cpus=0, extra_env={
            **self.keys, "AWS_EC2_METADATA_DISABLED": "true", "HF_HUB_OFFLINE": "1",
            "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1"})
        self.s3_endpoint = s3_endpoint
        self.code = workdir / "code"      # what `--working-dir` ships: the jobs and the package
        for part in ("pipeline", "jobs"):
            shutil.copytree(REPO / part, self.code / part, ignore=shutil.ignore_patterns("__pycache__"))
        self.logs: dict[str, str] = {}

    def submit(self, job_id: str, script: str, *args: str, wait: bool = True) -> str:
        """Submit ``python jobs/<script>.py --run-dir RUN <args> <CONFIG>``; with ``wait``,
        return its status once it ended (its log in ``self.logs``)."""
        super().submit(job_id, self.code, "python", f"jobs/{script}.py", "--run-dir", RUN, *args,
                       *CONFIG, "--set", f"storage.s3_endpoint_url={self.s3_endpoint}")
        return self.wait(job_id) if wait else "PENDING"

    def wait(self, job_id: str, timeout: float = 480) -> str:
        state = super().wait(job_id, timeout)
        self.job_log(job_id)
        return state

    def job_log(self, job_id: str) -> str:
        self.logs[job_id] = super().job_log(job_id)
        return self.logs[job_id]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3_endpoint, tiny_world):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    for path in sorted(tiny_world.rglob("*")):
        if path.is_file():
            s3.upload_file(str(path), "mode", f"mn/data/{path.relative_to(tiny_world)}")
    c = Cluster(tmp_path_factory.mktemp("multinode"), s3_endpoint)
    try:
        c.add_worker("w1", cpus=1, resources={"accel": 1})
        c.add_worker("w2", cpus=1, resources={"accel": 1})
        yield c
    finally:
        c.stop()


def _s3(cluster):
    import boto3

    return boto3.client("s3", endpoint_url=cluster.s3_endpoint)


def _objects(cluster, prefix: str) -> dict[str, bytes]:
    s3 = _s3(cluster)
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket="mode", Prefix=prefix)
    return {o["Key"]: s3.get_object(Bucket="mode", Key=o["Key"])["Body"].read()
            for page in pages for o in page.get("Contents", [])}


def _json(cluster, key: str) -> dict:
    return json.loads(_s3(cluster).get_object(Bucket="mode", Key=key)["Body"].read())


def _keys(cluster, prefix: str) -> list[str]:
    pages = _s3(cluster).get_paginator("list_objects_v2").paginate(Bucket="mode", Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def _wait_for_a_checkpoint(cluster, job_id: str, prefix: str) -> None:
    """Until Ray Train has registered a checkpoint of the run under ``prefix``: its checkpoint
    manager's snapshot (Ray Train V2's own file) is written once it has taken one. A checkpoint
    file alone is not enough: a restart resumes only from checkpoints the controller took."""
    deadline = time.time() + 300
    while f"{prefix}checkpoint_manager_snapshot.json" not in _keys(cluster, prefix):
        assert cluster.status(job_id) in ("RUNNING", "PENDING"), cluster.job_log(job_id)
        assert time.time() < deadline, cluster.job_log(job_id)
        time.sleep(0.5)


@pytest.fixture(scope="module")
def seeded(cluster):
    """ingest, embed, cluster, assign and the seed: one job (jobs/run_pipeline.py --until seed)."""
    assert cluster.submit("mn-seed", "run_pipeline", "--data", f"{DATA}/train", "--until", "seed"
                          ) == "SUCCEEDED", cluster.logs["mn-seed"]
    # Inside a job the helper joins the cluster instead of starting a private Ray.
    assert "joined ray cluster" in cluster.logs["mn-seed"]
    return RUN


def test_a_jobs_log_holds_its_own_lines_once_without_escape_codes(cluster, seeded):
    """What a job prints (pipeline/core/console.py) as its log file has it: every stage's summary, no
    escape code, no line twice, none of Ray's own lines, and where Ray's logs are."""
    text = cluster.logs["mn-seed"]
    lines = [line for line in text.splitlines() if line.strip()]
    for stage in ("ingest", "embeddings", "clusters", "assignments", "training_data"):
        assert any(line.startswith(f"[{stage}] read ") for line in lines), (stage, text)
    assert "[seed] done: " in text
    assert not re.search(r"\x1b\[", text)
    repeated = {line for line in lines if lines.count(line) > 1}
    assert not repeated, repeated
    assert not [line for line in lines if line.startswith(("(raylet)", "(pid=", "(Map"))], text
    assert not [line for line in lines if "logging_progress" in line or "streaming_executor" in line]
    assert len(lines) < 80, text
    assert Path(re.search(r"Ray's logs: (\S+)", text).group(1)).is_dir()


def _both_experts_finished(cluster) -> dict[str, dict]:
    """The registry entries of the seed and both experts; checks that the experts trained at
    once, one per worker node, each to exactly its planned step."""
    names = {n["node_id"]: n["node_name"] for n in cluster.alive_nodes()}
    entries = {n: _json(cluster, f"mn/run/registry/{n}.json") for n in ("seed", "expert-0", "expert-1")}
    first, second = entries["expert-0"], entries["expert-1"]
    assert first["wall"]["start"] < second["wall"]["end"] and second["wall"]["start"] < first["wall"]["end"]
    for e in (first, second):
        assert e["metrics"]["samples_seen"] == T and e["metrics"]["step"] == T // 32
    # each first started on a node of its own (a lost node's run may restart on the other)
    first_nodes = {e["starts"][0]["node_id"] for e in (first, second)}
    assert len(first_nodes) == 2 and {names.get(n, "lost") for n in first_nodes} <= {"w1", "w2", "lost"}
    # the workers ran the job's working directory, not this checkout
    for e in entries.values():
        for s in e["starts"]:
            assert "runtime_resources" in s["pipeline"] and str(REPO) not in s["pipeline"], s
    return entries


def _registered(cluster, name: str) -> bool:
    return f"mn/run/registry/{name}.json" in _keys(cluster, "mn/run/registry/")


@pytest.mark.reliability
def test_two_experts_at_once_finish_after_losing_a_worker_node(cluster, seeded):
    """Both experts train at once, one per node. The node under expert-1 is killed after its
    first checkpoint; its worker group restarts (train.max_failures) from that checkpoint on the
    remaining node once expert-0 frees it, and ends at exactly the planned step."""
    names = {n["node_id"]: n["node_name"] for n in cluster.alive_nodes()}
    cluster.submit("mn-experts", "train_experts", "--experts", "0,1", wait=False)
    prefix = "mn/run/checkpoints/expert-1/"
    _wait_for_a_checkpoint(cluster, "mn-experts", prefix)
    start = _json(cluster, next(k for k in _keys(cluster, f"{prefix}_starts/")))
    victim = names[start["node_id"]]
    assert victim in ("w1", "w2")
    cluster.kill_worker(victim)
    assert cluster.wait("mn-experts") == "SUCCEEDED", cluster.logs["mn-experts"]

    entries = _both_experts_finished(cluster)
    lost, kept = entries["expert-1"], entries["expert-0"]
    assert lost["restarts"] >= 1 and kept["restarts"] == 0
    # the second start resumed from a checkpoint of the first, on the node that was left
    assert lost["starts"][1]["step"] > entries["seed"]["metrics"]["step"]
    assert names[lost["starts"][-1]["node_id"]] != victim
    log = cluster.logs["mn-experts"]
    assert "resumed from its latest checkpoint" in log and "fit, with room for" in log


@pytest.mark.reliability
def test_a_stopped_train_experts_job_resumes_when_submitted_again(cluster, seeded):
    """`ray job stop` mid-dense-matched, then the same job again: the finished experts are
    skipped, the dense-matched run resumes from its latest checkpoint and ends where it was
    planned to."""
    if not _registered(cluster, "expert-1"):    # run alone: the experts first, undisturbed
        assert cluster.submit("mn-experts-plain", "train_experts", "--experts", "0,1") == "SUCCEEDED"
    cluster.submit("mn-dense-1", "train_experts", "--baselines", "dense-matched", wait=False)
    _wait_for_a_checkpoint(cluster, "mn-dense-1", "mn/run/checkpoints/dense-matched/")
    cluster.ray("job", "stop", "mn-dense-1", check=True)
    assert cluster.wait("mn-dense-1") == "STOPPED"
    assert cluster.submit("mn-dense-2", "train_experts", "--baselines", "dense-matched") == "SUCCEEDED", \
        cluster.logs["mn-dense-2"]
    log = cluster.logs["mn-dense-2"]
    assert "[expert-0] complete for this config: skipped" in log
    assert "[expert-1] complete for this config: skipped" in log
    assert "[dense-matched] resumed from its latest checkpoint" in log
    dense, seed = (_json(cluster, f"mn/run/registry/{n}.json") for n in ("dense-matched", "seed"))
    assert dense["metrics"]["start_step"] > seed["metrics"]["step"]
    assert dense["metrics"]["samples_seen"] == SEED_SAMPLES + 2 * (T - SEED_SAMPLES)  # + m shares


def test_two_experts_train_at_once_one_per_node(cluster, seeded):
    """One `train_experts` job: both experts at once, one per worker node (`accel`), each from
    the seed to its planned step. Under `make test-reliability` the node-loss test has trained
    them already, and this checks what it left."""
    if not _registered(cluster, "expert-1"):
        assert cluster.submit("mn-experts-plain", "train_experts", "--experts", "0,1") == "SUCCEEDED", \
            cluster.logs["mn-experts-plain"]
        assert "fit, with room for" in cluster.logs["mn-experts-plain"]
    entries = _both_experts_finished(cluster)
    for e in ("expert-0", "expert-1"):
        assert entries[e]["init_checkpoint"] == entries["seed"]["checkpoint"]


def test_the_cluster_run_ends_in_a_report_and_holds_no_credential(cluster, seeded):
    # --verbose: Ray's and the libraries' debug lines too (botocore's debug lines can print a key id)
    assert cluster.submit("mn-eval", "evaluate", "--verbose") == "SUCCEEDED", cluster.logs["mn-eval"]
    written = _objects(cluster, "mn/run/")
    report = json.loads(written["mn/run/eval/report.json"])
    dense = {"dense-matched"} if _registered(cluster, "dense-matched") else set()   # test-reliability's
    assert set(report["runs"]) == {"seed", "expert-0", "expert-1", *dense}
    assert "Training cost" in written["mn/run/eval/report.md"].decode()
    for key, blob in written.items():
        if key.endswith("_manifest.json"):
            m = json.loads(blob)
            assert m["rows_in"] == m["rows_out"] + sum(m["rows_skipped"].values()), key
    ing, emb, asg = (json.loads(written[f"mn/run/{stage}/_manifest.json"])
                     for stage in ("ingest", "embeddings", "assignments"))
    assert ing["rows_in"] == 600 and asg["rows_out"] == emb["rows_out"] == ing["rows_out"]
    assert "mn/run/assignments/_sizes.png" in written
    # the S3 keys and the Ray token every node had in its environment: in no manifest,
    # config.yaml, registry entry, report, or any job's log (docs/cluster.md, "Security")
    assert {"mn/run/config.yaml", "mn/run/registry/expert-1.json"} <= set(written)
    texts = [*written.values(), *(log.encode() for log in cluster.logs.values())]
    for value in [*cluster.keys.values(), cluster.env["RAY_AUTH_TOKEN"]]:
        for text in texts:
            at = text.find(value.encode())
            assert at < 0, text[max(0, at - 300):at + 60]
