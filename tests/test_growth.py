"""Growing a trained run (jobs/add_experts.py, docs/growth.md): a new expert for novel data,
nothing earlier rewritten, novelty that tells known domains from new ones, a registry that
several jobs write at once, and bad input refused before anything is written."""

import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from jobs import add_experts as add_job
from jobs import train_experts as experts_job
from pipeline.clustering import clusters
from pipeline.core import registry
from pipeline.core.config import DemoConfig, StorageConfig, load_config
from pipeline.core.rundir import RunDir
from pipeline.data.demo_world import DOMAIN_SHARES, generate_web
from pipeline.evaluation import eval as evaluation
from pipeline.grow import generations, growth, levels
from pipeline.training.runs import run_name
from tests import races
from tests.conftest import GROW, digests
from tests.tiny import EXPERTS, TINY, copy_run, registry_of

NEW = f"expert-{EXPERTS}"   # the first added expert's name
QUIET = {"log": lambda *_: None}


def web(tmp_path_factory, name: str, domains: dict[str, float], seed: int, samples: int) -> Path:
    out = tmp_path_factory.mktemp(name)
    generate_web(str(out), DemoConfig(samples=samples, samples_per_shard=200, image_size=32),
                 StorageConfig(), domains, seed, log=lambda *_: None)
    return out


