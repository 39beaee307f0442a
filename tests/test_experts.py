"""The checkpoints stage: the seed, concurrent experts, the registry, skips and failures, on a
tiny world; and the eval stage and predict job on its runs."""

import hashlib
import json
import shutil
import tarfile
from pathlib import Path

import pandas as pd
import pytest

from jobs import train_experts as experts_job
from pipeline.core import stages
from pipeline.core.config import load_config
from pipeline.core.rundir import RunDir
from pipeline.data import training_data
from pipeline.training import checkpoints
from pipeline.training.runs import ALL_BASELINES, Job, parse_name, plan
from pipeline.training.runs import seed_job as plan_seed
from tests.tiny import BASELINES, EXPERTS, TINY, copy_run, registry_of


def test_plan_follows_the_schedule():
    cfg = load_config("demo", ["train.total_samples=1000", "train.batch_size=100",
                               "train.seed_fraction=0.5", "train.warmup_samples=100"]).train
    assert plan_seed(cfg).end_samples == 500
    # by default the experts and the paper's dense baseline, full-0
    assert [j.name for j in plan(cfg, 3)] == ["expert-0", "expert-1", "expert-2", "full-0"]
    jobs = {j.name: j for j in plan(cfg, 3, baselines=ALL_BASELINES)}
    assert sorted(jobs) == ["dense-matched", "expert-0", "expert-1", "expert-2", "full-0", "full-1",
                            "full-2", "onestep-0", "onestep-1", "onestep-2", "random-split-0",
                            "random-split-1", "random-split-2"]
    # an expert, a full run, a random part and a OneStep expert each continue the seed for one
    # expert's budget
    for name in ("expert-1", "full-2", "random-split-0", "onestep-1"):
        assert jobs[name].end_samples == jobs[name].schedule_total == 1000, name
    # dense-matched sees what the experts saw together: 500 + 3 * 500 samples
    assert jobs["dense-matched"].end_samples == jobs["dense-matched"].schedule_total == 2000
    assert [j.name for j in plan(cfg, 3, [1], baselines=[])] == ["expert-1"]
    assert [j.name for j in plan(cfg, 3, [], baselines=["full-1", "dense-matched", "full-0"])] == \
        ["full-0", "full-1", "dense-matched"]
    with pytest.raises(ValueError, match="expert 3 does not exist"):
        plan(cfg, 3, [3])
    with pytest.raises(ValueError, match="not a baseline: 'dense'"):
        plan(cfg, 3, baselines=["dense"])
    with pytest.raises(ValueError, match="full runs full-0..full-2"):
        plan(cfg, 3, baselines=["full-3"])


def test_every_run_reads_the_data_in_an_order_of_its_own():
    jobs = [Job("seed", None, 1, 1), Job("dense-matched", None, 1, 1),
            *(Job(kind, i, 1, 1) for kind in ("expert", "full", "random-split", "onestep") for i in range(4))]
    orders = [job.order_seed(5) for job in jobs]
    assert len(set(orders)) == len(jobs) and orders[0] == 5
    assert len(set(orders) & {job.order_seed(6) for job in jobs}) == 0     # a training seed changes them all


def test_run_names_and_kinds_are_built_and_parsed_in_one_place():
    for job in [Job("seed", None, 1, 1), Job("expert", 2, 1, 1), Job("full", 1, 1, 1),
                Job("random-split", 0, 1, 1), Job("dense-matched", None, 1, 1)]:
        assert parse_name(job.name) == (job.kind, job.index)
        assert job.unit == f"checkpoints/{job.name}"
        assert stages.stage_of(job.unit).name == f"checkpoints/{job.kind}"
    with pytest.raises(ValueError, match="unknown run kind 'random_split'"):
        Job("random_split", 0, 1, 1)
    with pytest.raises(ValueError, match="needs index"):
        Job("expert", None, 1, 1)
    with pytest.raises(ValueError, match="takes no index"):
        Job("dense-matched", 0, 1, 1)
    with pytest.raises(ValueError, match="not a run name"):
        parse_name("random-0")


