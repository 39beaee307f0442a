"""Chaos: the pipeline while its Ray workers are killed (`make chaos`; docs/reliability.md).

    python jobs/chaos.py --out chaos_out [--runs 5] [--every 45] [--seed 0]
    python jobs/chaos.py --out chaos_out --node-crash [--runs 3] [--resubmit 2]

Generates a small demo world once (<out>/data). Then it runs the data stages, the seed and two
experts (`jobs/run_pipeline.py --until experts --baselines ""`, the demo preset made small:
CHAOS_SET below):
- once undisturbed, into <out>/reference;
- then --runs times, into <out>/run-<i>, while a helper thread SIGKILLs one Ray worker process
  of that run at a time, of any kind the job owns (KINDS): a training worker, a Ray Data task,
  an embedding actor, the job's console actor, a run's Ray Train controller or one of its
  helpers (placement-group cleaner, dataset manager, synchronisation actor), one of Ray Data's
  helper actors.

Every kind first: until each kind has been killed once over the runs, a process of a kind not
killed yet is killed as soon as one is alive (the killer looks every 0.1 s: data tasks live for
a fraction of a second, data stages for seconds). Then kills come every --every seconds on
average (uniform in 0.5-1.5 x every): the killer watches the run's processes for 5 s, draws a
kind among those it saw, waits for a live process of that kind and kills it; one that does not
come back within 10 s is counted as a miss. After killing a training process the killer leaves
the run alone for every/2 (a training run takes about 40 s to restart on 2 cores), after any
other 5 s. Only processes descended from that run's driver are touched; the driver, the raylet
and other people's Ray are not.

Each run must:
- finish (exit 0);
- have data stages equal to the reference's (`pipeline.core.compare.differences`: the same rows,
  embeddings within 1e-5, clusters and assignments bit-identical when the embeddings are);
- end every training run at exactly its planned samples.

Writes <out>/chaos.json and prints one line per run: wall time, kills and recoveries by kind,
worker-group restarts, relaunches, stage retries, outcome; the last line names any kind never
killed. A kill counts as recovered when its run passed every check. The job log says how: a
training run's relaunch (its controller or a helper died: ``relaunch``), a worker-group restart
(``restarts`` in the registry), a data stage run again (a Ray process it used died: ``retry``),
a stage that counted from its data (its console actor died: ``counts are incomplete``); Ray
retries tasks and restarts actors silently. Exits 1 if a run failed a check.

With --node-crash (`make chaos-node`) the runs go to a Ray of three nodes on this machine (a
head that runs no task and two worker nodes of one CPU and one `accel`, the stand-in for a GPU:
NODE_SET), each by `ray job submit`, the reference first. In each disturbed run one worker node
crashes at a random time (its raylet, agents and workers SIGKILLed at once) and a new node joins
in its place, as an autoscaler would start one. A job that did not succeed is submitted again,
the same command, up to --resubmit times; then the run must pass the same checks. Writes
<out>/chaos_node.json: when and which node crashed, the job's last line then, each submission's
status and recovery lines, and whether the run recovered by itself or after resubmission.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from pipeline.core import cli, registry
from pipeline.core.compare import differences
from pipeline.core.config import DemoConfig, StorageConfig, load_config
from pipeline.core.rundir import RunDir
from pipeline.data import demo_world
from pipeline.training.runs import plan, seed_job

REPO = Path(__file__).resolve().parents[1]
# The demo preset, small: 2,000 pairs, two experts, 2,048 samples per training run.
CHAOS_SET = ["cluster.fine_k=16", "cluster.num_experts=2", "cluster.restarts=1",
             "train.total_samples=4096", "train.batch_size=64", "train.warmup_samples=512",
             "train.seed_fraction=0.5", "train.checkpoint_every_steps=4",
             "train.log_every_steps=4", "train.max_failures=10"]
WORLD = DemoConfig(samples=2_000, samples_per_shard=250, new_domain_samples=0, eval_per_class=2)
# What a process's title (Ray sets it: ray::<what it runs>) says it is.
# Checked in order: the first kind whose mark the title holds.
KINDS = {"training worker": ("RayTrainWorker",),
         "train controller": ("ray::TrainController",),
         "train helper": ("ray::PlacementGroupCleaner", "ray::DatasetManager",
                          "ray::SynchronizationActor"),
         "console actor": ("ray::_Console",),
         # Ray Data's own actors beside the map pools: its stats and autoscaling coordinators,
         # a split coordinator, the parquet footer reader
         "data helper actor": ("ray::_StatsActor", "ray::_AutoscalingCoordinator",
                               "ray::SplitCoordinator", "ray::FooterReader"),
         "embedding actor": ("EmbedBatches", "MapWorker"),
         # tasks only: a hash-shuffle aggregator is an actor whose state a kill would lose
         "data task": ("ray::Read", "ray::MapBatches", "ray::Map(", "ray::Write", "ray::Filter",
                       "ray::Project", "ray::_map_task", "ray::Sort")}
# What the job log says when it recovers on its own (beyond Ray's silent task retries).
RECOVERY_LINES = {"relaunches": "] relaunch ", "stage_retries": "] retry ",
                  "counts_from_data": "counts are incomplete"}
TRAINING_KINDS = {"training worker", "train controller", "train helper"}
POLL_S = 0.1    # how often the killer looks at the processes
WATCH_S = 5.0   # how long it watches before it draws a kind among those it saw
DATA_GAP_S = 5.0    # the least time between a kill in a data stage and the next


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, title) of every process on the machine (Linux /proc)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                title = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:     # gone meanwhile
            continue
        found[int(entry)] = (ppid, title)
    return found


def targets(root: int) -> dict[str, list[tuple[int, str]]]:
    """The processes below ``root`` that may be killed, by kind."""
    procs = _processes()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    below, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            below.append(child)
            todo.append(child)
    out: dict[str, list[tuple[int, str]]] = {}
    for pid in below:
        title = procs[pid][1]
        if not title.startswith("ray::") or title.startswith("ray::IDLE"):
            continue
        for kind, marks in KINDS.items():
            if any(m in title for m in marks):
                out.setdefault(kind, []).append((pid, title[:80]))
                break
    return out


class Killer(threading.Thread):
    """Kill one worker process of the run below ``root`` about every ``every`` seconds, and
    first of all one of each kind the campaign has not killed yet (``drawn``, shared by the
    runs), as soon as one is alive."""

    def __init__(self, root: int, every: float, rng: random.Random, start: float,
                 drawn: Counter) -> None:
        super().__init__(daemon=True, name="chaos-killer")
        self.root, self.every, self.rng, self.t0, self.drawn = root, every, rng, start, drawn
        self.stop = threading.Event()
        self.kills: list[dict] = []
        self.misses: Counter = Counter()

    def run(self) -> None:
        # Coverage: data stages last tens of seconds and their processes a fraction of one, so
        # a schedule alone may never meet some kinds. Until every kind has been killed once in
        # the campaign, one not killed yet is killed as soon as it is alive, a gap after the
        # last kill (long after a training process: a run takes about 40 s to restart).
        next_at = time.time() + self.every * self.rng.uniform(0.5, 1.5)
        calm_until = 0.0
        while not self.stop.is_set():
            now = time.time()
            undrawn = set(KINDS) - set(self.drawn)
            if undrawn and now >= calm_until:
                live = {k: v for k, v in targets(self.root).items() if k in undrawn}
                if live:
                    kind = self.rng.choice(sorted(live))
                    if self._kill(kind, live[kind], "first of its kind"):
                        calm_until = time.time() + self._gap(kind)
                        next_at = max(next_at, calm_until)
                        continue
            if now >= next_at and now >= calm_until:
                kind = self._draw()
                if kind is not None:
                    # A short wait: a data task comes back within seconds while its stage
                    # runs; an embedding actor seen during the watch may have finished for good.
                    live, deadline = [], time.time() + 2 * WATCH_S
                    while not live and time.time() < deadline and not self.stop.is_set():
                        live = targets(self.root).get(kind, [])
                        if not live:
                            time.sleep(POLL_S)
                    if self._kill(kind, live, "scheduled"):
                        calm_until = time.time() + self._gap(kind)
                next_at = max(time.time() + self.every * self.rng.uniform(0.5, 1.5), calm_until)
            self.stop.wait(POLL_S)

    def _gap(self, kind: str) -> float:
        """How long to leave the run alone after killing a ``kind``."""
        return self.every * 0.5 if kind in TRAINING_KINDS else DATA_GAP_S

    def _draw(self) -> str | None:
        """Ray Data tasks live for a fraction of a second: a kind drawn among the processes alive
        at one instant would almost never be a data task. So the killer watches for WATCH_S and
        draws the kind among those it saw."""
        seen: set[str] = set()
        until = time.time() + WATCH_S
        while time.time() < until and not self.stop.is_set():
            seen |= set(targets(self.root))
            time.sleep(POLL_S)
        return self.rng.choice(sorted(seen)) if seen else None

    def _kill(self, kind: str, live: list[tuple[int, str]], why: str) -> bool:
        try:
            if not live:
                raise ProcessLookupError
            pid, title = self.rng.choice(live)
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            self.misses[kind] += 1      # none came back in time, or it ended meanwhile
            return False
        self.drawn[kind] += 1
        self.kills.append({"t": round(time.time() - self.t0, 1), "kind": kind, "pid": pid,
                           "title": title, "why": why})
        print(f"  [chaos] {time.time() - self.t0:6.1f} s: killed {kind} {pid} ({title}; {why})",
              flush=True)
        return True


def pipeline_job(run_dir: Path, data: Path, log: Path, overrides: list[str],
                 verbose: bool) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)         # its own local Ray: its processes are its descendants
    cmd = [sys.executable, "jobs/run_pipeline.py", "--run-dir", str(run_dir), "--data", str(data),
           "--until", "experts", "--baselines", ""]
    for item in [*CHAOS_SET, *overrides]:    # --set on chaos.py goes to every run
        cmd += ["--set", item]
    if verbose:
        cmd.append("--verbose")
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def check(run_dir: Path, reference: Path | None, overrides: list[str]) -> list[str]:
    """What is wrong with a finished run: data stages unlike the reference's (when given), a
    training run missing or not at its planned samples."""
    problems = differences(run_dir, reference) if reference else []
    cfg = load_config("demo", [*CHAOS_SET, *overrides]).train
    entries = registry.finished(RunDir(str(run_dir), StorageConfig()))
    for job in [seed_job(cfg), *plan(cfg, 2, baselines=[])]:
        entry = entries.get(job.name)
        if entry is None:
            problems.append(f"{job.name}: not in the registry")
        elif entry["metrics"]["samples_seen"] != job.end_samples:
            problems.append(f"{job.name}: {entry['metrics']['samples_seen']} samples seen, "
                            f"{job.end_samples} planned")
    return problems


def recoveries(log: Path) -> dict[str, int]:
    """The job log's recovery lines (RECOVERY_LINES), counted."""
    return recoveries_in(log.read_text(errors="replace") if log.exists() else "")


