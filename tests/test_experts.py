"""Issue 4: the seed, concurrent experts, the registry, skips and failures, on a tiny world."""

import hashlib
import json
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest

from pipeline import experts, shards
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


def test_seed_gets_the_threads_of_max_concurrent_runs_but_no_more_than_a_node_has():
    cfg = load_config("demo", ["train.threads_per_worker=1", "train.max_concurrent=3"])
    assert experts.seed_config(cfg, node_cpus=16).train.threads_per_worker == 3
    assert experts.seed_config(cfg, node_cpus=2).train.threads_per_worker == 2
    # threads_per_worker 0 (Ray's default: the worker's CPUs) stays 0
    auto = load_config("demo", ["train.threads_per_worker=0"])
    assert experts.seed_config(auto, node_cpus=2).train.threads_per_worker == 0


def test_seed_trains_on_all_data_and_is_registered(seeded):
    seed = registry(seeded)["seed"]
    m = json.loads((seeded / "training_data" / "_manifest.json").read_text())
    assert seed["samples"] == m["rows_out"] and m["rows_in"] == 600
    assert m["rows_in"] == m["rows_out"] + sum(m["rows_skipped"].values())
    assert seed["metrics"]["samples_seen"] == 384 and seed["metrics"]["step"] == 12
    ckpt = Path(seed["checkpoint"]) / "checkpoint.pt"
    assert hashlib.sha256(ckpt.read_bytes()).hexdigest() == seed["sha256"]


def test_training_data_manifest_counts_what_each_run_reads(seeded):
    """The launcher takes each run's sample count from the manifest instead of a counting pass:
    it must equal what the run's reader yields."""
    cfg = load_config("demo", TINY[1::2])
    run = RunDir(str(seeded), cfg.storage)
    for job in [experts.seed_job(cfg), *experts.plan(cfg)]:
        counted = experts.dataset(run, cfg, job, columns=["key", "random_id"]).count()
        assert shards.run_rows(run, cfg, job.kind, job.index) == counted, job.name
    # Another out-of-cluster draw than the manifest's: no number, the launcher counts instead.
    other = load_config("demo", [*TINY[1::2], "train.ooc_ratio=0.1"])
    assert shards.run_rows(run, other, "expert", 0) is None
    assert shards.run_rows(run, other, "random_split", 0) == shards.run_rows(run, cfg, "random_split", 0)


@pytest.fixture(scope="module")
def trained(seeded, tmp_path_factory):
    """The seeded run with every expert and both baselines trained (jobs/train_experts.py)."""
    run = copy_run(seeded, tmp_path_factory.mktemp("trained") / "run")
    # Three at once: dense (the longest) starts first, next to expert-0 and expert-1.
    assert experts_job.main(["--run-dir", run.uri, "--set", "train.max_concurrent=3",
                             "--set", "train.cpus_per_worker=0.3"]) == 0
    return Path(run.uri)


def test_two_experts_train_concurrently_and_each_owns_its_data(trained, tmp_path):
    run = copy_run(trained, tmp_path / "run")
    reg = registry(tmp_path / "run")
    assert sorted(reg) == ["dense", "expert-0", "expert-1", "random-0", "random-1", "seed"]
    # Baselines: dense saw what the two experts saw together; random parts have the experts' sizes.
    assert reg["dense"]["metrics"]["samples_seen"] == 384 + 2 * (768 - 384)
    assert reg["dense"]["init_checkpoint"] == reg["seed"]["checkpoint"]
    sizes = pd.read_parquet(tmp_path / "run" / "training_data").groupby("expert_id").size()
    n = int(sizes.sum())
    for e in (0, 1):   # a seeded uniform split with the experts' shares: sizes within 4 sigma
        p = sizes[e] / n
        assert abs(reg[f"random-{e}"]["samples"] - sizes[e]) <= 4 * (n * p * (1 - p)) ** 0.5
    assert sum(reg[f"random-{e}"]["samples"] for e in (0, 1)) == n
    e0, e1 = reg["expert-0"], reg["expert-1"]
    # Both ran at the same time on the 2-CPU machine, and never more than 3 runs at once.
    assert e0["wall"]["start"] < e1["wall"]["end"] and e1["wall"]["start"] < e0["wall"]["end"]
    spans = [(e["wall"]["start"], e["wall"]["end"]) for n, e in reg.items() if n != "seed"]
    assert max(sum(s <= t < end for s, end in spans) for t, _ in spans) <= 3
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
                                  experts.plan(load_config("demo", TINY[1::2])), 2,
                                  log=lambda *_: None)
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


