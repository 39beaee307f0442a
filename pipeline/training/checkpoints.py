"""Stage ``checkpoints``: the seed, the data experts and the baselines, one Ray Train run each.

Each run (``pipeline.training.runs``: names, kinds, schedule) is a unit ``checkpoints/<run>`` under the
manifest contract of ``pipeline/core/stages.py``: its config view, its hash, its manifest written
last. Rerunning a job skips the runs whose manifest matches, resumes an interrupted run from its
latest checkpoint, and starts afresh a run whose checkpoints were made with another config (the
hash it started with is kept in ``checkpoints/<run>/_attempt.json``). A finished run is also
entered in the registry (``registry/<run>.json``, ``pipeline.core.registry``) before its manifest is
written. Experts added later by a generation (docs/growth.md) are the same kind of run, with
their unit and checkpoints below ``generations/<g>/``.

The launcher keeps at most ``train.max_concurrent`` runs going, longest first, each in a
zero-CPU Ray task that calls Ray Train's ``fit``; a failed run does not stop the others.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import ray

from pipeline.clustering import clusters, onestep
from pipeline.core import console, raycluster, registry
from pipeline.core.config import Config, ConfigView, TrainConfig
from pipeline.core.rundir import RunDir, StageOutput, now
from pipeline.core.stages import StageRun
from pipeline.core.storage import read_json, write_json_atomic
from pipeline.data import training_data
from pipeline.training import resources, train
from pipeline.training.checkpoint_io import sha256
from pipeline.training.runs import Job, seed_job
from pipeline.training.schedule import seed_end

ATTEMPT = "_attempt.json"
# Runs that add the experts' seeded out-of-cluster share to their own data.
OOC_KINDS = ("expert", "onestep")
Log = Callable[[str], None]


def num_experts(run: RunDir) -> int:
    """Experts of the run's clustering (from the clusters manifest)."""
    m = run.manifest("clusters")
    if m is None:
        raise FileNotFoundError(f"{run.stage_uri('clusters')} is not complete: run jobs/cluster.py first")
    return len(m["stats"]["experts"])


def seed_threads(cfg: TrainConfig, node_cpus: float | None = None) -> int:
    """The seed trains alone: it gets the torch threads of ``max_concurrent`` runs, capped at the
    CPUs of the cluster's largest node (``node_cpus``; read from Ray when None). Not their CPU
    reservation: Ray Data's read and decode tasks need the CPUs a worker leaves free (on 2 CPUs
    a 1-CPU worker starved its own input pipeline). On 2 cores, 3 threads trained mode-tiny at
    800 samples/s and 2 at 1,000: no more threads than cores. 0 keeps
    Ray's default (the worker's CPUs)."""
    if node_cpus is None:
        node_cpus = max((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n["Alive"]),
                        default=0.0)
    threads = cfg.threads_per_worker * cfg.max_concurrent
    return min(threads, int(node_cpus)) if node_cpus >= 1 else threads


