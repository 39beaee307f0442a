"""jobs/experiment.py: several training seeds on one clustering (replicas of the run directory),
the statistics over seeds, and the adoption of the run's own seed."""

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.core import registry
from pipeline.core.rundir import RunDir
from pipeline.evaluation import experiment
from pipeline.evaluation.ensemble import run_config
from tests.tiny import BASELINES, EXPERTS, copy_run, registry_of


def _report(acc: dict[str, dict[str, float]]) -> dict:
    return {"zero_shot": {t: {"accuracy": a} for t, a in acc.items()},
            "routing_selection": {"chosen": "T=8"}}


def test_the_summary_gives_means_spreads_and_paired_intervals():
    from scipy import stats

    routed = {0: 0.60, 1: 0.64, 2: 0.62}
    dense = {0: 0.55, 1: 0.60, 2: 0.56}
    reports = {s: _report({"a": {"routed (T=8)": routed[s], "dense (full-0)": dense[s], "uniform": routed[s]},
                           "b": {"routed (T=8)": 0.5, "dense (full-0)": 0.5, "uniform": 0.5},
                           "held-out": {"routed (T=8)": 0.1, "dense (full-0)": 0.9, "uniform": 0.1}})
               for s in routed}
    s = experiment.summarise(reports, ["a", "b"])
    a = s["accuracy"]["a"]["routed (T=8)"]
    assert a["mean"] == pytest.approx(62.0) and a["sd"] == pytest.approx(2.0)
    assert a["seeds"] == {"0": pytest.approx(60.0), "1": pytest.approx(64.0), "2": pytest.approx(62.0)}
    # the headline mean is over the named tasks only (not the held-out one)
    assert s["accuracy"]["mean"]["routed (T=8)"]["seeds"]["0"] == pytest.approx(55.0)
    d = s["differences"]["routed (T=8) - dense (full-0)"]["a"]
    diffs = np.array([5.0, 4.0, 6.0])
    half = stats.t.ppf(0.975, 2) * diffs.std(ddof=1) / np.sqrt(3)
    assert d["mean"] == pytest.approx(5.0) and d["ci95"] == pytest.approx([5 - half, 5 + half])
    assert d["verdict"] == "above"
    assert s["differences"]["routed (T=8) - uniform"]["a"]["verdict"] == "within noise"
    assert s["differences"]["routed (T=8) - dense (full-0)"]["held-out"]["verdict"] == "below"
    # only the comparisons whose two methods the reports hold
    assert set(s["differences"]) == {"routed (T=8) - dense (full-0)", "routed (T=8) - uniform"}
    md = experiment.markdown(s)
    assert "| routed (T=8) | 56.0 ± 1.0 |" in md and "[+" in md and "within noise" in md
    assert experiment.plot(s)[:4] == b"\x89PNG"


def test_a_seeds_runs_wait_for_its_own_seed_model_only(tmp_path, monkeypatch):
    """The experiment's queue: every seed model first; a seed's other runs (longest first)
    start once that seed's own seed model has succeeded, whatever the other seeds do; the runs
    of a failed seed model are failed, not started."""
    from pipeline.core.config import load_config
    from pipeline.training import checkpoints
    from pipeline.training.runs import ALL_BASELINES, plan, seed_job

    cfg = load_config("demo")
    run = RunDir(str(tmp_path / "run"), cfg.storage)
    launches = []
    for seed in (0, 1):
        launches.append(checkpoints.Launch(cfg, run, seed_job(cfg.train), f"seed-{seed}/seed"))
        launches += [checkpoints.Launch(cfg, run, job, f"seed-{seed}/{job.name}", after=f"seed-{seed}/seed")
                     for job in plan(cfg.train, 2, baselines=["full-0", "random-split", "dense-matched"])]
    ordered = checkpoints.queue_order(launches)
    assert [r.label for r in ordered][:4] == ["seed-0/seed", "seed-1/seed", "seed-0/dense-matched",
                                              "seed-1/dense-matched"]
    # a run that waited gets its StageRun (its inputs checked) when it is taken
    monkeypatch.setattr(checkpoints, "StageRun", lambda unit, cfg, run: ("checked", unit))
    queue = [(r, None if r.after else "seed's") for r in ordered]
    succeeded, failed, lines = set(), {}, []

    def take():
        picked = checkpoints.next_startable(queue, succeeded, failed, lines.append)
        return None if picked is None else (picked[0].label, picked[1])

    assert take() == ("seed-0/seed", "seed's") and take() == ("seed-1/seed", "seed's")
    assert take() is None                            # the rest wait for their seed model
    succeeded.add("seed-1/seed")
    assert take() == ("seed-1/dense-matched", ("checked", "checkpoints/dense-matched"))
    assert take() == ("seed-1/expert-0", ("checked", "checkpoints/expert-0"))
    failed["seed-0/seed"] = "RuntimeError: lost"
    assert [take() for _ in range(5)] == [
        ("seed-1/expert-1", ("checked", "checkpoints/expert-1")),
        ("seed-1/full-0", ("checked", "checkpoints/full-0")),
        ("seed-1/random-split-0", ("checked", "checkpoints/random-split-0")),
        ("seed-1/random-split-1", ("checked", "checkpoints/random-split-1")), None]
    assert not queue
    assert {k: v for k, v in failed.items() if k != "seed-0/seed"} == {
        f"seed-0/{n}": "not started: seed-0/seed failed"
        for n in ("dense-matched", "expert-0", "expert-1", "full-0", "random-split-0", "random-split-1")}
    assert len(plan(cfg.train, 2, baselines=ALL_BASELINES)) == 2 + 2 + 2 + 1 + 2
    with pytest.raises(ValueError, match="not in this launch"):
        checkpoints.queue_order(launches[1:])