# ----------------------------------------------------------------------------- issue 5
def test_evaluate_writes_the_report_with_every_row(trained, tiny_world, tmp_path, capsys):
    import evaluate as evaluate_job  # jobs/evaluate.py

    run = copy_run(trained, tmp_path / "run")
    tasks = [str(tiny_world / "eval" / t) for t in ("shapes", "digits")]
    assert evaluate_job.main(["--run-dir", run.uri, "--tasks", tasks[0], "--tasks", tasks[1],
                              "--retrieval", str(tiny_world / "eval" / "retrieval"),
                              "--demo-data", str(tiny_world)]) == 0
    out = tmp_path / "run" / "eval"
    report = json.loads((out / "report.json").read_text())
    methods = {"expert-0", "expert-1", "oracle", "uniform", "routed (T=8)", "routed (T=1)",
               "routed top-1", "random-split", "dense", "seed"}
    for task, n_classes in (("shapes", 8), ("digits", 10)):
        r = report["zero_shot"][task]
        assert set(r["accuracy"]) == methods and r["classes"] == n_classes
        assert r["images"] == 2 * n_classes          # tiny world: 2 images per class
        assert all(0 <= a <= 1 for a in r["accuracy"].values())
        assert r["accuracy"]["oracle"] == max(r["accuracy"]["expert-0"], r["accuracy"]["expert-1"])
        for w in r["weights"].values():
            assert len(w) == 2 and abs(sum(w) - 1) < 1e-9
        assert max(r["weights"]["T=1"]) >= max(r["weights"]["T=8"])  # sharper
    retrieval = report["retrieval"]
    assert methods - {"routed top-1"} <= set(retrieval)
    assert all(0 <= v <= 1 for m in retrieval.values() for k, v in m.items() if k != "expert")
    assert retrieval["uniform"]["i2t_r5"] >= retrieval["uniform"]["i2t_r1"]
    confusion = pd.DataFrame(report["confusion"])
    assert confusion.to_numpy().sum() == len(pd.read_parquet(tmp_path / "run" / "assignments"))
    md = (out / "report.md").read_text()
    assert "| routed (T=8) |" in md and "| dense |" in md and "Retrieval" in md
    for png in ("accuracy.png", "routing.png", "sizes.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert "| random-split |" in capsys.readouterr().out


def test_predict_prints_labels_and_weights(trained, tmp_path, capsys):
    import numpy as np
    import predict as predict_job  # jobs/predict.py

    from pipeline.demo_world import render

    jpg, _, _ = render(np.random.default_rng(0), "shapes", "star", 32)
    (tmp_path / "star.jpg").write_bytes(jpg)
    assert predict_job.main(["--run-dir", str(trained), "--image", str(tmp_path / "star.jpg"),
                             "--labels", "circle,star,square", "--top-k", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    probs = [float(line.split("%")[0]) for line in lines[:3]]
    assert abs(sum(probs) - 100) < 0.5 and probs == sorted(probs, reverse=True)
    assert {line.split()[-1] for line in lines[:3]} == {"circle", "star", "square"}
    weights = [float(x.split()[-1]) for x in lines[-1].removeprefix("expert weights: ").split(",")]
    assert sorted(weights) == [0.0, 1.0]                 # top-1: one expert ran
    with pytest.raises(SystemExit):
        predict_job.main(["--run-dir", str(trained), "--image", str(tmp_path / "none.jpg"),
                          "--labels", "a,b"])
