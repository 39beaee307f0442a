"""The seed, the data experts and the baselines: what each run trains on, and the launcher.

Schedule (all in samples seen, ``train.total_samples`` = T, ``train.seed_fraction`` = f):

- ``seed``: all data, from 0 to f*T (rounded to whole batches);
- ``expert-<e>``: starts from the seed's final checkpoint (model, optimizer, step) and continues
  the same cosine schedule to T on expert e's samples plus a seeded ``ooc_ratio`` share of the
  others (MoDE's data experts);
- ``random-<e>``: the same, on part e of a seeded random split with the experts' sizes (separates
  the value of clustering from the value of ensembling);
- ``dense``: the seed continued on all data for as many samples as the m experts saw together,
  its cosine stretched to end there (the "same training cost" baseline).

Every finished run is appended to ``experts.json`` in the run directory (an atomic rewrite by the
launcher, the only writer): a run listed there is never trained again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import ray

from pipeline import shards
from pipeline.config import Config, TrainConfig
from pipeline.rundir import RunDir, now
from pipeline.storage import read_json, write_json_atomic

KINDS = ("seed", "expert", "random_split", "dense")


@dataclasses.dataclass(frozen=True)
class Job:
    """One training run of the plan."""
    name: str               # run name: checkpoints/<name>/, and the registry key
    kind: str               # one of KINDS
    index: int | None       # expert or random part index
    end_samples: int        # absolute samples_seen at which the run stops
    schedule_total: int     # samples over which its cosine schedule runs


def seed_end(cfg: TrainConfig) -> int:
    """Samples the seed trains: f*T rounded to whole global batches."""
    return max(1, round(cfg.seed_fraction * cfg.total_samples / cfg.batch_size)) * cfg.batch_size


def plan(cfg: Config, experts: Sequence[int] | None = None, baselines: bool = True) -> list[Job]:
    """The runs after the seed: the chosen experts, then (optionally) the baselines."""
    t, m = cfg.train, cfg.cluster.num_experts
    chosen = range(m) if experts is None else experts
    for e in chosen:
        if not 0 <= e < m:
            raise ValueError(f"expert {e} does not exist: cluster.num_experts={m} (0..{m - 1})")
    jobs = [Job(f"expert-{e}", "expert", e, t.total_samples, t.total_samples) for e in chosen]
    if baselines:
        jobs += [Job(f"random-{e}", "random_split", e, t.total_samples, t.total_samples)
                 for e in range(m)]
        dense_total = seed_end(t) + m * (t.total_samples - seed_end(t))
        jobs.append(Job("dense", "dense", None, dense_total, dense_total))
    return jobs


def seed_job(cfg: Config) -> Job:
    return Job("seed", "seed", None, seed_end(cfg.train), cfg.train.total_samples)


def dataset(run: RunDir, cfg: Config, job: Job, columns: list[str] | None = None):
    """The rows a run trains on (a lazy Ray Dataset over ``training_data/``)."""
    if job.kind in ("seed", "dense"):
        return shards.all_rows(run, columns)
    if job.kind == "expert":
        return shards.expert_rows(run, job.index, cfg.cluster.num_experts, cfg.train.ooc_ratio,
                                  cfg.train.seed, columns)
    return shards.random_rows(run, job.index, columns)


# ----------------------------------------------------------------------------- registry
def registry(run: RunDir) -> list[dict[str, Any]]:
    """Finished runs, oldest first (``experts.json``; empty when absent)."""
    return read_json(run.fs, run.experts_path) if run.fs.exists(run.experts_path) else []


def finished(run: RunDir) -> dict[str, dict[str, Any]]:
    return {entry["name"]: entry for entry in registry(run)}


def append(run: RunDir, entry: dict[str, Any]) -> None:
    """Append one finished run with an atomic rewrite (readers never see a partial file)."""
    entries = [e for e in registry(run) if e["name"] != entry["name"]]
    write_json_atomic(run.fs, run.experts_path, [*entries, entry])


def sha256_of(run: RunDir, checkpoint_uri: str) -> str:
    from pipeline.train import CHECKPOINT_FILE

    path = checkpoint_uri[len("s3://"):] if checkpoint_uri.startswith("s3://") else checkpoint_uri
    h = hashlib.sha256()
    with run.fs.open(f"{path.rstrip('/')}/{CHECKPOINT_FILE}", "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- one run
def run_job(cfg: Config, run_uri: str, job: Job, init_checkpoint: str | None) -> dict[str, Any]:
    """Train one job to its end (resuming its own checkpoints) and return its registry entry."""
    from pipeline import train

    run = RunDir(run_uri, cfg.storage)
    started, wall0 = now(), time.time()
    # From the training_data manifest; else counted on the two small columns the filters need.
    samples = shards.run_rows(run, cfg, job.kind, job.index)
    if samples is None:
        samples = dataset(run, cfg, job, columns=["key", "random_id"]).count()
    ds = dataset(run, cfg, job)
    tcfg = dataclasses.replace(cfg.train, total_samples=job.schedule_total)
    result = train.train(job.name, ds, tcfg, run, job.end_samples,
                         init_checkpoint=init_checkpoint, storage=cfg.storage)
    fine = None
    if job.kind == "expert":
        from pipeline import cluster

        f2e = cluster.load(run)["fine_to_expert"]
        fine = np.flatnonzero(f2e == job.index).tolist()
    losses = [h["loss"] for h in result.history]
    return {
        "name": job.name, "kind": job.kind, "expert_id": job.index if job.kind == "expert" else None,
        "part": job.index if job.kind == "random_split" else None,
        "fine_clusters": fine, "samples": int(samples), "model": cfg.train.model,
        "checkpoint": result.checkpoint, "sha256": sha256_of(run, result.checkpoint),
        "init_checkpoint": init_checkpoint,
        "metrics": {"step": result.step, "samples_seen": result.samples_seen,
                    "steps_run": result.steps_run, "start_step": result.start_step,
                    "final_loss": losses[-1] if losses else None,
                    "first_loss": losses[0] if losses else None},
        "started_at": started, "finished_at": now(),
        "wall": {"start": wall0, "end": time.time(), "seconds": round(time.time() - wall0, 2)},
    }


@ray.remote(num_cpus=0)
def _run_job_remote(cfg: Config, run_uri: str, job: Job, init: str | None) -> dict[str, Any]:
    # Zero CPUs: the launcher task only waits on its Train run, whose workers hold the CPUs.
    return run_job(cfg, run_uri, job, init)


def seed_config(cfg: Config, node_cpus: float | None = None) -> Config:
    """The seed trains alone: it gets the torch threads of ``max_concurrent`` runs, capped at the
    CPUs of the cluster's largest node (``node_cpus``; read from Ray when None). Not their CPU
    reservation: Ray Data's read and decode tasks need the CPUs a worker leaves free (on 2 CPUs
    a 1-CPU worker starved its own input pipeline). On 2 cores, 3 threads trained mode-tiny at
    800 samples/s and 2 at 1,000 (README, "Demo timings"): no more threads than cores."""
    t = cfg.train
    if node_cpus is None:
        node_cpus = max((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n["Alive"]),
                        default=0.0)
    threads = t.threads_per_worker * t.max_concurrent
    if node_cpus >= 1:
        threads = min(threads, int(node_cpus))
    return dataclasses.replace(cfg, train=dataclasses.replace(t, threads_per_worker=threads))


def train_seed(cfg: Config, run: RunDir, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train (or resume, or skip when finished) the seed; returns its registry entry."""
    done = finished(run).get("seed")
    if done is not None:
        log(f"[seed] done already ({done['checkpoint']}): skipped")
        return done
    log("[seed] running")
    entry = run_job(seed_config(cfg), run.uri, seed_job(cfg), None)
    append(run, entry)
    log(f"[seed] done: {entry['metrics']['samples_seen']:,} samples, loss "
        f"{entry['metrics']['first_loss']:.3f} -> {entry['metrics']['final_loss']:.3f}, "
        f"{entry['wall']['seconds']:.0f}s")
    return entry