def test_seed_gets_the_threads_of_max_concurrent_runs_but_no_more_than_a_node_has():
    cfg = load_config("demo", ["train.threads_per_worker=1", "train.max_concurrent=3"]).train
    assert checkpoints.seed_threads(cfg, node_cpus=16) == 3
    assert checkpoints.seed_threads(cfg, node_cpus=2) == 2
    # threads_per_worker 0 (Ray's default: the worker's CPUs) stays 0
    auto = load_config("demo", ["train.threads_per_worker=0"]).train
    assert checkpoints.seed_threads(auto, node_cpus=2) == 0


def test_seed_trains_on_all_data_and_is_registered(seeded):
    seed = registry_of(seeded)["seed"]
    m = json.loads((seeded / "training_data" / "_manifest.json").read_text())
    ing = json.loads((seeded / "ingest" / "_manifest.json").read_text())
    assert seed["samples"] == m["rows_out"] == ing["rows_out"] and m["rows_in"] == 600
    assert m["rows_in"] == m["rows_out"] + sum(m["rows_skipped"].values())
    assert m["rows_skipped"] == ing["rows_skipped"] and m["stats"]["images_decoded"] == 0
    assert seed["metrics"]["samples_seen"] == 384 and seed["metrics"]["step"] == 12
    ckpt = Path(seed["checkpoint"]) / "checkpoint.pt"
    assert hashlib.sha256(ckpt.read_bytes()).hexdigest() == seed["sha256"]
    # the run's own manifest, written after its registry entry
    run_manifest = json.loads((seeded / "checkpoints" / "seed" / "_manifest.json").read_text())
    assert run_manifest["stats"]["entry"] == seed and run_manifest["rows_out"] == seed["samples"]
    assert set(run_manifest["fields"]) == set(stages.TRAIN_FIELDS)


@pytest.mark.slow
@pytest.mark.reliability
def test_hostile_records_are_counted_at_every_stage_and_every_good_one_is_trained_on(
        hostile_run, hostile_world):
    """The bad-input matrix end to end: a tiny run over hostile shards beside one of
    the tiny world's tars (tests/hostile.py). Every planted bad record is counted under its
    reason in every stage's manifest; every good one, repaired ones included, reaches the
    embeddings, the assignments and training_data with its image, once; and the seed model,
    which trains past one pass over its data, was fed every one of them (its ``fed`` keys)."""
    from pipeline.core.keys import digest
    from pipeline.data.images import open_rgb

    folder, planted = hostile_world
    run = RunDir(str(hostile_run), load_config("demo").storage)
    ing, td = run.manifest("ingest"), run.manifest("training_data")
    world_skips = {r: n - planted.skipped.get(r, 0) for r, n in ing["rows_skipped"].items()}
    assert set(planted.skipped) <= set(ing["rows_skipped"])
    assert {r: n for r, n in world_skips.items() if n} == {"empty_caption": world_skips["empty_caption"]}
    assert ing["rows_in"] == 200 + len(planted.good) + sum(planted.skipped.values())
    assert td["rows_skipped"] == ing["rows_skipped"] and td["rows_in"] == ing["rows_in"]
    assert ing["stats"]["fixes"] == planted.fixes
    samples = pd.read_parquet(hostile_run / "ingest" / "samples")
    assert {k for k in samples.key if k.startswith("hx")} == planted.good
    for stage in ("embeddings", "assignments", "training_data"):
        keys = pd.read_parquet(hostile_run / stage, columns=["key"]).key
        assert keys.is_unique and set(keys) == set(samples.key), stage
        assert run.manifest(stage)["rows_out"] == len(samples), stage
    rows = pd.read_parquet(hostile_run / "training_data").set_index("key")
    # CMYK, 16-bit, grayscale, a GIF, PNG under .jpg: all decode to RGB for training
    assert all(open_rgb(image).size == (32, 32) for image in rows.image)
    # the kept copy of a repeated key is the first shard's: its image, not the later copy's
    with tarfile.open(folder / "hostile-a.tar") as tar:
        first = tar.extractfile("hx-good-03.jpg").read()
    assert rows.at["hx-good-03", "image"] == first
    seed = registry_of(hostile_run)["seed"]
    assert seed["metrics"]["samples_seen"] > len(rows)
    assert seed["fed"] == {"rows": len(rows), "keys_digest": digest(rows.index), "complete": True}


