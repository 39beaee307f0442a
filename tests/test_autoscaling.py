"""Autoscaling from zero: an expert bound for the GPU node type brings up a GPU node, its data a
CPU node, and the GPU node goes once idle.

Ray's fake multi-node provider (``RAY_FAKE_CLUSTER=1``) plays the cloud: the head's autoscaler
monitor starts each "node" as a raylet of its own on this machine, all in the head's process
group. The head runs no task (``--num-cpus 0``); two worker types start at zero nodes:

* ``cpu``: ``{CPU: 1}``;
* ``gpu``: ``{CPU: 1, GPU: 1, gpu_node: 1}`` (a GPU in Ray's books only: this machine has no
  CUDA), with a custom resource naming the type, as docs/cluster.md's "Which preset fits which nodes"
  advises for keeping work on a node type.

One expert trains by ``ray job submit``. Its Ray Train worker asks for ``{CPU: 1, gpu_node: 1}``
(``train.cpus_per_worker=1``, ``train.worker_resources=gpu_node=1``), which only a ``gpu`` node
holds, so the autoscaler adds one. Not ``train.use_gpu``: Ray Train would then start NCCL and
place the model on CUDA, which a fake GPU cannot take. The launcher knows what the autoscaler
can add from ``ray.node_types`` (Ray 2.60 tells a job nothing of the node types), so its
resource plan accepts a cluster of a head alone. Ray Data's tasks ask for CPU only, so they
could land on the GPU node's CPU too; with the worker holding that node's only CPU and each
data task a whole CPU (``train.data_cpus=1``, the default; the file listing always asks for
1), none fits there and the autoscaler adds a ``cpu`` node for them, as a real GPU cluster
keeps its GPU nodes for training and decodes elsewhere. ``train.decode_in_worker=false`` keeps
the decoding in those data tasks (as GPU runs do), so the check covers read, filter and
decode. Ray Data's footer reader actors (0 CPU) may still sit on the GPU node; only tasks are
checked.

Node types: the fake provider gives each node ``RAY_NODE_TYPE_NAME`` in its processes'
environment but no label that ``ray list nodes`` shows, so a node's type is read from its
resources (a GPU: ``gpu``; CPU only: ``cpu``); ``ray list nodes`` keeps dead nodes with them.

After the run the GPU node is released once idle (``idle_timeout_minutes``). Stopping the test
kills the head's process group, which ends the fake nodes too; any process left naming the
cluster's temp dir or token is reported and killed (never ``ray stop``: other users' Ray).

The run directory, the seed checkpoint the expert starts from and the shards ingest read all
lie under pytest's base temp dir, declared ``storage.shared_mount`` (every fake node is this
machine).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import yaml

from pipeline.core.localnodes import LocalCluster, free_ports, processes_naming
from tests.tiny import copy_run, registry_of

# Not in `make test` (`make test-cluster`, 3-4 min): with it the suite would not stay under 30
# minutes with the venv on 2 cores (docs/benchmarks.md, "The suite").
pytestmark = [pytest.mark.slow, pytest.mark.multinode, pytest.mark.cluster]

REPO = Path(__file__).resolve().parents[1]
IDLE_MINUTES = 0.1           # the autoscaler releases a node idle this long
STORE = 200 * 1024**2        # object store of each node (the default takes 30% of RAM each)
NODE_TYPES = {"cpu": {"CPU": 1}, "gpu": {"CPU": 1, "GPU": 1, "gpu_node": 1}}
# The same, for the launcher's resource plan (ray.node_types)
DECLARED = "1 x CPU=1; 1 x CPU=1,GPU=1,gpu_node=1"


def autoscaling_config(gcs_port: int) -> dict:
    """The fake provider's cluster config (the fields of Ray's fake_multi_node/example.yaml,
    which the wheel does not ship): every worker type from zero, at most one node of each."""
    return {
        "cluster_name": "fake_multinode", "max_workers": len(NODE_TYPES),
        # Without gcs_address the provider points its nodes at port 6379.
        "provider": {"type": "fake_multinode", "gcs_address": f"127.0.0.1:{gcs_port}",
                     "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True},
        "available_node_types": {
            "ray.head.default": {"resources": {}, "node_config": {}, "max_workers": 0},
            **{name: {"resources": {**res, "object_store_memory": STORE}, "node_config": {},
                      "min_workers": 0, "max_workers": 1} for name, res in NODE_TYPES.items()},
        },
        "head_node_type": "ray.head.default", "idle_timeout_minutes": IDLE_MINUTES,
        "upscaling_speed": 1.0, "auth": {}, "docker": {}, "file_mounts": {},
        "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [], "rsync_exclude": [], "rsync_filter": [],
    }


class AutoscalingCluster(LocalCluster):
    """A head with the fake provider's autoscaler; worker nodes come and go by themselves."""

    def __init__(self, workdir: Path):
        ports = tuple(free_ports(4))
        config = workdir / "autoscaling.json"
        config.write_text(json.dumps(autoscaling_config(ports[0])))
        super().__init__(workdir, head_cpus=0, ports=ports, extra_env={
            "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "HF_HUB_OFFLINE": "1",
            "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1"},
            head_args=("--autoscaling-config", str(config), "--object-store-memory", str(STORE)))
        self.code = workdir / "code"      # what `--working-dir` ships: the jobs and the package
        for part in ("pipeline", "jobs"):
            shutil.copytree(REPO / part, self.code / part, ignore=shutil.ignore_patterns("__pycache__"))
        deadline = time.time() + 60       # the dashboard answers before the head node registers
        while not self.alive_nodes():
            assert time.time() < deadline, f"the head node did not register:\n{self.log('head')}"
            time.sleep(1)

    def nodes(self) -> list[dict]:
        """Every node the cluster has had, alive or dead."""
        out = self.ray("list", "nodes", "--format", "yaml", "--detail", "--limit", "1000",
                       timeout=60, check=True)
        nodes = yaml.safe_load(out.stdout)
        return nodes if isinstance(nodes, list) else []

    @staticmethod
    def node_type(node: dict) -> str:
        """``head``, ``gpu`` or ``cpu``, from the node's resources."""
        return "head" if node["is_head_node"] else "gpu" if node["resources_total"].get("GPU") else "cpu"

    def node_types(self) -> dict[str, str]:
        """node id -> its type, for every node the cluster has had."""
        return {n["node_id"]: self.node_type(n) for n in self.nodes()}

    def alive_of_type(self, kind: str) -> list[str]:
        return [n["node_id"] for n in self.nodes() if n["state"] == "ALIVE" and self.node_type(n) == kind]

    def tasks(self) -> list[dict]:
        out = self.ray("list", "tasks", "--format", "yaml", "--detail", "--limit", "10000",
                       timeout=120, check=True)
        return yaml.safe_load(out.stdout) or []

    def leftovers(self) -> list[int]:
        return processes_naming(str(self.temp), self.env["RAY_AUTH_TOKEN"])

    def stop(self, wait: float = 15) -> list[int]:
        """Kill the head's process group; return the cluster's processes still alive
        ``wait`` seconds later (then SIGKILLed: they name our temp dir or token, ours alone)."""
        super().stop()
        deadline = time.time() + wait
        while (left := self.leftovers()) and time.time() < deadline:
            time.sleep(1)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return left