def recoveries_in(text: str) -> dict[str, int]:
    return {name: sum(mark in line for line in text.splitlines())
            for name, mark in RECOVERY_LINES.items()}


def restarts(run_dir: Path) -> int:
    entries = registry.finished(RunDir(str(run_dir), StorageConfig()))
    return sum(e.get("restarts", 0) for e in entries.values())


# ----------------------------------------------------------------------------- a node crash
# A head that runs no task and two worker nodes of one CPU and one `accel` (a custom resource
# standing in for a GPU: one expert per node), as tests/test_multinode.py's cluster.
NODE_SET = ["train.cpus_per_worker=0", "train.data_cpus=0.5", "train.worker_resources=accel=1",
            "train.max_concurrent=2", "embed.num_cpus_per_actor=0.5"]
NODE = {"cpus": 1, "resources": {"accel": 1}}


def node_crash(args, out: Path, data: Path) -> int:
    """Each disturbed run is submitted to a 3-node cluster on this machine (`ray job submit`);
    at a random time one worker node crashes (its raylet, agents and workers SIGKILLed at once:
    a node gone without a goodbye) and a new node joins in its place, as an autoscaler would
    start one. A job that did not succeed is submitted again, the same command, up to
    --resubmit times; the run must then pass ``check`` against the undisturbed reference
    submitted to the same cluster."""
    from pipeline.core.localnodes import LocalCluster

    # the nodes share this machine's disk: the run directories and the data are one mount
    overrides = [*NODE_SET, f"storage.shared_mount={out}", *args.overrides]
    nodes = out / "nodes"
    shutil.rmtree(nodes, ignore_errors=True)
    nodes.mkdir(parents=True)
    code = nodes / "code"           # what `--working-dir` ships: the jobs and the package
    for part in ("pipeline", "jobs"):
        shutil.copytree(REPO / part, code / part, ignore=shutil.ignore_patterns("__pycache__"))
    rng = random.Random(args.seed)
    cluster = LocalCluster(nodes, head_cpus=0, extra_env={"HF_HUB_OFFLINE": "1",
                                                          "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1"})
    results, reference_wall, spare = [], None, 0
    try:
        for name in ("w1", "w2"):
            cluster.add_worker(name, **NODE)
        for i in range(args.runs + 1):
            name = "node-reference" if i == 0 else f"crash-{i}"
            run_dir = out / name
            shutil.rmtree(run_dir, ignore_errors=True)
            cmd = ["python", "jobs/run_pipeline.py", "--run-dir", str(run_dir), "--data",
                   str(data / "train"), "--until", "experts", "--baselines", ""]
            for item in [*CHAOS_SET, *overrides]:
                cmd += ["--set", item]
            started, crash, attempts = time.time(), None, []
            while True:
                job_id = f"{name}-{len(attempts)}-{random.getrandbits(24):06x}"
                cluster.submit(job_id, code, *cmd)
                if i and crash is None:
                    # somewhere in the run: the data stages, the seed or the experts
                    at = started + rng.uniform(0.15, 0.85) * reference_wall
                    while time.time() < at and cluster.status(job_id) in ("RUNNING", "PENDING"):
                        time.sleep(0.5)
                    victim = rng.choice(sorted(cluster.workers))
                    during = cluster.status(job_id)
                    log = cluster.job_log(job_id)
                    doing = next((line for line in reversed(log.splitlines())   # the job's
                                  if re.match(r"\[[a-z]", line)), "(nothing printed yet)")  # own
                    cluster.kill_worker(victim)
                    crash = {"t": round(time.time() - started, 1), "node": victim,
                             "job_was": during, "last_line": doing[:160]}
                    print(f"  [chaos] {crash['t']:6.1f} s: crashed node {victim} (the job's last "
                          f"line: {doing[:120]})", flush=True)
                    spare += 1
                    cluster.add_worker(f"spare{spare}", **NODE)     # the autoscaler's replacement
                state = cluster.wait(job_id, timeout=900)
                text = cluster.job_log(job_id)
                (out / f"{job_id}.log").write_text(text)
                attempts.append({"job": job_id, "status": state, **recoveries_in(text)})
                if state == "SUCCEEDED" or i == 0 or len(attempts) > args.resubmit:
                    break
                print(f"  [chaos] {name}: job {state}, submitting the same command again",
                      flush=True)
            wall = time.time() - started
            if i == 0:
                reference_wall = wall
            problems = ([] if state == "SUCCEEDED" else [f"{state}: see {out / (job_id + '.log')}"])
            if not problems:
                problems = check(run_dir, out / "node-reference" if i else None, overrides)
            result = {"run": name, "wall_s": round(wall, 1), "crash": crash,
                      "submissions": len(attempts), "attempts": attempts,
                      "restarts": restarts(run_dir) if state == "SUCCEEDED" else None,
                      "recovered": None if problems or not i else (
                          "by itself" if len(attempts) == 1 else
                          f"after {len(attempts) - 1} resubmission(s)"),
                      "problems": problems}
            results.append(result)
            print(f"[chaos] {name}: {wall:.0f} s, "
                  + (f"node {crash['node']} crashed at {crash['t']:.0f} s, " if crash else "")
                  + f"{len(attempts)} submission(s), {result['restarts']} worker-group restarts, "
                  + ", ".join(f"{a['status']} ({a['relaunches']} relaunches, {a['stage_retries']} "
                              f"stage retries)" for a in attempts)
                  + ": " + ("FAILED " + "; ".join(problems) if problems else
                            "OK" + (f", recovered {result['recovered']}" if i else "")),
                  flush=True)
            if i == 0 and problems:
                print("[chaos] the undisturbed reference run failed: nothing to compare with")
                break
    finally:
        cluster.stop()
    (out / "chaos_node.json").write_text(json.dumps(results, indent=1))
    bad = [r["run"] for r in results if r["problems"]]
    print(f"[chaos] {len(results) - 1} node crashes; recovered by themselves: "
          f"{sum(r['recovered'] == 'by itself' for r in results[1:])}, after resubmission: "
          f"{sum(bool(r['recovered']) and r['recovered'] != 'by itself' for r in results[1:])}; "
          f"failed: {bad or 'none'}; {out / 'chaos_node.json'}")
    return 1 if bad else 0