def test_each_run_reports_the_keys_it_was_fed(trained):
    """dense-matched was fed every training row, each expert its own rows and its
    out-of-cluster share (count and pipeline.core.keys.digest); the seed, shorter than one pass,
    says so."""
    from pipeline.core.keys import digest

    cfg = load_config("demo", TINY[1::2]).train
    run = RunDir(str(trained), load_config("demo").storage)
    rows = pd.read_parquet(trained / "training_data", columns=["key"]).key
    reg = registry_of(trained)
    assert reg["dense-matched"]["fed"] == {"rows": len(rows), "keys_digest": digest(rows),
                                           "complete": True}
    for e in range(EXPERTS):
        job = Job("expert", e, 1, 1)
        keys = training_data.rows_for(run, job, EXPERTS, cfg.ooc_ratio, cfg.data_seed,
                                      columns=["key"]).to_pandas().key
        assert reg[job.name]["fed"] == {"rows": len(keys), "keys_digest": digest(keys),
                                        "complete": True}, job.name
    assert reg["dense-matched"]["fed"]["keys_digest"] != reg["expert-0"]["fed"]["keys_digest"]
    assert reg["seed"]["fed"]["complete"] is False
    assert reg["seed"]["fed"]["rows"] == reg["seed"]["metrics"]["samples_seen"]


def test_training_data_holds_ingests_good_rows_with_their_images(seeded):
    rows = pd.read_parquet(seeded / "training_data")
    samples = pd.read_parquet(seeded / "ingest" / "samples")
    assert sorted(rows.key) == sorted(samples.key) and rows.key.is_unique
    merged = rows.merge(samples, on="key", suffixes=("", "_ingest"))
    assert (merged.caption == merged.caption_ingest).all()
    assert rows.image.map(len).gt(100).all()


def test_training_data_manifest_counts_what_each_run_reads(seeded):
    """The launcher takes each run's sample count from the manifest instead of a counting pass:
    it must equal what the run's reader yields."""
    cfg = load_config("demo", TINY[1::2]).train
    run = RunDir(str(seeded), load_config("demo").storage)
    manifest = run.manifest("training_data")
    # (OneStep's clusters are not training_data's: its runs count their rows themselves)
    for job in [plan_seed(cfg), *plan(cfg, 2, baselines=["full", "random-split", "dense-matched"])]:
        counted = training_data.rows_for(run, job, EXPERTS, cfg.ooc_ratio, cfg.seed,
                                         columns=["key", "random_id"]).count()
        assert training_data.run_rows(manifest, job, cfg.ooc_ratio, cfg.seed) == counted, job.name
    # Counted while writing; the fallback that counts the written files (a retried write task
    # would have counted twice) gives the same numbers.
    assert training_data._count_runs(run, EXPERTS, cfg.ooc_ratio, cfg.seed) == manifest["stats"]["rows_per_run"]
    # the random split's parts partition the rows
    parts = [training_data.run_rows(manifest, Job("random-split", e, 1, 1), cfg.ooc_ratio, cfg.seed)
             for e in range(EXPERTS)]
    assert sum(parts) == manifest["rows_out"]
    # Another out-of-cluster draw than the manifest's: no number, the launcher counts instead.
    expert, part = Job("expert", 0, 1, 1), Job("random-split", 0, 1, 1)
    assert training_data.run_rows(manifest, expert, 0.1, cfg.seed) is None
    assert training_data.run_rows(manifest, part, 0.1, cfg.seed) == \
        training_data.run_rows(manifest, part, cfg.ooc_ratio, cfg.seed)


