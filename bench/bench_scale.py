"""How cost grows with N: the data stages after ingest at several sizes, and a training read's
time to its first batch against the number of files it reads.

The stages. For each size N (default 250,000, 1,000,000 and 4,000,000 rows, each 4 times the
last), in processes of their own:

1. A writer process makes the inputs: N rows of img2dataset parquet shards (``key``, ``caption``,
   ``jpg``: one 32 px JPEG that every row shares, 10,000 rows a shard), the same keys' caption
   embeddings as an import source (a seeded mixture of 64 Gaussians in 64 dimensions, the size of
   ``open_clip:mode-tiny``'s vectors), and ``ingest/``: its sample index written directly, one
   file a shard, and finished through the stage contract (``StageRun.begin``/``finish`` with the
   shards' URI as its input), so that every later stage checks its hash as usual. The real
   ingest decodes every image; that cost is per row by construction and is left out here.
2. A measuring process starts its own local Ray as the jobs start one
   (``pipeline.core.raycluster.init_ray``: every CPU, one parquet footer actor per read), with
   an object store of ``--object-store-mb`` (2,048 by default; the stages spill beyond it), and
   runs the real stages through ``pipeline.core.stages.run_stage``: ``embeddings`` (the import path,
   ``source=``: a hash join with ingest's keys), ``clusters``, ``assignments`` and
   ``training_data`` (which reads the shards again for the image bytes). Each stage must write
   N rows (``clusters`` reads N).

Config: the library defaults (``load_config(None)``) with ``data.format=parquet``,
``embed.model=open_clip:mode-tiny`` (its dimension is what the import checks), and the paper's
clustering, ``cluster.fine_k=1024`` and ``cluster.num_experts=4``. The defaults that matter for
scale: the fine fit uses a sample of 256 rows per centre (262,144 rows), the balanced assignment
blocks of 262,144 rows, ``embed.rows_per_file`` 100,000 and ``train.rows_per_file`` 10,000.
``--set section.field=value`` changes any of them (``cluster.fine_k`` must not exceed the
smallest size).

Memory, read from /proc (Linux). At the start of each stage the peak resident set (``VmHWM``)
of the driver and of every process below it is reset (``/proc/<pid>/clear_refs``); a thread
reads it every 0.2 s. "driver MB" is the driver's peak during the stage; "worker MB" the largest
peak of any Ray worker or actor (a process titled ``ray::``) during the stage, with the largest
private part (``RssAnon``, sampled) beside it: a worker's resident set also counts the object
store pages it maps, which every process mapping them counts again. The driver's peak over its
whole process (``ru_maxrss``) is the figure of the flat-memory goal.

First batch. A writer makes folders laid out as ``training_data/`` is (``expert_id=<e>/``, 4
partitions, files of ``--file-rows`` rows, 500 by default, with every column a training run
reads, tiny images) with 100, 400 and 1,600 files (``--files``); a process with its own local
Ray (as above) then reads each folder as a training run does,
``pipeline.core.tables.read_mixed`` (the seed, full and dense runs) and ``read_by_expert`` over
every partition (an expert with its out-of-cluster share), and iterates one worker's batches
(``train.batch_size``, 128) through the training loop's local shuffle buffer
(``train.shuffle_buffer``, 10,000 rows; ``iter_batches``) until the first batch. "plan s" is the
driver's part before any task runs (``read_mixed`` lists the files and reads every footer
there); "first batch s" everything up to the first batch, decoding none (an image's decode
costs the same whatever the file count). Each count is read ``--repeats`` times (5) in
alternating order after one warm-up read; the median counts.

How to read the output:
- Stage table: "us/row" is the stage's wall time over N; "x smallest" that over the smallest
  size's (1.00 is linear); "marginal us/row" the extra time over the extra rows from the size
  before, the per-row cost once fixed costs (Ray Data's start, actor pools, the encoder loaded on
  the driver to check the dimension) are set apart. A stage linear with a fixed cost shows a
  falling "x smallest" and a steady marginal cost; a super-linear one a rising marginal cost.
  ``clusters`` also shows its two parts (from its manifest): the pass over every row that draws
  the fit sample (linear) and the fit on that sample (fixed once N exceeds it).
- First-batch table: the median seconds per file count and their ratio to the smallest count.
- Goals, each PASS or FAIL: time per row within 10% across sizes, per stage (a FAIL says whether
  it grows, super-linear, or falls, a fixed cost); the driver's peak flat (within 10%) from the
  smallest size to the largest; time to the first batch not growing with the file count (within
  10% of the smallest count's).

Wall times move with other work on the machine; memory does not. ``--out`` writes everything as
JSON (commit, CPU, config, every figure, each read's times). The default sizes take a while on 2
cores, most of it at the largest size; ``--sizes 20000,80000 --files 100,400 --set
cluster.fine_k=64`` is a check of a few minutes.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchlib import descendants, markdown_table

# The paper's clustering; every other field keeps the library default (the module docstring).
OVERRIDES = ("data.format=parquet", "embed.model=open_clip:mode-tiny", "cluster.fine_k=1024",
             "cluster.num_experts=4")
STAGES = ("embeddings", "clusters", "assignments", "training_data")
ROWS_PER_SHARD = 10_000         # img2dataset's default --number_sample_per_shard
DIM = 64                        # open_clip:mode-tiny's vectors (the import checks it)
MIXTURE = 64                    # Gaussians of the synthetic embeddings
NOISE = 0.35                    # their spread around unit-length centres
PARTITIONS = 4                  # expert_id folders of the first-batch data
TOLERANCE = 0.10
RESULT = "RESULT "


# ----------------------------------------------------------------------------- inputs
def tiny_jpeg() -> bytes:
    """One valid 32 px JPEG (293 bytes), shared by every row."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (120, 60, 200)).save(buf, "JPEG", quality=75, optimize=True)
    return buf.getvalue()


