"""Issue 4: the seed, concurrent experts, the registry, skips and failures, on a tiny world."""

import hashlib
import json
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest

from pipeline import experts
from pipeline.config import load_config
from pipeline.rundir import RunDir

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
import assign as assign_job  # noqa: E402  (jobs/assign.py)
import cluster as cluster_job  # noqa: E402
import embed as embed_job  # noqa: E402
import train_experts as experts_job  # noqa: E402
import train_seed as seed_job  # noqa: E402

TINY = ["--set", "cluster.fine_k=8", "--set", "cluster.num_experts=2", "--set", "cluster.restarts=1",
        "--set", "train.batch_size=32", "--set", "train.total_samples=768",
        "--set", "train.seed_fraction=0.5", "--set", "train.warmup_samples=64",
        "--set", "train.checkpoint_every_steps=4", "--set", "train.log_every_steps=4",
        "--set", "train.cpus_per_worker=0.5", "--set", "train.augment=false",
        "--set", "train.shuffle_buffer=0", "--set", "embed.rows_per_file=100"]


@pytest.fixture(scope="module")
def seeded(ray_local, tiny_world, tmp_path_factory):
    """A tiny run up to a trained seed: embed, cluster, assign, training_data, seed."""
    run_dir = tmp_path_factory.mktemp("run")
    common = ["--run-dir", str(run_dir), *TINY]
    data = ["--data", str(tiny_world / "train")]
    assert embed_job.main([*common, *data]) == 0
    assert cluster_job.main(common) == 0
    assert assign_job.main(common) == 0
    assert seed_job.main([*common, *data]) == 0
    return run_dir


def copy_run(src: Path, dst: Path) -> RunDir:
    shutil.copytree(src, dst)
    return RunDir(str(dst), load_config("demo").storage)


def registry(run_dir: Path) -> dict:
    return {e["name"]: e for e in json.loads((run_dir / "experts.json").read_text())}


def test_plan_follows_the_schedule():
    cfg = load_config("demo", ["train.total_samples=1000", "train.batch_size=100",
                               "train.seed_fraction=0.5", "cluster.num_experts=3",
                               "train.warmup_samples=100"])
    assert experts.seed_job(cfg).end_samples == 500
    jobs = {j.name: j for j in experts.plan(cfg)}
    assert sorted(jobs) == ["dense", "expert-0", "expert-1", "expert-2", "random-0", "random-1",
                            "random-2"]
    assert jobs["expert-1"].end_samples == jobs["expert-1"].schedule_total == 1000
    # Dense sees what the experts saw together: 500 + 3 * 500 samples.
    assert jobs["dense"].end_samples == jobs["dense"].schedule_total == 2000
    assert [j.name for j in experts.plan(cfg, [1], baselines=False)] == ["expert-1"]
    with pytest.raises(ValueError, match="expert 3 does not exist"):
        experts.plan(cfg, [3])


def test_seed_trains_on_all_data_and_is_registered(seeded):
    seed = registry(seeded)["seed"]
    m = json.loads((seeded / "training_data" / "_manifest.json").read_text())
    assert seed["samples"] == m["rows_out"] and m["rows_in"] == 600
    assert m["rows_in"] == m["rows_out"] + sum(m["rows_skipped"].values())
    assert seed["metrics"]["samples_seen"] == 384 and seed["metrics"]["step"] == 12
    ckpt = Path(seed["checkpoint"]) / "checkpoint.pt"
    assert hashlib.sha256(ckpt.read_bytes()).hexdigest() == seed["sha256"]


def test_two_experts_train_concurrently_and_each_owns_its_data(seeded, tmp_path):
    run = copy_run(seeded, tmp_path / "run")
    code = experts_job.main(["--run-dir", run.uri, "--no-baselines"])
    assert code == 0
    reg = registry(tmp_path / "run")
    e0, e1 = reg["expert-0"], reg["expert-1"]
    # Both ran at the same time on the 2-CPU machine.
    assert e0["wall"]["start"] < e1["wall"]["end"] and e1["wall"]["start"] < e0["wall"]["end"]
    for e in (e0, e1):
        assert e["init_checkpoint"] == reg["seed"]["checkpoint"]
        assert e["metrics"]["start_step"] == 12 and e["metrics"]["step"] == 24
    assert sorted(e0["fine_clusters"] + e1["fine_clusters"]) == list(range(8))
    rows = pd.read_parquet(tmp_path / "run" / "assignments")
    for e, entry in ((0, e0), (1, e1)):
        own = int((rows.expert_id == e).sum())
        assert own <= entry["samples"] <= own + 0.1 * (len(rows) - own)   # plus ~2% others

    # A rerun skips both: nothing is trained again, the registry is unchanged.
    before = (tmp_path / "run" / "experts.json").read_text()
    done, failed = experts.launch(load_config("demo", TINY[1::2]), run,
                                  experts.plan(load_config("demo", TINY[1::2]), baselines=False),
                                  2, log=lambda *_: None)
    assert done == [] and failed == {}
    assert (tmp_path / "run" / "experts.json").read_text() == before


def test_experts_flag_trains_only_that_expert(seeded, tmp_path):
    run = copy_run(seeded, tmp_path / "run")
    assert experts_job.main(["--run-dir", run.uri, "--experts", "1"]) == 0
    assert sorted(registry(tmp_path / "run")) == ["expert-1", "seed"]


def test_a_failing_expert_leaves_the_others_done(seeded, tmp_path):
    run = copy_run(seeded, tmp_path / "run")
    for f in (tmp_path / "run" / "training_data" / "expert_id=0").glob("*.parquet"):
        f.write_bytes(b"not parquet")
    # No out-of-cluster share: expert 1 reads only its own partition.
    assert experts_job.main(["--run-dir", run.uri, "--no-baselines", "--set", "train.ooc_ratio=0"]) == 1
    reg = registry(tmp_path / "run")
    assert "expert-1" in reg and "expert-0" not in reg


def test_experts_need_a_seed(ray_local, tmp_path):
    run = RunDir(str(tmp_path), load_config("demo").storage)
    with pytest.raises(RuntimeError, match="run jobs/train_seed.py first"):
        experts.launch(load_config("demo"), run, [], 1, log=lambda *_: None)