def launch(cfg: Config, run: RunDir, jobs: Sequence[Job], max_concurrent: int,
           log: Callable[[str], None] = print) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Run ``jobs`` from the seed's checkpoint, at most ``max_concurrent`` at once.

    Finished runs (in ``experts.json``) are skipped; the others queue and start as slots free
    up (a Ray Train run short of CPUs also waits for them). A failed run is reported and does
    not stop the others. Returns (entries of the runs finished now, {name: error} of failures).
    """
    seed = finished(run).get("seed")
    if seed is None:
        raise RuntimeError(f"{run.uri} has no finished seed in experts.json: "
                           "run jobs/train_seed.py first")
    already = finished(run)
    queue = []
    # Longest first (dense costs m expert runs): the last slot to free up should not be left
    # running one long job alone.
    jobs = sorted(jobs, key=lambda j: j.end_samples - seed_end(cfg.train), reverse=True)
    for job in jobs:
        if job.name in already:
            log(f"[{job.name}] done already: skipped")
        else:
            queue.append(job)
            log(f"[{job.name}] queued")
    t = cfg.train
    need = max_concurrent * t.num_workers * t.cpus_per_worker
    total = ray.cluster_resources().get("CPU", 0.0)
    if queue and total - need < 1:
        log(f"[launch] warning: {max_concurrent} runs x {t.num_workers} worker(s) x "
            f"{t.cpus_per_worker:g} CPU reserve {need:g} of the cluster's {total:g} CPUs, leaving "
            "less than 1 for Ray Data's read and decode tasks: runs can stall waiting for data. "
            "Lower train.max_concurrent or train.cpus_per_worker (or add CPUs).")
    running: dict[ray.ObjectRef, Job] = {}
    done, failed = [], {}
    while queue or running:
        while queue and len(running) < max_concurrent:
            job = queue.pop(0)
            running[_run_job_remote.remote(cfg, run.uri, job, seed["checkpoint"])] = job
            log(f"[{job.name}] running")
        ready, _ = ray.wait(list(running), num_returns=1)
        job = running.pop(ready[0])
        try:
            entry = ray.get(ready[0])
        except Exception as e:  # noqa: BLE001 - one failed run must not stop the others
            failed[job.name] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}"
            log(f"[{job.name}] failed: {failed[job.name]}")
            continue
        append(run, entry)
        done.append(entry)
        m = entry["metrics"]
        log(f"[{job.name}] done: {entry['samples']:,} samples, steps {m['start_step']}->{m['step']}, "
            f"loss {m['final_loss']:.3f}, {entry['wall']['seconds']:.0f}s")
    return done, failed