def test_replicas_read_the_runs_data_stages_and_train_their_seeds_in_one_queue(seeded, tmp_path):
    """Replicas of seeds 1 and 2 of the tiny run; seed 1's seed model and expert-0 from the
    experiment's queue, and the run's own expert-0: seed 1's seed model in experiment/seed-1/ on the run's
    training data (no copy), from its own initialisation; the expert starts from its own seed's
    model once that has finished; log lines say which seed they are."""
    from pipeline.training import checkpoints
    from pipeline.training.runs import plan, seed_job

    run = copy_run(seeded, tmp_path / "run")
    reps = experiment.replicas(run_config(run.uri), run, [1, 2])
    for seed, (cfg, replica) in reps.items():
        assert cfg.train.seed == seed
        assert RunDir(replica.uri, cfg.storage).shared.uri == run.uri     # found again from its URI
        assert replica.manifest("training_data") == run.manifest("training_data")
    lines: list[str] = []
    runs = [r for r in experiment.seed_queue(reps, EXPERTS)
            if r.label in ("seed-1/seed", "seed-1/expert-0")]    # seed 2 is not trained here
    assert len(runs) == 2
    # and a run whose seed model is complete already (skipped): it starts without waiting
    own_cfg = run_config(run.uri)
    own_seed, own_expert = seed_job(own_cfg.train), plan(own_cfg.train, EXPERTS)[0]
    runs += [checkpoints.Launch(own_cfg, run, own_seed, "seed-0/seed"),
             checkpoints.Launch(own_cfg, run, own_expert, "seed-0/expert-0", after="seed-0/seed")]
    _, failed = checkpoints.launch_many(runs, 2, log=lines.append)
    assert not failed
    assert "[seed-0/seed] complete for this config: skipped" in lines
    assert registry.finished(run)["expert-0"]["init_checkpoint"] == \
        registry.finished(run)["seed"]["checkpoint"]
    own = registry_of(tmp_path / "run")["seed"]
    entries = {1: registry.finished(reps[1][1])["seed"]}
    for seed, entry in entries.items():
        replica = reps[seed][1]
        assert entry["metrics"]["samples_seen"] == own["metrics"]["samples_seen"]
        assert entry["checkpoint"].startswith(replica.uri + "/checkpoints/seed/")
        assert sorted(p.name for p in Path(replica.uri).iterdir()) == [
            "_replica.json", "checkpoints", "config.yaml", "registry"]
        for what in ("running", "done:", "step 12 samples 384/384"):
            assert any(line.startswith(f"[seed-{seed}/seed] {what}") for line in lines), (what, lines)
    # another initialisation each
    assert own["sha256"] != entries[1]["sha256"]
    assert "seed" not in registry.finished(reps[2][1])
    # seed 1's seed model (awaited: first) and the run's own expert-0 (its seed model complete,
    # so it does not wait; longer than a seed model) ran at once, two slots here
    own_expert_entry = registry.finished(run)["expert-0"]
    assert entries[1]["wall"]["start"] < own_expert_entry["wall"]["end"]
    assert own_expert_entry["wall"]["start"] < entries[1]["wall"]["end"]
    expert = registry.finished(reps[1][1])["expert-0"]
    assert "[seed-1/expert-0] queued, after seed-1/seed" in lines
    assert expert["init_checkpoint"] == entries[1]["checkpoint"]
    assert expert["wall"]["start"] >= entries[1]["wall"]["end"]
    with pytest.raises(ValueError, match="unknown stage folder 'generations'"):
        reps[1][1].stage_path("generations")