def keys_and_captions(lo: int, hi: int) -> tuple[list[str], list[str]]:
    keys = [f"{i:010d}" for i in range(lo, hi)]
    return keys, [f"a photo of object {i % 9_973} in scene {i % 101}, take {i}" for i in range(lo, hi)]


def write_world(n: int, folder: Path, overrides: list[str]) -> dict:
    """Shards, an embeddings source and a finished ``ingest/`` for n rows under ``folder``."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.core.config import load_config
    from pipeline.core.rundir import RunDir, StageOutput
    from pipeline.core.stages import StageRun
    from pipeline.core.tables import embedding_table

    t0 = time.perf_counter()
    cfg = load_config(None, overrides)
    shards, source = folder / "shards", folder / "source"
    run = RunDir(str(folder / "run"), cfg.storage)
    unit = StageRun("ingest", cfg, run, external={"data": str(shards)})
    started = unit.begin()
    samples = Path(run.stage_path("ingest", "samples"))
    for path in (shards, source, samples):
        path.mkdir(parents=True, exist_ok=True)
    jpeg = tiny_jpeg()
    centres = np.random.default_rng(0).standard_normal((MIXTURE, DIM))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    files = 0
    for s, lo in enumerate(range(0, n, ROWS_PER_SHARD)):
        hi = min(n, lo + ROWS_PER_SHARD)
        keys, captions = keys_and_captions(lo, hi)
        shard = shards / f"{s:05d}.parquet"
        pq.write_table(pa.table({"key": keys, "caption": captions,
                                 "jpg": pa.array([jpeg] * (hi - lo), pa.binary())}), shard)
        # ingest's sample index of this shard: every row good, as the stage writes it
        pq.write_table(pa.table({"key": keys, "caption": captions,
                                 "shard": [str(shard)] * (hi - lo),
                                 "pos": np.arange(hi - lo, dtype=np.int64)}),
                       samples / f"{s:05d}.parquet")
        rng = np.random.default_rng([1, s])
        vectors = centres[rng.integers(MIXTURE, size=hi - lo)] + \
            NOISE / np.sqrt(DIM) * rng.standard_normal((hi - lo, DIM))
        pq.write_table(embedding_table(keys, vectors), source / f"{s:05d}.parquet")
        files += 1
    unit.finish(StageOutput(n, n, {}, {"shards": files, "written_by": "bench/bench_scale.py"}),
                started)
    return {"n": n, "shards": files, "seconds": round(time.perf_counter() - t0, 1),
            "source": str(source)}


def write_file_folders(counts: list[int], rows_per_file: int, root: Path) -> dict:
    """One training_data-like folder per file count: ``expert_id=<e>/part-<i>.parquet``."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    jpeg = tiny_jpeg()
    folders = {}
    for count in counts:
        folder = root / f"files-{count}"
        for i in range(count):
            expert = i % PARTITIONS
            lo = i * rows_per_file
            keys, captions = keys_and_captions(lo, lo + rows_per_file)
            rng = np.random.default_rng([2, i])
            part = folder / f"expert_id={expert}"
            part.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.table({
                "key": keys, "caption": captions,
                "image": pa.array([jpeg] * rows_per_file, pa.binary()),
                "fine_id": rng.integers(1024, size=rows_per_file).astype(np.int32),
                "random_id": rng.integers(PARTITIONS, size=rows_per_file).astype(np.int32)}),
                part / f"part-{i:05d}.parquet")
        folders[count] = str(folder)
    return {"folders": folders}