def test_experts_train_concurrently_and_each_owns_its_data(trained, tmp_path):
    run = copy_run(trained, tmp_path / "run")
    reg = registry_of(tmp_path / "run")
    ids = range(EXPERTS)
    assert sorted(reg) == sorted(["seed", *(f"expert-{e}" for e in ids), *BASELINES])
    # Baselines: dense-matched saw what the experts saw together, a full run one expert's
    # budget on all the data; random parts have the experts' sizes.
    assert reg["dense-matched"]["metrics"]["samples_seen"] == 384 + EXPERTS * (768 - 384)
    rows_out = run.manifest("training_data")["rows_out"]
    for name in ("full-0", "full-1", "dense-matched"):
        assert reg[name]["init_checkpoint"] == reg["seed"]["checkpoint"]
        assert reg[name]["samples"] == rows_out, name
    assert reg["full-0"]["metrics"]["samples_seen"] == reg["full-1"]["metrics"]["samples_seen"] == 768
    sizes = pd.read_parquet(tmp_path / "run" / "training_data").groupby("expert_id").size()
    n = int(sizes.sum())
    for e in (0, 1):   # a seeded uniform split with the experts' shares: sizes within 4 sigma
        p = sizes[e] / n
        assert abs(reg[f"random-split-{e}"]["samples"] - sizes[e]) <= 4 * (n * p * (1 - p)) ** 0.5
    e0, e1 = reg["expert-0"], reg["expert-1"]
    # Both ran at the same time on the 2-CPU machine, and never more than 3 runs at once.
    assert e0["wall"]["start"] < e1["wall"]["end"] and e1["wall"]["start"] < e0["wall"]["end"]
    spans = [(e["wall"]["start"], e["wall"]["end"]) for n, e in reg.items() if n != "seed"]
    assert max(sum(s <= t < end for s, end in spans) for t, _ in spans) <= 3
    experts = {e: reg[f"expert-{e}"] for e in ids}
    for e in experts.values():
        assert e["init_checkpoint"] == reg["seed"]["checkpoint"]
        assert e["metrics"]["start_step"] == 12 and e["metrics"]["step"] == 24
    assert sorted(f for e in experts.values() for f in e["fine_clusters"]) == list(range(8))
    rows = pd.read_parquet(tmp_path / "run" / "assignments")
    for e, entry in experts.items():
        own = int((rows.expert_id == e).sum())
        assert own <= entry["samples"] <= own + 0.1 * (len(rows) - own)   # plus ~2% others

    # A rerun skips them all: nothing is trained again, the registry is unchanged.
    cfg = load_config("demo", TINY[1::2])
    files = sorted((tmp_path / "run" / "registry").glob("*.json"))
    before = [f.read_bytes() for f in files]
    done, failed = checkpoints.launch(cfg, run, plan(cfg.train, EXPERTS, baselines=BASELINES), 2,
                                      log=lambda *_: None)
    assert done == [] and failed == {}
    assert sorted((tmp_path / "run" / "registry").glob("*.json")) == files
    assert [f.read_bytes() for f in files] == before
    # A knob (log_every_steps) reruns nothing; a field only the experts declare (ooc_ratio)
    # reruns exactly the experts: the seed and the baselines stay complete.
    assert stages.StageRun("checkpoints/expert-0", cfg, run).completed() is not None
    ooc = load_config("demo", [*TINY[1::2], "train.ooc_ratio=0.1", "train.log_every_steps=2"])
    complete = {job.name for job in [plan_seed(ooc.train), *plan(ooc.train, EXPERTS, baselines=BASELINES)]
                if stages.StageRun(job.unit, ooc, run).completed() is not None}
    assert complete == {"seed", *BASELINES}