def test_the_experiment_adopts_the_runs_own_seed_and_writes_its_tables(trained, tiny_world, tmp_path,
                                                                       capsys):
    """With one seed (the run's own) nothing trains: every run is adopted, evaluated in the
    replica, and the tables are written (a spread needs more seeds: `make experiment`)."""
    from jobs import experiment as experiment_job

    run = copy_run(trained, tmp_path / "run")
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "run" / "checkpoints").rglob("*")}
    tasks = [str(tiny_world / "eval" / t) for t in ("shapes", "digits")]
    args = ["--run-dir", run.uri, "--seeds", "1", "--tasks", tasks[0], "--tasks", tasks[1],
            "--demo-data", str(tiny_world), "--baselines", ",".join(BASELINES)]
    assert experiment_job.main(args) == 0
    out = capsys.readouterr().out
    assert "the run's own seed, expert-0" in out or "adopted" in out
    replica = RunDir(f"{run.uri}/experiment/seed-0", run.storage)
    assert set(registry.finished(replica)) == set(registry_of(tmp_path / "run"))
    assert len(registry.finished(replica)) == 1 + EXPERTS + len(BASELINES)
    assert not (tmp_path / "run" / "experiment" / "seed-0" / "checkpoints" / "seed" / "_attempt.json").exists()
    assert before == {p: p.stat().st_mtime_ns for p in (tmp_path / "run" / "checkpoints").rglob("*")}
    results = json.loads((tmp_path / "run" / "experiment" / "results.json").read_text())
    assert results["seeds"] == [0] and set(results["accuracy"]) == {"shapes", "digits", "mean"}
    report = json.loads((tmp_path / "run" / "experiment" / "seed-0" / "eval" / "report.json").read_text())
    assert results["accuracy"]["shapes"]["dense (full-0)"]["mean"] == pytest.approx(
        100 * report["zero_shot"]["shapes"]["accuracy"]["dense (full-0)"])
    # each method's training cost beside it, and the paper's comparisons
    assert results["cost"] == report["method_cost"]
    assert {"routed (T=8) - dense (full-0)", "routed (T=8) - Full-2", "routed (T=8) - random-split",
            "routed (T=8) - routed by coarse centres (T=8)", "routed (T=8) - dense-matched"} <= \
        set(results["differences"])
    assert "| x dense |" in (tmp_path / "run" / "experiment" / "results.md").read_text()
    # the diagnostics of docs/results.md: passes over the data, same-domain pairs
    diag = results["diagnostics"]
    entries = registry_of(tmp_path / "run")
    expert = entries["expert-0"]
    assert diag["epochs"]["expert-0"] == pytest.approx((768 - 384) / expert["samples"], abs=0.01)
    assert diag["epochs"]["seed"] == pytest.approx(384 / entries["seed"]["samples"], abs=0.01)
    assert all(0 < v <= 1 for v in diag["same_domain_pairs"].values())
    assert set(diag["own_domain"]) <= {f"expert-{e}" for e in range(EXPERTS)}
    for name in ("results.md", "seeds.png"):
        assert (tmp_path / "run" / "experiment" / name).exists()
    # a rerun skips everything
    assert experiment_job.main(args) == 0
    assert "eval] complete for this config: skipped" in capsys.readouterr().out


def test_same_content_negatives_per_run_on_a_composite_world(tmp_path):
    """On a composite world (a digit or shape over a texture or scene, the caption naming one
    of them), data that mixes caption domains holds negatives whose image shows the concept
    another caption names; data of one caption domain (an expert of a perfect clustering) holds
    almost none beyond two captions naming the same concept: only mismatched captions add some."""
    import io

    import pandas as pd

    from pipeline.core.config import DemoConfig, StorageConfig
    from pipeline.data.demo_world import TRAIN_DOMAINS, generate

    generate(str(tmp_path / "world"), DemoConfig(samples=600, samples_per_shard=300, new_domain_samples=20,
                                                 eval_per_class=1, composite=True), StorageConfig(),
             log=lambda *_: None)
    truth = pd.read_parquet(io.BytesIO((tmp_path / "world" / "truth.parquet").read_bytes()))
    train = truth[(truth["split"] == "train") & truth["caption_domain"].isin(TRAIN_DOMAINS)]
    assigned = pd.DataFrame({"key": train["key"],
                             "expert_id": train["caption_domain"].map(TRAIN_DOMAINS.index)})
    out = experiment.negatives(truth, assigned)
    everything = out["all data (seed, full-i, dense-matched)"]
    assert set(out) == {f"expert-{e}" for e in range(4)} | {"all data (seed, full-i, dense-matched)"}
    assert everything["beyond_collisions"] > 0.01
    for e in range(4):
        assert 0 < out[f"expert-{e}"]["rate"] and \
            out[f"expert-{e}"]["beyond_collisions"] < everything["beyond_collisions"] / 2, e