# ----------------------------------------------------------------------------- one run
def train_run(cfg: ConfigView, run_uri: str, job: Job, upstream: dict[str, Any],
              samples: int | None, threads: int | None, label: str | None = None) -> dict[str, Any]:
    """Train one run to its end (resuming its own checkpoints) and return its registry entry."""
    run = RunDir(run_uri, cfg.storage)
    started, wall0 = now(), time.time()
    experts = len(upstream["training_data"]["stats"]["rows_per_expert"])
    # Only an expert (and a OneStep expert) draws with the data seed (its out-of-cluster
    # share); the random split's parts were drawn by training_data.
    ooc, draw = (cfg.train.ooc_ratio, cfg.train.data_seed) if job.kind in OOC_KINDS else (0.0, 0)
    cluster_keys = onestep.keys(run, job.index) if job.kind == "onestep" else None
    if samples is None:     # a manifest without this count: two small columns are enough
        samples = training_data.rows_for(run, job, experts, ooc, draw, cpus=cfg.train.data_cpus,
                                         columns=["key", "random_id"],
                                         cluster_keys=cluster_keys).count()
    init = upstream["checkpoints/seed"]["stats"]["entry"]["checkpoint"] if job.kind != "seed" else None
    order = job.order_seed(cfg.train.seed)
    rows = training_data.rows_for(run, job, experts, ooc, draw, cpus=cfg.train.data_cpus,
                                  order_seed=order, cluster_keys=cluster_keys)
    result = train.train(job.name, rows,
                         cfg.train, run.stage_uri(job.folder), job.end_samples,
                         schedule_total=job.schedule_total, threads=threads,
                         init_checkpoint=init, storage=cfg.storage, label=label, order_seed=order)
    fine = None
    if job.kind == "expert":
        fine = clusters.owned(run, job.index, job.generation)
    losses = [h["loss"] for h in result.history]
    wall = time.time() - wall0
    t = cfg.train
    return {
        "name": job.name, "kind": job.kind, "unit": job.unit, "generation": job.generation,
        "expert_id": job.index if job.kind == "expert" else None,
        "part": job.index if job.kind == "random-split" else None,
        "fine_clusters": fine, "samples": int(samples), "model": cfg.train.model,
        "checkpoint": result.checkpoint, "sha256": sha256(run.fs, result.checkpoint),
        "init_checkpoint": init,
        "metrics": {"step": result.step, "samples_seen": result.samples_seen,
                    "steps_run": result.steps_run, "start_step": result.start_step,
                    "final_loss": losses[-1] if losses else None,
                    "first_loss": losses[0] if losses else None},
        # The run's log lines (pipeline.training.train.TrainResult.history), at most HISTORY_POINTS of
        # them: pipeline.training.curves draws them (every line is in TensorBoard's event files).
        "history": thin(result.history, HISTORY_POINTS),
        # Worker-group restarts within this attempt (a lost node; train.max_failures) and where
        # each start ran: node id, the step it started from, where `pipeline` was imported.
        "restarts": result.restarts, "starts": list(result.starts),
        # The rows its last worker group was fed in its first pass over the data, and their
        # keys' digest (pipeline.core.keys.digest): which samples the run trained on.
        "fed": result.fed,
        # How mixed its first batches were: each one's largest expert share and that expert
        # (pipeline.training.train.TrainResult.first_batches; None for rows without expert_id).
        "first_batches": result.first_batches,
        "started_at": started, "finished_at": now(),
        "wall": {"start": wall0, "end": wall0 + wall, "seconds": round(wall, 2)},
        # What this attempt reserved: its workers' CPU and GPU units times its wall time, Ray
        # Train's start-up included (a run resumed after a failure counts its last attempt).
        "cost": {"cpu_seconds": round(t.num_workers * t.cpus_per_worker * wall, 1),
                 "gpu_seconds": round(t.num_workers * (1 if t.use_gpu else 0) * wall, 1),
                 "samples": result.samples_seen - result.start_samples},
    }


HISTORY_POINTS = 500


def thin(lines: list[dict], most: int) -> list[dict]:
    """At most ``most`` of ``lines``, evenly spaced, the last always kept (a long run logs
    thousands of lines; a registry entry needs a curve, not every line)."""
    if len(lines) <= most:
        return list(lines)
    keep = {round(i * (len(lines) - 1) / (most - 1)) for i in range(most)}
    return [line for i, line in enumerate(lines) if i in keep]


@ray.remote(num_cpus=0)
def _train_remote(cfg: ConfigView, run_uri: str, job: Job, upstream: dict[str, Any],
                  samples: int | None, threads: int | None, label: str) -> dict[str, Any]:
    # Zero CPUs: the launcher task only waits on its Train run, whose workers hold the CPUs.
    return train_run(cfg, run_uri, job, upstream, samples, threads, label)