@pytest.mark.reliability
def test_experts_flag_trains_only_those_and_a_failing_one_leaves_the_others_done(seeded, tmp_path,
                                                                                  capsys):
    """``--experts 0,1`` with expert 0's data broken: expert 1 trains and is registered, expert 0
    fails, nothing else is planned (no other expert, no baseline), and the job exits 1."""
    run = copy_run(seeded, tmp_path / "run")
    for f in (tmp_path / "run" / "training_data" / "expert_id=0").glob("*.parquet"):
        f.write_bytes(b"not parquet")
    # No out-of-cluster share: expert 1 reads only its own partition.
    assert experts_job.main(["--run-dir", run.uri, "--experts", "0,1", "--set", "train.ooc_ratio=0"]) == 1
    assert sorted(registry_of(tmp_path / "run")) == ["expert-1", "seed"]
    # The run's own log lines, printed by the Ray Train worker, reach this driver's console
    # through the console actor (worker output is not forwarded): once each.
    lines = capsys.readouterr().out.splitlines()
    steps = [line for line in lines if line.startswith("[expert-1] step ")]
    assert steps and len(steps) == len(set(steps)) and "ETA" in steps[-1]
    assert any(line.startswith("[expert-0] failed: ") for line in lines)


def test_experts_need_a_seed(seeded, tmp_path):
    run = copy_run(seeded, tmp_path / "run")
    (tmp_path / "run" / "checkpoints" / "seed" / "_manifest.json").unlink()
    cfg = load_config("demo", TINY[1::2])
    with pytest.raises(stages.MissingUpstream, match="run jobs/train_seed.py first"):
        checkpoints.launch(cfg, run, plan(cfg.train, EXPERTS), 1, log=lambda *_: None)
    # a seed trained with another learning rate is not what the experts start from
    (tmp_path / "run" / "checkpoints" / "seed").mkdir(exist_ok=True)
    shutil.copy(seeded / "checkpoints" / "seed" / "_manifest.json",
                tmp_path / "run" / "checkpoints" / "seed" / "_manifest.json")
    lr = load_config("demo", [*TINY[1::2], "train.lr=0.01"])
    with pytest.raises(stages.StaleUpstream, match=r"train\.lr=0\.003 \(the config now has 0\.01\)"):
        checkpoints.launch(lr, run, plan(lr.train, EXPERTS), 1, log=lambda *_: None)


