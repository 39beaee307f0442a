"""A run directory and data that every node can reach (docs/cluster.md, "Shared storage"): on a
Ray cluster of several nodes, jobs refuse local paths outside storage.shared_mount before any
work; on one machine every path is fine."""

import pytest

from jobs import ingest as ingest_job
from pipeline.core import raycluster
from pipeline.core.raycluster import unshared_paths


def test_the_policy_follows_the_node_count_and_the_shared_mount(tmp_path):
    uris = [str(tmp_path / "run"), "s3://bucket/data", None]
    assert unshared_paths(uris, nodes=1, cpus=2, shared_mount=None) == []      # one machine
    assert unshared_paths(uris, nodes=3, cpus=2, shared_mount=None) == [str(tmp_path / "run")]
    # a head alone that runs no task: the work goes to worker nodes started later
    assert unshared_paths(uris, nodes=1, cpus=0, shared_mount=None) == [str(tmp_path / "run")]
    assert unshared_paths(uris, nodes=3, cpus=2, shared_mount=str(tmp_path)) == []
    # a sibling whose name starts like the mount is not under it
    assert unshared_paths([f"{tmp_path}-other/run"], nodes=3, cpus=2,
                          shared_mount=str(tmp_path)) == [f"{tmp_path}-other/run"]


def test_a_job_on_several_nodes_refuses_local_paths_before_writing(ray_local, tiny_world, tmp_path,
                                                                    monkeypatch):
    alive = [{"Alive": True}] * 3
    monkeypatch.setattr(raycluster.ray, "nodes", lambda: alive)
    run, data = tmp_path / "run", str(tiny_world / "train")
    with pytest.raises(SystemExit, match=r"local paths on a Ray cluster of 3 nodes: .*/run, .*/train\. "
                                         r"Every node must reach .* storage\.shared_mount"):
        ingest_job.main(["--run-dir", str(run), "--data", data])
    assert not run.exists()
    # the run directory under the declared mount, the data not: only the data is named
    with pytest.raises(SystemExit) as refused:
        ingest_job.main(["--run-dir", str(run), "--data", data,
                         "--set", f"storage.shared_mount={tmp_path}"])
    assert f": {data}. Every node" in str(refused.value) and not run.exists()