def _fresh_start(run: RunDir, job: Job, config_hash: str, force: bool, log: Log,
                 label: str) -> None:
    """Keep a run's checkpoints only when they were made with this config (then it resumes)."""
    marker = run.stage_path(job.unit, ATTEMPT)
    before = read_json(run.fs, marker)["config_hash"] if run.fs.exists(marker) else None
    folder = run.stage_path(job.unit)
    if (before != config_hash or force) and run.fs.exists(folder):
        log(f"[{label}] {'--force' if force else 'its checkpoints were made with another config'}:"
            " starting afresh")
        run.fs.rm(folder, recursive=True)
    write_json_atomic(run.fs, marker, {"config_hash": config_hash, "started_at": now()})


# ----------------------------------------------------------------------------- the launcher
WATCH_EVERY_S = 10.0


class ResourcePlanError(SystemExit):
    """Concurrent runs that cannot all make progress on the cluster's nodes (refused before
    anything starts; the message says what to change)."""


def resource_plan(t: TrainConfig, runs: int, node_types: str = "") -> str:
    """Check that ``runs`` concurrent runs' workers and a Ray Data task beside them fit on the
    nodes as they are, or with the nodes the autoscaler can add (``ray.node_types``;
    ``pipeline.training.resources``); returns what fits, raises ``ResourcePlanError`` otherwise."""
    worker = train.worker_resources(t)
    nodes = raycluster.node_resources()
    plan = resources.check(nodes, worker, t.num_workers, runs, t.data_cpus)
    if plan.fits:
        return plan.reason
    extra = raycluster.autoscaler_nodes(node_types, limit=runs * t.num_workers + 1)
    if extra:
        grown = resources.check(nodes + extra, worker, t.num_workers, runs, t.data_cpus)
        if grown.fits:
            return f"{grown.reason}, once the autoscaler adds nodes (ray.node_types)"
        raise ResourcePlanError(f"[launch] refused, even with the nodes of ray.node_types: {grown.reason}")
    raise ResourcePlanError(f"[launch] refused: {plan.reason} (on an autoscaling cluster, "
                            "declare the node types it can add: --set ray.node_types=...)")


class Watchdog:
    """Says in the job log when a run's step has not moved for ``limit_s`` seconds (and again
    every ``limit_s`` while it stays stuck), with what the cluster is waiting to schedule."""

    def __init__(self, limit_s: float, log: Log) -> None:
        self.limit, self.log = limit_s, log
        self.step: dict[str, int | None] = {}      # run -> the last step seen
        self.moved: dict[str, float] = {}          # run -> when that step was first seen
        self.warned: dict[str, float] = {}

    def started(self, name: str) -> None:
        self.step[name], self.moved[name] = None, time.monotonic()

    def check(self, names: Sequence[str]) -> list[str]:
        """The runs found stalled now (each warned about in the log)."""
        if self.limit <= 0:
            return []
        try:
            beats = console.beats()
        except Exception as e:  # noqa: BLE001 - the watchdog must never fail the job
            self.log(f"[launch] watchdog: cannot read the runs' steps ({type(e).__name__})")
            return []
        now, stalled = time.monotonic(), []
        for name in names:
            step = beats.get(name, (None, 0.0))[0]
            if step != self.step.get(name) or name not in self.moved:
                self.step[name], self.moved[name] = step, now
            idle = now - self.moved[name]
            if idle >= self.limit and now - self.warned.get(name, -math.inf) >= self.limit:
                self.warned[name] = now
                stalled.append(name)
                where = f"at step {step}" if step is not None else "before its first step"
                self.log(f"[{name}] no progress for {idle:.0f} s ({where}); {raycluster.pending()}")
        return stalled