# ----------------------------------------------------------------------------- memory
def _status(pid: int | str) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.split(":", 1) for line in f if ":" in line)


def _mb(status: dict[str, str], field: str) -> float:
    return int(status.get(field, "0 kB").split()[0]) / 1024


class MemoryProbe(threading.Thread):
    """The peak memory of the driver and of the largest Ray worker, per window (a stage)."""

    def __init__(self, every: float = 0.2) -> None:
        super().__init__(daemon=True, name="scale-memory")
        self.every, self.stop = every, threading.Event()
        self.lock = threading.Lock()
        self.window: dict | None = None
        self.reset_refused = 0      # processes whose peak could not be reset (counted, reported)
        self.titles: dict[int, str] = {}    # each worker's latest task: an idle one says "IDLE"

    def begin(self) -> None:
        """Reset every peak and open a window."""
        for pid in ["self", *descendants()]:
            try:
                with open(f"/proc/{pid}/clear_refs", "w") as f:
                    f.write("5")        # 5: reset the peak resident set to the current one
            except FileNotFoundError:   # ended meanwhile
                continue
            except OSError:
                self.reset_refused += 1
        with self.lock:
            self.window = {"driver_mb": 0.0, "worker_mb": 0.0, "worker_private_mb": 0.0,
                           "worker": "", "worker_private": ""}
        self.poll()

    def end(self) -> dict:
        self.poll()
        with self.lock:
            window, self.window = self.window, None
        return {k: round(v) if isinstance(v, float) else v for k, v in window.items()}

    def poll(self) -> None:
        seen = []
        for pid in descendants():
            try:
                status = _status(pid)
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    title = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                continue
            if title.startswith("ray::"):
                if title != "ray::IDLE":
                    self.titles[pid] = title
                seen.append((_mb(status, "VmHWM"), _mb(status, "RssAnon"),
                             self.titles.get(pid, title)))
        driver = _mb(_status("self"), "VmHWM")
        with self.lock:
            w = self.window
            if w is None:
                return
            w["driver_mb"] = max(w["driver_mb"], driver)
            for hwm, anon, title in seen:
                if hwm > w["worker_mb"]:
                    w["worker_mb"], w["worker"] = hwm, title[:60]
                if anon > w["worker_private_mb"]:
                    w["worker_private_mb"], w["worker_private"] = anon, title[:60]

    def run(self) -> None:
        while not self.stop.wait(self.every):
            self.poll()