def add_killed_then_rerun(run_dir: Path, data: Path) -> None:
    """jobs/add_experts.py in a process of its own (its own local Ray too), SIGKILLed once the
    new expert has a checkpoint, then the same job again here."""
    gen = run_dir / "generations" / "arrows"
    job = subprocess.Popen([sys.executable, "jobs/add_experts.py", "--run-dir", str(run_dir), "--data",
                            str(data), "--name", "arrows", *GROW],
                           cwd=Path(__file__).resolve().parents[1], start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 480
        # Ray Train's checkpoint manager writes its snapshot once it has registered a checkpoint:
        # a checkpoint file alone may not be registered yet, and a rerun would start from the seed
        while not (gen / "checkpoints" / NEW / "checkpoint_manager_snapshot.json").exists() \
                and job.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint of the new expert in 8 minutes"
            time.sleep(0.5)
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait(60)
    assert not (gen / "checkpoints" / NEW / "_manifest.json").exists(), "killed too late"
    assert add_job.main(["--run-dir", str(run_dir), "--data", str(data), "--name", "arrows", *GROW]) == 0


def test_adding_an_expert_rewrites_nothing_that_was_there(grown):
    run_dir, before, _ = grown
    after = digests(run_dir)
    changed = sorted(p for p, h in before.items() if after.get(p) != h)
    # config.yaml and eval/ may be rewritten; every checkpoint, clustering, assignment and
    # registry file of before is byte for byte the same
    assert all(p == "config.yaml" or p.startswith("eval/") for p in changed), changed
    kept = [p for p in before if p.startswith(("checkpoints/", "clusters/", "assignments/", "registry/"))]
    assert any(p.endswith("checkpoint.pt") for p in kept) and len(kept) > 20
    added = sorted(set(after) - set(before))
    assert added and all(p.startswith(("generations/arrows/", "registry/", "eval/")) for p in added
                         if p != "generations/_levels/000001.json")
    # the generation's ids, claimed once (pipeline/grow/levels.py)
    claim = levels.claims(RunDir(str(run_dir), StorageConfig()))
    assert [(c["generation"], c["experts"]) for c in claim] == [("arrows", 1)]


def test_the_new_expert_owns_the_new_fine_centres_and_takes_the_arrows_task(grown):
    run_dir, _, report_before = grown
    run = RunDir(str(run_dir), StorageConfig())
    reg = registry_of(run_dir)
    new = reg[NEW]
    assert new["generation"] == "arrows" and new["unit"] == f"generations/arrows/checkpoints/{NEW}"
    union = clusters.load(run)
    assert len(union["coarse_centroids"]) == EXPERTS + 1 and union["fine_centroids"].shape[0] > 8
    assert new["fine_clusters"] == list(range(8, len(union["fine_centroids"])))
    assert (union["fine_to_expert"][8:] == EXPERTS).all() and (union["fine_to_expert"][:8] < EXPERTS).all()
    assert new["metrics"]["samples_seen"] == reg["expert-0"]["metrics"]["samples_seen"]
    assert new["init_checkpoint"] == reg["seed"]["checkpoint"]
    report = evaluation.load_report(run)
    assert report["num_experts"] == EXPERTS + 1 and report["generations"] == ["arrows"]
    label = evaluation.DEFAULT_METHOD
    for task, result in report["zero_shot"].items():
        w = np.array(result["weights"][label])
        if task == "arrows":
            assert w.argmax() == EXPERTS, w
        else:   # an old task keeps its expert, before and after
            assert w.argmax() == np.argmax(report_before["zero_shot"][task]["weights"][label]), task
            # recomputed by a later process, whose encoder may batch the prompts otherwise:
            # the same weights to float rounding (a weight is in [0, 1])
            assert result["growth"][label]["weights_before"] == pytest.approx(
                report_before["zero_shot"][task]["weights"][label], rel=0, abs=1e-4)
    table = (run_dir / "eval" / "report.md").read_text()
    assert "## Growth: before and after generation `arrows`" in table
    assert evaluation.growth_table(report).loc["arrows"].notna().all()


def test_the_ensemble_leaves_out_a_generation_still_training(grown):
    """An expert not registered yet (its generation still training) is left out of the
    ensemble with its generation, rather than failing it; so are later generations."""
    from pipeline.evaluation.ensemble import MoDEEnsemble

    run_dir, _, _ = grown
    entry = run_dir / "registry" / f"{NEW}.json"
    kept = entry.read_bytes()
    entry.unlink()
    try:
        ens = MoDEEnsemble(str(run_dir))
        assert ens.generations == [] and ens.num_experts == EXPERTS and len(ens.fine_centroids) == 8
    finally:
        entry.write_bytes(kept)
    ens = MoDEEnsemble(str(run_dir))
    assert ens.generations == ["arrows"] and ens.num_experts == EXPERTS + 1


def test_novelty_is_counted_and_the_manifests_add_up(grown):
    run_dir, _, _ = grown
    run = RunDir(str(run_dir), StorageConfig())
    novelty = run.manifest("generations/arrows/novelty")
    data = run.manifest("generations/arrows/training_data")
    ingest = run.manifest("generations/arrows/ingest")
    for m in (novelty, data, ingest):
        assert m["rows_in"] == m["rows_out"] + sum(m["rows_skipped"].values())
    assert novelty["stats"]["novel"] + novelty["stats"]["familiar"] == novelty["rows_out"]
    assert data["rows_out"] == novelty["stats"]["novel"] and novelty["stats"]["novel"] >= 50
    keys = pd.read_parquet(run_dir / "generations" / "arrows" / "training_data").key
    assert keys.str.startswith("arrows/").all() and keys.is_unique


def test_rerunning_add_experts_changes_nothing(grown, tiny_world, capsys):
    run_dir, _, _ = grown
    before = digests(run_dir)
    assert add_job.main(["--run-dir", str(run_dir), "--data", str(tiny_world / "new_domain"),
                         "--name", "arrows", *GROW]) == 0
    assert digests(run_dir) == before
    out = capsys.readouterr().out
    assert "[generations/arrows/ingest] complete for this config: skipped" in out
    assert f"[{NEW}] complete for this config: skipped" in out


def test_more_data_from_the_known_domains_makes_no_expert(trained, tmp_path_factory, tmp_path, capsys):
    known = web(tmp_path_factory, "known", DOMAIN_SHARES, seed=11, samples=400)
    run = copy_run(trained, tmp_path / "run")
    assert add_job.main(["--run-dir", run.uri, "--data", str(known), "--name", "more", *GROW]) == 0
    out = capsys.readouterr().out
    assert "fewer than grow.min_novel_rows=50: no new expert" in out
    assert sorted(registry_of(tmp_path / "run")) == sorted(registry_of(trained))
    assert clusters.grown(run) == [] and not (tmp_path / "run" / "generations" / "more" / "checkpoints").exists()


def test_a_mixed_set_flags_the_new_domain_and_its_expert_holds_it(trained, tmp_path_factory, tmp_path):
    mixed = web(tmp_path_factory, "mixed", {**{d: s / 2 for d, s in DOMAIN_SHARES.items()}, "arrows": 0.5},
                seed=12, samples=320)
    run = copy_run(trained, tmp_path / "run")
    cfg = load_config("demo", [*TINY[1::2], "grow.min_novel_rows=50"])
    # every stage up to the new expert's training data (its training is the same as any expert's)
    out, jobs = generations.prepare(cfg, run, str(mixed), "mixed", **QUIET)
    assert out["experts"] == [NEW] and [j.unit for j in jobs] == [f"generations/mixed/checkpoints/{NEW}"]
    truth = pd.read_parquet(mixed / "truth.parquet")
    truth["key"] = "mixed/" + truth["key"]
    flags = growth.read_novelty(run.generation("mixed")).merge(truth, on="key")
    arrows = flags.caption_domain == "arrows"
    precision = (flags.novel & arrows).sum() / flags.novel.sum()
    recall = (flags.novel & arrows).sum() / arrows.sum()
    assert precision >= 0.9 and recall >= 0.9, (precision, recall)
    trained_on = pd.read_parquet(tmp_path / "run" / "generations" / "mixed" / "training_data",
                                 columns=["key"]).merge(truth, on="key")
    assert (trained_on.caption_domain == "arrows").mean() >= 0.9


# ----------------------------------------------------------------------------- bad input
def test_bad_input_is_refused_before_anything_is_written(trained, seeded, tiny_world, tmp_path):
    run = copy_run(trained, tmp_path / "run")
    before = digests(tmp_path / "run")
    new = str(tiny_world / "new_domain")
    cases = [
        (["--set", "embed.model=open_clip:mode-tiny"], "must be embedded with the run's encoder"),
        (["--name", "bad name"], "generation name 'bad name'"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit, match=message):
            add_job.main(["--run-dir", run.uri, "--data", new, *extra])
        assert digests(tmp_path / "run") == before
    # a name already holding other data
    (tmp_path / "run" / "generations" / "taken").mkdir(parents=True)
    (tmp_path / "run" / "generations" / "taken" / "generation.json").write_text(
        '{"name": "taken", "data": "/elsewhere"}')
    before = digests(tmp_path / "run")
    with pytest.raises(SystemExit, match="already holds /elsewhere.*choose another --name"):
        add_job.main(["--run-dir", run.uri, "--data", new, "--name", "taken"])
    assert digests(tmp_path / "run") == before
    # a run whose seed has not finished
    unseeded = copy_run(seeded, tmp_path / "unseeded")
    (tmp_path / "unseeded" / "checkpoints" / "seed" / "_manifest.json").unlink()
    before = digests(tmp_path / "unseeded")
    with pytest.raises(SystemExit, match="no finished seed to grow from"):
        add_job.main(["--run-dir", unseeded.uri, "--data", new])
    assert digests(tmp_path / "unseeded") == before


def test_novelty_refuses_embeddings_of_another_dimension(grown):
    run_dir, _, _ = grown
    run = RunDir(str(run_dir), StorageConfig())
    cfg = load_config("demo", TINY[1::2]).view(("grow.novelty_quantile", "grow.min_rows_per_centre"),
                                                    ("cluster.block_rows",))
    upstream = {"embeddings": {"stats": {"dim": 7}, "rows_out": 1}}
    with pytest.raises(ValueError, match="embeddings are 7-d but the run's fine centres are 384-d"):
        growth.novelty(cfg, run.generation("arrows"), upstream, **QUIET)


# ----------------------------------------------------------------------------- concurrency
def _race(target, where: str, name: str, tmp_path, request, n: int) -> RunDir:
    """Two spawned processes running ``target(uri, endpoint, writer, n)`` at once on one run
    directory, local or on the moto S3 server; the run directory after both finished."""
    if where == "s3":
        endpoint = request.getfixturevalue("s3_endpoint")
        uri = f"s3://mode/{name}-{tmp_path.name}"
    else:
        endpoint, uri = None, str(tmp_path / "run")
    ctx = multiprocessing.get_context("spawn")
    writers = [ctx.Process(target=target, args=(uri, endpoint, w, n)) for w in (1, 2)]
    for p in writers:
        p.start()
    for p in writers:
        p.join(120)
        assert p.exitcode == 0
    return RunDir(uri, StorageConfig(s3_endpoint_url=endpoint))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_processes_registering_at_once_lose_nothing(where, tmp_path, request):
    run = _race(races.register, where, "registry-race", tmp_path, request, 15)
    assert set(registry.finished(run)) == {run_name("expert", 100 * w + i) for w in (1, 2) for i in range(15)}


@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_processes_numbering_generations_at_once_get_disjoint_ids(where, tmp_path, request):
    """Two add_experts jobs may number their new levels at the same moment (pipeline/grow/levels.py):
    each generation gets its own expert and fine ids, following each other with no gap."""
    run = _race(races.claim, where, "levels-race", tmp_path, request, 8)
    found = levels.claims(run)
    assert [c["number"] for c in found] == list(range(1, 17))
    assert sorted(c["generation"] for c in found) == sorted(f"w{w}-{i}" for w in (1, 2) for i in range(8))
    ids = levels.offsets(found, 4, 64)
    spans = sorted((ids[c["generation"]], c["experts"], c["fine_centres"]) for c in found)
    expert_ids = [e for (first, _), n, _ in spans for e in range(first, first + n)]
    fine_ids = [f for (_, first), _, k in spans for f in range(first, first + k)]
    assert expert_ids == list(range(4, 4 + sum(c["experts"] for c in found)))
    assert fine_ids == list(range(64, 64 + sum(c["fine_centres"] for c in found)))
    # a rerun finds its own claim; another size for a claimed generation is refused
    assert levels.claim(run, "w2-3", 1 + (2 + 3) % 3, 8, 4, 64) == ids["w2-3"]
    with pytest.raises(levels.LevelClash, match="'w2-3' claimed"):
        levels.claim(run, "w2-3", 9, 99, 4, 64)
    assert len(levels.claims(run)) == 16


@pytest.mark.slow
def test_add_experts_while_train_experts_runs(seeded, tiny_world, tmp_path):
    run = copy_run(seeded, tmp_path / "run")
    result = {}

    def train() -> None:
        result["train"] = experts_job.main(["--run-dir", run.uri, "--experts", "0",
                                            "--set", "train.cpus_per_worker=0.3"])

    thread = threading.Thread(target=train)
    thread.start()
    try:
        # The test run's local Ray has 2 CPUs. What stays held while both jobs run: expert-0's worker
        # (0.3) and the encoder actor (0.5 here); read tasks (1 CPU each, of either job) come and
        # go in what is left, 1.2 CPUs. With a 1-CPU encoder actor only 0.7 would be left and
        # the two jobs could wait on each other for ever (seen once in CI: embeddings' read task
        # and expert-0's next epoch both queued behind the actor).
        code = add_job.main(["--run-dir", run.uri, "--data", str(tiny_world / "new_domain"),
                             "--name", "arrows", *GROW, "--set", "train.cpus_per_worker=0.3",
                             "--set", "embed.num_cpus_per_actor=0.5"])
    finally:
        thread.join(900)
    assert code == 0 and result["train"] == 0
    reg = registry_of(tmp_path / "run")
    assert sorted(reg) == ["expert-0", NEW, "seed"]
    # they ran at once: the add_experts job began before expert-0 finished training
    began = datetime.fromisoformat(run.manifest("generations/arrows/ingest")["started_at"]).timestamp()
    assert began < reg["expert-0"]["wall"]["end"] and reg["expert-0"]["wall"]["start"] < reg[NEW]["wall"]["end"]


@pytest.mark.reliability
@pytest.mark.timeout(1200)   # run alone (make test-reliability), it sets up ``trained`` too
def test_a_killed_add_experts_reruns_to_the_end_without_duplicates(trained, tiny_world, tmp_path):
    """add_experts SIGKILLed once its new expert has a checkpoint, then run again: the rerun
    completes the generation, its expert resumes and ends at the planned step, nothing twice,
    and nothing of the run before the growth is rewritten."""
    run_dir = tmp_path / "run"
    copy_run(trained, run_dir)
    before = digests(run_dir)
    add_killed_then_rerun(run_dir, tiny_world / "new_domain")
    after = digests(run_dir)
    changed = sorted(p for p, h in before.items() if after.get(p) != h)
    assert all(p == "config.yaml" for p in changed), changed
    gen = run_dir / "generations" / "arrows"
    run = RunDir(str(run_dir), StorageConfig())
    entry = registry_of(run_dir)[NEW]
    assert entry["metrics"]["start_step"] > 12          # resumed past the seed's last step
    assert entry["metrics"]["samples_seen"] == 768 and entry["metrics"]["step"] == 24
    keys = pd.read_parquet(gen / "training_data", columns=["key"]).key
    novelty = run.manifest("generations/arrows/novelty")
    assert keys.is_unique and len(keys) == novelty["stats"]["novel"]