@dataclass(frozen=True)
class Launch:
    """One run for ``launch_many``: its job, the config and run directory it trains in, and the
    label of its log lines (its name; "<replica>/<name>" where several run directories, such as
    an experiment's training seeds, launch together and share run names).

    ``after``: the label of another run of the same call that must finish first (an
    experiment's experts and baselines wait for their own seed model, not for every seed's);
    ``threads``: torch threads for this run (default: ``launch_many``'s)."""
    cfg: Config
    run: RunDir
    job: Job
    label: str
    after: str | None = None
    threads: int | None = None


def queue_order(runs: Sequence[Launch]) -> list[Launch]:
    """``launch_many``'s queue: the runs others wait for (``after``) first, then longest first
    (dense-matched costs m expert runs: the last slot to free up should not be left running one
    long job alone). Stable: equal runs keep their given order."""
    awaited = {r.after for r in runs if r.after is not None}
    unknown = awaited - {r.label for r in runs}
    if unknown:
        raise ValueError(f"runs wait for runs not in this launch: {sorted(unknown)}")
    return sorted(runs, key=lambda r: (r.label not in awaited,
                                       -(r.job.end_samples - seed_end(r.cfg.train))))


def next_startable(queue: list[tuple[Launch, StageRun | None]], succeeded: set[str],
                   failed: dict[str, str], log: Log = print) -> tuple[Launch, StageRun] | None:
    """Take from ``queue`` the first run whose ``after`` has succeeded, its ``StageRun`` built
    now where it waited (its inputs exist only now); None when every queued run still waits.
    Runs whose ``after`` failed, or whose inputs do not check, are taken out and entered in
    ``failed``."""
    for i, (r, sr) in enumerate(queue):
        if r.after in failed:
            queue.pop(i)
            failed[r.label] = f"not started: {r.after} failed"
            log(f"[{r.label}] {failed[r.label]}")
            return next_startable(queue, succeeded, failed, log)
        if r.after is None or r.after in succeeded:
            queue.pop(i)
            if sr is None:
                try:
                    sr = StageRun(r.job.unit, r.cfg, r.run)
                except Exception as e:  # noqa: BLE001 - fail this run, not the launch
                    failed[r.label] = f"{type(e).__name__}: {e}"
                    log(f"[{r.label}] failed: {failed[r.label]}")
                    return next_startable(queue, succeeded, failed, log)
            return r, sr
    return None