def start_ray(overrides: list[str], cpus: int):
    """A local Ray as the jobs start one (``pipeline.core.raycluster.init_ray``: one parquet
    footer actor per read, quiet logs), with the config's object store; the config."""
    from pipeline.core.config import load_config
    from pipeline.core.raycluster import init_ray

    cfg = load_config(None, overrides)
    init_ray(cfg.ray, num_cpus=cpus)
    return cfg


# ----------------------------------------------------------------------------- measurements
def measure_stages(n: int, folder: Path, overrides: list[str], cpus: int) -> dict:
    """The four stages over the world ``write_world`` made in ``folder``, timed, with peaks."""
    import ray

    from pipeline.core.rundir import RunDir
    from pipeline.core.stages import run_stage

    probe = MemoryProbe()
    probe.start()
    cfg = start_ray(overrides, cpus)
    run = RunDir(str(folder / "run"), cfg.storage)
    stages = {}
    for stage in STAGES:
        external = {"source": str(folder / "source")} if stage == "embeddings" else {}
        probe.begin()
        t0 = time.perf_counter()
        manifest = run_stage(stage, cfg, run, force=True,
                             log=lambda line: print("    " + line, flush=True), **external)
        seconds = time.perf_counter() - t0
        counted = manifest["rows_in"] if stage == "clusters" else manifest["rows_out"]
        if counted != n:
            raise RuntimeError(f"{stage} counted {counted:,} rows, not the {n:,} written")
        stages[stage] = {"seconds": seconds, **probe.end()}
        if stage == "clusters":
            parts = manifest["stats"]["seconds"]
            stages[stage]["parts"] = {"sample pass": parts["sample"],
                                      "fit": parts["total"] - parts["sample"],
                                      "fit_rows": manifest["stats"]["fit_rows"]}
    ray.shutdown()
    probe.stop.set()
    return {"n": n, "stages": stages, "reset_refused": probe.reset_refused,
            "driver_peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def _first_batch(make, batch_size: int, shuffle_buffer: int, seed: int) -> tuple[float, float]:
    """(seconds to build the dataset, seconds to its first batch) of one read, batched as the
    training loop batches a worker's shard (``pipeline.training.train_loop``)."""
    t0 = time.perf_counter()
    ds = make()
    planned = time.perf_counter()
    batches = iter(ds.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=False,
                                   local_shuffle_buffer_size=shuffle_buffer or None,
                                   local_shuffle_seed=seed if shuffle_buffer else None))
    batch = next(batches)
    done = time.perf_counter()
    batches.close()     # ends the read's execution before the next one starts
    if len(batch["key"]) != batch_size:
        raise RuntimeError(f"the first batch holds {len(batch['key'])} rows, not {batch_size}")
    return planned - t0, done - t0


def measure_first_batch(folders: dict[int, str], overrides: list[str], repeats: int,
                        cpus: int) -> dict:
    """Time to the first batch of each folder with both readers, medians over ``repeats``."""
    import fsspec

    from pipeline.core.tables import read_by_expert, read_mixed

    train = start_ray(overrides, cpus).train
    batch = train.batch_size // train.num_workers      # one worker's batch
    fs = fsspec.filesystem("file")
    readers = {
        "read_mixed": lambda path: read_mixed(fs, path, seed=0, cpus=train.data_cpus),
        "read_by_expert": lambda path: read_by_expert(fs, path, "", None, None, train.data_cpus),
    }
    counts = sorted(folders)
    for make in readers.values():   # warm-up: worker processes, imports
        _first_batch(lambda make=make: make(folders[counts[0]]), batch, train.shuffle_buffer, 0)
    trials: dict[str, dict[int, list]] = {r: {c: [] for c in counts} for r in readers}
    for rep in range(repeats):
        for count in counts if rep % 2 == 0 else counts[::-1]:
            for name, make in readers.items():
                trials[name][count].append(_first_batch(
                    lambda make=make, count=count: make(folders[count]), batch,
                    train.shuffle_buffer, rep))
    out = {"shuffle_buffer": train.shuffle_buffer, "batch": batch, "data_cpus": train.data_cpus,
           "readers": {}}
    for name, by_count in trials.items():
        out["readers"][name] = {str(c): {
            "plan_s": statistics.median(t[0] for t in ts),
            "first_batch_s": statistics.median(t[1] for t in ts),
            "trials": [[round(a, 3), round(b, 3)] for a, b in ts]} for c, ts in by_count.items()}
    return out