@pytest.fixture
def cluster(tmp_path):
    c = AutoscalingCluster(tmp_path)
    try:
        yield c
    finally:
        c.stop()


def test_an_expert_for_the_gpu_type_scales_it_up_from_zero_and_releases_it(seeded, cluster, tmp_path,
                                                               tmp_path_factory):
    assert set(cluster.node_types().values()) == {"head"}, cluster.nodes()
    run = copy_run(seeded, tmp_path / "run")
    shared = tmp_path_factory.getbasetemp()     # the run, the seed's checkpoint, the shards
    started = time.time()
    out = cluster.ray(
        "job", "submit", "--submission-id", "autoscale-expert-0", "--working-dir", str(cluster.code),
        "--", "python", "jobs/train_experts.py", "--run-dir", run.uri, "--experts", "0",
        "--no-baselines", "--set", "train.worker_resources=gpu_node=1",
        "--set", "train.cpus_per_worker=1", "--set", f"ray.node_types={DECLARED}",
        "--set", "train.data_cpus=1", "--set", "train.decode_in_worker=false",
        "--set", f"storage.shared_mount={shared}", timeout=420)
    ended = time.time()
    log = out.stdout + out.stderr
    assert out.returncode == 0 and "Job 'autoscale-expert-0' succeeded" in log, log

    assert "fit, with room for 1 data task(s) of 1 CPU beside them, once the autoscaler adds nodes" in log
    entry = registry_of(Path(run.uri))["expert-0"]
    assert entry["restarts"] == 0 and entry["cost"]["cpu_seconds"] > 0, entry

    # The worker trained on the GPU node the autoscaler added; the data tasks ran on CPU nodes.
    types = cluster.node_types()
    tasks = cluster.tasks()
    trained_on = {types[t["node_id"]] for t in tasks if t["name"] == "RayTrainWorker.run_train_fn"}
    assert trained_on == {"gpu"}, trained_on
    data = [t for t in tasks if t["type"] == "NORMAL_TASK" and t["name"] != "_train_remote"]
    names = " ".join(t["name"] for t in data)
    assert "Read" in names and "preprocess_batch" in names, names
    where = {(t["name"], types.get(t["node_id"])) for t in data}
    assert {kind for _, kind in where} == {"cpu"}, where

    # Once idle, the GPU node goes.
    deadline = time.time() + IDLE_MINUTES * 60 + 60
    while cluster.alive_of_type("gpu"):
        assert time.time() < deadline, f"the gpu node is still alive {time.time() - ended:.0f} s after the run"
        time.sleep(2)
    released = time.time()
    print(f"job {ended - started:.0f} s; gpu node released {released - ended:.0f} s after it")

    left = cluster.stop()
    assert not left, f"processes of the cluster alive after its head's process group was killed: {left}"