def launch(cfg: Config, run: RunDir, jobs: Sequence[Job], max_concurrent: int, *,
           threads: int | None = None, force: bool = False,
           log: Log = print) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Run ``jobs`` of one run directory, at most ``max_concurrent`` at once; returns (registry
    entries of the runs finished now, {name: error} of the failed ones). ``launch_many`` with
    each job labelled by its name."""
    return launch_many([Launch(cfg, run, job, job.name) for job in jobs], max_concurrent,
                       threads=threads, force=force, log=log)


def launch_many(runs: Sequence[Launch], max_concurrent: int, *, threads: int | None = None,
                force: bool = False, log: Log = print) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Run ``runs`` (of one or several run directories), at most ``max_concurrent`` at once, in
    one queue; returns (registry entries of the runs finished now, {label: error} of the failed
    ones).

    Every run's inputs are checked first (a missing or out-of-date seed fails the call before
    anything starts), except those of a run whose ``after`` trains in this call: they are
    checked when it has finished. Complete runs are skipped; the others queue (the runs others
    wait for first, then longest first) and start as slots free up and their ``after`` has
    finished (a Ray Train run short of CPUs also waits for them). A failed run is reported and
    does not stop the others; the runs waiting for it are reported failed, not started. The
    resource check reads the first queued run's ``train`` section (the runs of one call share
    their workers' shape).
    """
    runs = queue_order(runs)
    queue: list[tuple[Launch, StageRun | None]] = []
    training: set[str] = set()      # labels of the runs this call trains
    succeeded: set[str] = set()     # labels of the runs done: skipped as complete, or trained
    for r in runs:
        if r.after in training:     # its inputs do not exist yet: checked when it can start
            queue.append((r, None))
            training.add(r.label)
            log(f"[{r.label}] queued, after {r.after}")
            continue
        sr = StageRun(r.job.unit, r.cfg, r.run)
        done = sr.completed()
        if done is not None and not force:
            if r.job.name not in registry.finished(r.run):
                registry.put(r.run, done["stats"]["entry"])
            log(f"[{r.label}] complete for this config: skipped")
            succeeded.add(r.label)
        else:
            queue.append((r, sr))
            training.add(r.label)
            log(f"[{r.label}] queued")
    first = queue[0][0].cfg if queue else None
    if first is not None:
        fit = resource_plan(first.train, min(max_concurrent, len(queue)), first.ray.node_types)
        log(f"[launch] {fit}")
    running: dict[ray.ObjectRef, tuple[Launch, StageRun, str]] = {}
    watch = Watchdog(first.train.stall_warning_s if first is not None else 0, log)
    finished, failed = [], {}

    with console.relay(log):
        while queue or running:
            while len(running) < max_concurrent and \
                    (picked := next_startable(queue, succeeded, failed, log)) is not None:
                r, sr = picked
                job = r.job
                done = None if force else sr.completed()
                if done is not None:    # one that waited, complete already (a rerun)
                    registry.put(r.run, done["stats"]["entry"])
                    succeeded.add(r.label)
                    log(f"[{r.label}] complete for this config: skipped")
                    continue
                started = sr.begin()
                registry.drop(r.run, job.name)
                _fresh_start(r.run, job, sr.config_hash, force, log, r.label)
                ooc, draw = ((sr.cfg.train.ooc_ratio, sr.cfg.train.data_seed)
                             if job.kind in OOC_KINDS else (0.0, 0))
                samples = training_data.run_rows(sr.upstream["training_data"], job, ooc, draw)
                # Launcher task and Ray Train controller on the driver's node (the head), not
                # on a worker node that may be lost (docs/cluster.md, "Losing nodes").
                ref = _train_remote.options(scheduling_strategy=console.on_this_node()).remote(
                    sr.cfg, r.run.uri, job, sr.upstream, samples,
                    threads if r.threads is None else r.threads, r.label)
                running[ref] = (r, sr, started)
                watch.started(r.label)
                log(f"[{r.label}] running")
            if not running:     # nothing runs and nothing can start: say so, never spin
                for r, _ in queue:
                    failed[r.label] = f"not started: {r.after} did not finish"
                    log(f"[{r.label}] {failed[r.label]}")
                queue.clear()
                continue
            ready, _ = ray.wait(list(running), num_returns=1, timeout=WATCH_EVERY_S)
            if not ready:
                watch.check([r.label for r, *_ in running.values()])
                continue
            r, sr, started = running.pop(ready[0])
            try:
                entry = ray.get(ready[0])
            except Exception as e:  # noqa: BLE001 - one failed run must not stop the others
                failed[r.label] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}"
                log(f"[{r.label}] failed: {failed[r.label]}")
                continue
            registry.put(r.run, entry)
            sr.finish(StageOutput(entry["samples"], entry["samples"], {}, {"entry": entry}), started)
            finished.append(entry)
            succeeded.add(r.label)
            m = entry["metrics"]
            log(f"[{r.label}] done: {entry['samples']:,} samples, steps {m['start_step']}->{m['step']}, "
                f"loss {m['first_loss']:.3f}->{m['final_loss']:.3f}, {entry['wall']['seconds']:.0f} s")
    return finished, failed


def train_seed(cfg: Config, run: RunDir, force: bool = False, log: Log = print) -> dict[str, Any]:
    """Train (or resume, or skip when complete) the seed; returns its registry entry."""
    job = seed_job(cfg.train)
    done, failed = launch(cfg, run, [job], 1, threads=seed_threads(cfg.train), force=force, log=log)
    if failed:
        raise RuntimeError(f"the seed failed: {failed[job.name]}")
    return done[0] if done else registry.finished(run)[job.name]