# ----------------------------------------------------------------------------- the parent
def child(kind: str, payload: dict, log_dir: Path) -> dict:
    """Run this file as a child process doing ``kind``; its RESULT. Its output lines are echoed
    as they come; its stderr (Ray's own logs) goes to a file, whose end is shown if it fails."""
    err_path = log_dir / f"{kind}-{len(list(log_dir.glob(kind + '-*')))}.stderr"
    # a private local Ray always (never a cluster RAY_ADDRESS names); the encoder offline
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"HF_HUB_OFFLINE": "1"}
    with open(err_path, "w") as err:
        proc = subprocess.Popen([sys.executable, __file__, "--child", kind, json.dumps(payload)],
                                stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        result = None
        for line in proc.stdout:
            if line.startswith(RESULT):
                result = json.loads(line[len(RESULT):])
            else:
                print(line, end="", flush=True)
        code = proc.wait()
    if code != 0 or result is None:
        tail = err_path.read_text().splitlines()[-40:]
        raise RuntimeError(f"{kind} {payload} failed (exit {code}); the end of its stderr:\n"
                           + "\n".join(tail))
    return result


def run_child(kind: str, payload: dict) -> dict:
    if kind == "write-world":
        return write_world(payload["n"], Path(payload["folder"]), payload["overrides"])
    if kind == "stages":
        return measure_stages(payload["n"], Path(payload["folder"]), payload["overrides"],
                              payload["cpus"])
    if kind == "write-files":
        return write_file_folders(payload["counts"], payload["rows_per_file"],
                                  Path(payload["root"]))
    if kind == "first-batch":
        return measure_first_batch({int(c): p for c, p in payload["folders"].items()},
                                   payload["overrides"], payload["repeats"], payload["cpus"])
    raise ValueError(f"unknown child {kind!r}")


def _verdict(ratio: float, what_up: str, what_down: str | None = None) -> str:
    if ratio > 1 + TOLERANCE:
        return f"FAIL ({what_up})"
    if what_down is not None and ratio < 1 - TOLERANCE:
        return f"FAIL ({what_down})"
    return "PASS"


def stage_rows(results: list[dict]) -> list[tuple]:
    """The stage table's rows: every size's stages, clusters' two parts after it."""
    rows = []
    first = results[0]
    for i, r in enumerate(results):
        n, before = r["n"], results[i - 1] if i else None
        for stage in STAGES:
            s = r["stages"][stage]
            items = [(stage, s["seconds"], first["stages"][stage]["seconds"],
                      before["stages"][stage]["seconds"] if before else None, s)]
            if "parts" in s:
                items += [(f"  {stage}: {part}", s["parts"][part], first["stages"][stage]["parts"][part],
                           before["stages"][stage]["parts"][part] if before else None, None)
                          for part in ("sample pass", "fit")]
            for label, seconds, base, prev, mem in items:
                us = seconds / n * 1e6
                marginal = "" if prev is None else f"{(seconds - prev) / (n - before['n']) * 1e6:.2f}"
                rows.append((f"{n:,}", label, f"{seconds:.1f}", f"{us:.2f}",
                             f"{us / (base / first['n'] * 1e6):.2f}", marginal,
                             mem["driver_mb"] if mem else "",
                             f"{mem['worker_mb']} / {mem['worker_private_mb']}" if mem else ""))
    return rows


def goals(results: list[dict], first_batch: dict | None) -> list[str]:
    lines = []
    small, large = results[0], results[-1]
    for stage in STAGES:
        per_row = [r["stages"][stage]["seconds"] / r["n"] for r in results]
        ratios = [p / per_row[0] for p in per_row]
        worst = max(ratios, key=lambda x: abs(x - 1))
        seconds = [r["stages"][stage]["seconds"] for r in results]
        marginal = [(seconds[i] - seconds[i - 1]) / (results[i]["n"] - results[i - 1]["n"]) * 1e6
                    for i in range(1, len(results))]
        lines.append(f"{_verdict(worst, 'grows: super-linear', 'falls: a fixed cost')}  "
                     f"{stage}: time per row at each size over the smallest's "
                     f"{', '.join(f'{x:.2f}' for x in ratios)} (within {TOLERANCE:.0%}); "
                     f"marginal us/row {', '.join(f'{m:.2f}' for m in marginal) or 'n/a'}")
    ratio = large["driver_peak_mb"] / small["driver_peak_mb"]
    lines.append(f"{_verdict(ratio, 'the driver grows with N')}  driver peak memory "
                 f"{small['driver_peak_mb']} MB at {small['n']:,} rows, {large['driver_peak_mb']} MB "
                 f"at {large['n']:,}: {ratio:.2f} (flat: at most {1 + TOLERANCE:.2f})")
    if first_batch is not None:
        for name, by_count in first_batch["readers"].items():
            counts = sorted(by_count, key=int)
            base = by_count[counts[0]]["first_batch_s"]
            worst = max(by_count[c]["first_batch_s"] / base for c in counts)
            lines.append(f"{_verdict(worst, 'grows with the files')}  {name}: time to the first "
                         f"batch at {counts[-1]} files over {counts[0]} files, at most "
                         f"{worst:.2f} (at most {1 + TOLERANCE:.2f})")
    return lines


def first_batch_rows(first_batch: dict) -> list[tuple]:
    rows = []
    for name, by_count in first_batch["readers"].items():
        counts = sorted(by_count, key=int)
        base = by_count[counts[0]]
        for c in counts:
            t = by_count[c]
            rows.append((name, c, f"{t['plan_s']:.2f}", f"{t['first_batch_s']:.2f}",
                         f"{t['first_batch_s'] / base['first_batch_s']:.2f}"))
    return rows


def machine() -> dict:
    def commit() -> str:
        try:
            head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                  text=True, cwd=Path(__file__).parent, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, cwd=Path(__file__).parent).stdout
        return head + ("+changes" if dirty.strip() else "")

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"commit": commit(), "cpu": cpu, "cpus": os.cpu_count(),
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
            "python": platform.python_version()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="250000,1000000,4000000",
                   help="rows of each size, comma-separated (default: %(default)s)")
    p.add_argument("--files", default="100,400,1600",
                   help="file counts of the first-batch reads (default: %(default)s; '' skips them)")
    p.add_argument("--file-rows", type=int, default=500, help="rows per file of those reads")
    p.add_argument("--repeats", type=int, default=5, help="reads per file count and reader")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="a config override on top of the bench's own (repeatable)")
    p.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs of each local Ray")
    p.add_argument("--object-store-mb", type=int, default=2048,
                   help="object store of each local Ray (MB; the stages spill beyond it)")
    p.add_argument("--work", default=None,
                   help="folder for the data (a temporary folder inside it, removed at the end)")
    p.add_argument("--out", default=None, help="write every figure as JSON here")
    p.add_argument("--child", nargs=2, metavar=("KIND", "JSON"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Measure as the module docstring says; print the tables and the goals."""
    args = parse_args(argv)
    if args.child:
        result = run_child(args.child[0], json.loads(args.child[1]))
        print(RESULT + json.dumps(result), flush=True)
        return 0
    from pipeline.core.config import load_config  # late import: only to check the overrides

    sizes = sorted(int(s) for s in args.sizes.split(","))
    counts = sorted(int(c) for c in args.files.split(",") if c.strip())
    overrides = [*OVERRIDES, *args.set]
    cfg = load_config(None, overrides)
    if cfg.cluster.fine_k > min(sizes):
        raise SystemExit(f"cluster.fine_k={cfg.cluster.fine_k} exceeds the smallest size "
                         f"{min(sizes):,}: add --set cluster.fine_k=<at most that>")
    ray_args = {"cpus": args.cpus,
                "overrides": [*overrides, f"ray.object_store_memory={args.object_store_mb * 2**20}"]}
    report: dict = {"machine": machine(), "overrides": overrides, "cpus": args.cpus,
                    "object_store_mb": args.object_store_mb, "sizes": [], "writes": []}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-scale-", dir=args.work) as tmp:
        root = Path(tmp).resolve()
        logs = root / "logs"
        logs.mkdir()
        for n in sizes:
            folder = root / f"n{n}"
            print(f"scale: {n:,} rows: writing the shards, the embeddings and ingest/", flush=True)
            report["writes"].append(child("write-world", {"n": n, "folder": str(folder),
                                                          "overrides": overrides}, logs))
            print(f"scale: {n:,} rows: the stages (a process and a Ray of their own)", flush=True)
            report["sizes"].append(child("stages", {"n": n, "folder": str(folder), **ray_args},
                                         logs))
            shutil.rmtree(folder)
        first_batch = None
        if counts:
            print(f"scale: first batches from {', '.join(map(str, counts))} files", flush=True)
            written = child("write-files", {"counts": counts, "rows_per_file": args.file_rows,
                                            "root": str(root)}, logs)
            first_batch = child("first-batch", {"folders": written["folders"],
                                                "repeats": args.repeats, **ray_args}, logs)
            first_batch["rows_per_file"] = args.file_rows
            report["first_batch"] = first_batch
    report["wall_s"] = round(time.perf_counter() - t_start)

    results = report["sizes"]
    print(f"\n## The stages against N ({args.cpus} CPUs, object store {args.object_store_mb} MB, "
          f"commit {report['machine']['commit']})\n")
    print(markdown_table(("rows", "stage", "s", "us/row", "x smallest", "marginal us/row",
                          "driver MB", "worker MB (RSS / private)"), stage_rows(results)))
    print("\nDriver peak over its whole process: " + ", ".join(
        f"{r['driver_peak_mb']} MB at {r['n']:,} rows" for r in results))
    print(f"Largest private worker per stage at {results[-1]['n']:,} rows: " + "; ".join(
        f"{stage} {s['worker_private'] or 'none'}" for stage, s in results[-1]["stages"].items()))
    fit = results[-1]["stages"]["clusters"]["parts"]["fit_rows"]
    print(f"Config: the library defaults with {', '.join(overrides)}; the clusters' fit sample "
          f"holds {fit:,} rows at {results[-1]['n']:,}.")
    if first_batch is not None:
        print(f"\n## Time to the first batch against the files read ({args.file_rows} rows a "
              f"file, {PARTITIONS} partitions, batch {first_batch['batch']}, shuffle buffer "
              f"{first_batch['shuffle_buffer']:,}; median of {args.repeats})\n")
        print(markdown_table(("reader", "files", "plan s", "first batch s", "x smallest"),
                             first_batch_rows(first_batch)))
    report["goals"] = goals(results, first_batch)
    print("\n## Goals\n")
    print("\n".join(report["goals"]))
    if any(r["reset_refused"] for r in results):
        print("note: some processes refused a reset of their peak memory; their figures may "
              "hold an earlier stage's peak")
    print(f"\nwall time {report['wall_s']} s")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