def main(argv=None) -> int:
    p = cli.parser(__doc__, run_dir=False)
    p.add_argument("--out", default="chaos_out", help="where the world, the runs and chaos.json go")
    p.add_argument("--runs", type=int, default=5, help="disturbed runs (default 5)")
    p.add_argument("--every", type=float, default=45.0,
                   help="mean seconds between kills (default 45; a training run restarts in ~40)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill schedule")
    p.add_argument("--node-crash", action="store_true",
                   help="instead: crash one worker node of a 3-node cluster on this machine per run "
                        "(`make chaos-node`); writes chaos_node.json")
    p.add_argument("--resubmit", type=int, default=2,
                   help="with --node-crash: times a failed job is submitted again (default 2)")
    args = p.parse_args(argv)
    # The runs use the demo preset made small (CHAOS_SET) and --set: their config, not --config's.
    own = [*CHAOS_SET, *(NODE_SET if args.node_crash else [])]
    source = (f"the 'demo' preset with chaos's {' '.join(own)}"
              + (f" and --set {' '.join(args.overrides)}" if args.overrides else ""))
    cli.show(args, load_config("demo", [*own, *args.overrides]), source)
    print(f"[config] {source}")
    out = Path(args.out).resolve()
    data = out / "data"
    if not (data / "world.json").exists():
        demo_world.generate(str(data), WORLD, StorageConfig(), log=lambda *_: None)
    if args.node_crash:
        return node_crash(args, out, data)
    rng = random.Random(args.seed)
    drawn: Counter = Counter()      # kills by kind over the campaign
    results = []
    for i in range(args.runs + 1):
        name = "reference" if i == 0 else f"run-{i}"
        run_dir = out / name
        if i and run_dir.exists():
            shutil.rmtree(run_dir)      # a disturbed run starts afresh; the reference is reused
        started = time.time()
        job = pipeline_job(run_dir, data / "train", out / f"{name}.log", args.overrides,
                           args.verbose)
        killer = Killer(job.pid, args.every, rng, started, drawn) if i else None
        if killer:
            killer.start()
        rc = job.wait()
        if killer:
            killer.stop.set()
            killer.join()
        wall = time.time() - started
        kills = killer.kills if killer else []
        if rc != 0:
            problems = [f"exit {rc}: see {out / (name + '.log')}"]
        else:
            problems = check(run_dir, out / "reference" if i else None, args.overrides)
        by_kind = dict(Counter(k["kind"] for k in kills))
        result = {"run": name, "wall_s": round(wall, 1), "exit": rc, "kills": kills,
                  "kills_by_kind": by_kind,
                  "recovered_by_kind": {} if problems else by_kind,
                  "misses_by_kind": dict(killer.misses) if killer else {},
                  "restarts": restarts(run_dir) if rc == 0 else None,
                  **recoveries(out / f"{name}.log"), "problems": problems}
        results.append(result)
        print(f"[chaos] {name}: {wall:.0f} s, {len(kills)} kills {by_kind} "
              f"(missed: {result['misses_by_kind'] or 'none'}), "
              f"{result['restarts']} worker-group restarts, {result['relaunches']} relaunches, "
              f"{result['stage_retries']} stage retries, "
              f"{result['counts_from_data']} stages counted from their data: "
              f"{'OK' if not problems else 'FAILED ' + '; '.join(problems)}", flush=True)
        if i == 0 and problems:
            print("[chaos] the undisturbed reference run failed: nothing to compare with")
            break
    (out / "chaos.json").write_text(json.dumps(results, indent=1))
    bad = [r["run"] for r in results if r["problems"]]
    kills = sum((Counter(r["kills_by_kind"]) for r in results), Counter())
    recovered = sum((Counter(r["recovered_by_kind"]) for r in results), Counter())
    never = sorted(set(KINDS) - set(kills))
    print(f"[chaos] {len(results) - 1} disturbed runs, {sum(kills.values())} kills, recovered "
          f"by kind: {', '.join(f'{k} {recovered[k]}/{n}' for k, n in sorted(kills.items())) or 'none'}; "
          f"never killed: {', '.join(never) or 'none'}; "
          f"failed: {bad or 'none'}; {out / 'chaos.json'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