# ----------------------------------------------------------------------------- eval
def test_evaluate_writes_the_report_with_every_row(trained, tiny_world, tmp_path, capsys):
    from jobs import evaluate as evaluate_job
    from pipeline.evaluation.eval import COARSE, METHODS, PAPER_FORMULA

    run = copy_run(trained, tmp_path / "run")
    tasks = [str(tiny_world / "eval" / t) for t in ("shapes", "digits")]
    assert evaluate_job.main(["--run-dir", run.uri, "--tasks", tasks[0], "--tasks", tasks[1],
                              "--retrieval", str(tiny_world / "eval" / "retrieval"),
                              "--demo-data", str(tiny_world)]) == 0
    out = tmp_path / "run" / "eval"
    report = json.loads((out / "report.json").read_text())
    routed = {"routed (T=8)", PAPER_FORMULA, "routed (T=1)", "routed top-1", COARSE}
    baselines = {"dense (full-0)", "Full-2", "random-split", "dense-matched", "seed"}
    methods = {*(f"expert-{e}" for e in range(EXPERTS)), "oracle", "uniform", "routed (validated)",
               *routed, *baselines}
    assert set(METHODS) == routed | {"uniform"}
    for task, n_classes in (("shapes", 8), ("digits", 10)):
        r = report["zero_shot"][task]
        assert set(r["accuracy"]) == methods and r["classes"] == n_classes
        assert r["images"] == 2 * n_classes          # tiny world: 2 images per class
        assert all(0 <= a <= 1 for a in r["accuracy"].values())
        assert r["accuracy"]["oracle"] == max(r["accuracy"][f"expert-{e}"] for e in range(EXPERTS))
        assert set(r["weights"]) == routed | {"routed (validated)"}
        for w in r["weights"].values():
            assert len(w) == EXPERTS and abs(sum(w) - 1) < 1e-9
        assert max(r["weights"]["routed (T=1)"]) >= max(r["weights"]["routed (T=8)"])  # sharper
        assert sorted(r["weights"]["routed top-1"]) == [0.0] * (EXPERTS - 1) + [1.0]
    # the cost table: what each run reserved, and the totals of MoDE and of each baseline
    cost = report["cost"]
    experts = [f"expert-{e}" for e in range(EXPERTS)]
    assert {"seed", *BASELINES, *experts, "MoDE (seed + experts)", "dense (seed + full-0)",
            "Full-n (seed + full runs)", "dense-matched (seed + dense-matched)"} <= set(cost)
    mode = cost["MoDE (seed + experts)"]
    assert mode["cpu_hours"] == pytest.approx(sum(cost[n]["cpu_hours"] for n in ["seed", *experts]))
    assert mode["samples"] == cost["dense-matched (seed + dense-matched)"]["samples"] == 384 + EXPERTS * 384
    assert all(c["cpu_hours"] > 0 and c["gpu_hours"] == 0 for c in cost.values())
    assert "## Training cost" in (out / "report.md").read_text()
    # every row's training cost in samples, the seed's included, and over the paper's dense
    # baseline (seed 384 + one expert's 384): MoDE-4 at 2.5x, as (f + 4 (1 - f)) with f = 1/2
    per_method = report["method_cost"]
    assert set(per_method) == methods
    expected = {"routed (T=8)": 5 * 384, "oracle": 5 * 384, "dense (full-0)": 2 * 384,
                "Full-2": 3 * 384, "random-split": 3 * 384, "dense-matched": 5 * 384,
                "seed": 384, "expert-2": 2 * 384}
    for method, samples in expected.items():
        assert per_method[method] == {"samples": samples, "vs_dense": samples / 768}, method
    retrieval = report["retrieval"]
    assert methods <= set(retrieval)
    assert all(0 <= v <= 1 for m in retrieval.values() for k, v in m.items() if k != "expert")
    assert retrieval["uniform"]["i2t_r5"] >= retrieval["uniform"]["i2t_r1"]
    confusion = pd.DataFrame(report["confusion"])
    assert confusion.to_numpy().sum() == len(pd.read_parquet(tmp_path / "run" / "assignments"))
    md = (out / "report.md").read_text()
    assert "| routed (T=8) |" in md and "| dense (full-0) |" in md and "Retrieval" in md
    assert "| x dense |" in md.splitlines()[4] and "| 1920 | 2.50 |" in md
    for png in ("accuracy.png", "routing.png", "sizes.png", "curves.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert "| random-split |" in capsys.readouterr().out
    # eval is a stage like the others: a manifest, counts that add up, skipped on rerun
    m = json.loads((out / "_manifest.json").read_text())
    # test and validation images of both tasks, and the retrieval pairs
    assert m["rows_in"] == m["rows_out"] == 2 * (2 * 8 + 2 * 10) + report["retrieval_pairs"]
    chosen = report["routing_selection"]["chosen"]
    assert set(report["routing_selection"]["tasks"]) == {"shapes", "digits"}
    assert f"chosen: **{chosen}**" in (out / "report.md").read_text()
    assert set(m["inputs"]["upstream"]) == {"clusters", "assignments"} | {
        f"checkpoints/{n}" for n in registry_of(tmp_path / "run")}
    assert evaluate_job.main(["--run-dir", run.uri, "--tasks", tasks[0], "--tasks", tasks[1],
                              "--retrieval", str(tiny_world / "eval" / "retrieval"),
                              "--demo-data", str(tiny_world)]) == 0
    assert "eval] complete for this config: skipped" in capsys.readouterr().out


def test_the_routing_is_chosen_without_reading_a_test_label(trained, tiny_world, tmp_path):
    """The same choice whatever the test labels say; a change of validation labels moves the
    validation scores it is chosen from."""
    import numpy as np

    from pipeline.evaluation import eval as evaluation
    from pipeline.evaluation.ensemble import MoDEEnsemble

    cfg = load_config("demo")
    ens = MoDEEnsemble(str(trained), cfg)
    tasks = [str(tiny_world / "eval" / t) for t in ("shapes", "digits")]
    real = evaluation.select_on_validation(ens, tasks, cfg.storage, log=lambda *_: None)
    # the same tasks with every test label replaced (and the test images reversed)
    scrambled = []
    for uri in tasks:
        copy = tmp_path / "scrambled" / Path(uri).name
        shutil.copytree(uri, copy)
        task = evaluation.read_task(uri, cfg.storage)
        _write_split(copy / "test", task.images[::-1], np.zeros_like(task.labels))
        scrambled.append(str(copy))
    again = evaluation.select_on_validation(ens, scrambled, cfg.storage, log=lambda *_: None)
    assert again == real and set(real["mean"]) == set(evaluation.ROUTING_GRID)
    # ... while the validation labels are what it reads: labelled with T=8's own predictions,
    # T=8 scores 100% on validation
    for uri in scrambled:
        val = evaluation.read_task(uri, cfg.storage, "val")
        experts = evaluation._expert_logits(ens, val)
        _, mixed = evaluation._mixed(ens, val, experts, evaluation.ROUTING_GRID["T=8"])
        _write_split(Path(uri) / "val", val.images, mixed.argmax(axis=1))
    moved = evaluation.select_on_validation(ens, scrambled, cfg.storage, log=lambda *_: None)
    assert all(real["tasks"][t]["T=8"] < 1 for t in real["tasks"])
    assert all(moved["tasks"][t]["T=8"] == 1 for t in moved["tasks"]) and moved["chosen"] == "T=8"
    # the chosen point is the best mean, the authors' T=8 on a tie
    assert evaluation.choose_routing({"a": dict.fromkeys(evaluation.ROUTING_GRID, 0.5)})["chosen"] == "T=8"
    best = {**dict.fromkeys(evaluation.ROUTING_GRID, 0.5), "top-2": 0.6}
    assert evaluation.choose_routing({"a": best, "b": dict.fromkeys(best, 0.4)})["chosen"] == "top-2"


def _write_split(folder: Path, images, labels) -> None:
    """A clip_benchmark split of ``images`` with ``labels`` (one shard), replacing the folder's."""
    import io

    from pipeline.data.demo_world import tar_bytes

    def members():
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            buf = io.BytesIO()
            image.save(buf, format="PNG")       # lossless: the same pixels are scored
            yield f"{i:06d}.png", buf.getvalue()
            yield f"{i:06d}.cls", str(int(label)).encode()

    shutil.rmtree(folder)
    folder.mkdir()
    (folder / "0.tar").write_bytes(tar_bytes(members()))


def test_predict_prints_labels_and_weights(trained, tmp_path, capsys):
    import numpy as np

    from jobs import predict as predict_job
    from pipeline.data.demo_world import render

    jpg, _, _ = render(np.random.default_rng(0), "shapes", "star", 32)
    (tmp_path / "star.jpg").write_bytes(jpg)
    assert predict_job.main(["--run-dir", str(trained), "--image", str(tmp_path / "star.jpg"),
                             "--labels", "circle,star,square", "--top-k", "1"]) == 0
    config, *lines = capsys.readouterr().out.strip().splitlines()
    assert config == f"[config] the run directory's {trained}/config.yaml"
    probs = [float(line.split("%")[0]) for line in lines[:3]]
    assert abs(sum(probs) - 100) < 0.5 and probs == sorted(probs, reverse=True)
    assert {line.split()[-1] for line in lines[:3]} == {"circle", "star", "square"}
    weights = [float(x.split()[-1]) for x in lines[-1].removeprefix("expert weights: ").split(",")]
    assert sorted(weights) == [0.0] * (EXPERTS - 1) + [1.0]   # top-1: one expert ran
    with pytest.raises(SystemExit):
        predict_job.main(["--run-dir", str(trained), "--image", str(tmp_path / "none.jpg"),
                          "--labels", "a,b"])


def test_a_long_history_is_thinned_to_a_curve_that_keeps_its_ends():
    lines = [{"step": i} for i in range(2_000)]
    out = checkpoints.thin(lines, checkpoints.HISTORY_POINTS)
    assert len(out) == checkpoints.HISTORY_POINTS and out[0] == lines[0] and out[-1] == lines[-1]
    assert [line["step"] for line in out] == sorted({line["step"] for line in out})
    assert checkpoints.thin(lines[:10], 500) == lines[:10]


def test_onestep_fits_m_centres_on_the_embeddings_and_its_experts_get_a_routed_row(trained, tiny_world,
                                                                                  tmp_path):
    """The OneStep ablation: the ``onestep`` stage fits ``cluster.num_experts`` balanced centres
    on the embeddings directly and assigns every row to one; an ensemble whose registry holds
    ``onestep-<e>`` runs reports a ``OneStep-m`` row, routed by those centres, with its cost
    (the seed and its m runs). Its runs here borrow the experts' checkpoints: the row's plumbing
    is under test, not OneStep's accuracy."""
    import numpy as np

    from pipeline.clustering import kmeans, onestep
    from pipeline.core import registry
    from pipeline.evaluation import eval as evaluation
    from pipeline.evaluation.ensemble import MoDEEnsemble

    run = copy_run(trained, tmp_path / "run")
    cfg = load_config("demo", TINY[1::2])
    stages.run_stage("onestep", cfg, run, log=lambda *_: None)
    m = run.manifest("onestep")
    embedded = run.manifest("embeddings")["rows_out"]
    assert m["rows_in"] == m["rows_out"] == embedded
    sizes = [m["stats"]["rows_per_expert"][str(e)] for e in range(EXPERTS)]
    cap = kmeans.capacities(embedded, EXPERTS, slack=cfg.cluster.capacity_slack).max()
    assert sum(sizes) == embedded and max(sizes) <= cap           # balanced: no centre over its cap
    centres = onestep.centroids(run)
    assert centres.shape == (EXPERTS, 384)
    keys = [onestep.keys(run, e) for e in range(EXPERTS)]
    assert sorted(k for part in keys for k in part) == sorted(pd.read_parquet(tmp_path / "run" / "embeddings").key)
    # a OneStep expert trains on its cluster and the experts' small out-of-cluster share
    read = training_data.rows_for(run, Job("onestep", 1, 1, 1), EXPERTS, cfg.train.ooc_ratio,
                                  cfg.train.data_seed, columns=["key"], cluster_keys=keys[1])
    got = set(read.to_pandas().key)
    assert set(keys[1]) <= got and len(got) <= len(keys[1]) + 0.1 * (embedded - len(keys[1]))
    # a rerun with the same config is skipped: the same manifest, written once
    assert stages.run_stage("onestep", cfg, run, log=lambda *_: None) == m
    entries = registry.finished(run)
    for e in range(EXPERTS):
        registry.put(run, {**entries[f"expert-{e}"], "name": f"onestep-{e}", "kind": "onestep"})
    ens = MoDEEnsemble(run.uri)
    assert ens.onestep_runs == [f"onestep-{e}" for e in range(EXPERTS)]
    task = evaluation.read_task(str(tiny_world / "eval" / "shapes"), cfg.storage)
    result = evaluation.zero_shot_task(ens, task)
    assert 0 <= result["accuracy"][f"OneStep-{EXPERTS}"] <= 1
    w = ens.weights(task.classnames, task.templates, centres="onestep", temperature=8.0)
    assert w.shape == (EXPERTS,) and np.isclose(w.sum(), 1.0)
    rows = {**evaluation.baseline_rows(ens), **evaluation.onestep_rows(ens)}
    cost = evaluation.method_samples(ens.registry, list(result["accuracy"]), rows)
    assert cost[f"OneStep-{EXPERTS}"]["samples"] == 384 + EXPERTS * 384
