"""Memory at scale. N synthetic captions through the embeddings,
clusters (K = 1,024) and assignments stages, at N/2 and at N, each size in a process of its own
with its own local Ray; the peak memory of the driver and of every Ray process, against N.

What runs is the stages themselves (``pipeline.core.stages.run_stage``: manifests, counters, Ray Data,
the distributed k-means), on the demo preset with the clustering of the library defaults (fit on
a sample of 256 rows per centre, one restart) and a tiny encoder (``open_clip:mode-tiny``, random
weights: 64-d; the memory of the stream does not depend on the weights). Only the shards are
skipped: ``ingest/`` is written directly (key, caption, shard, pos), under a manifest like the
stage's own, since the soak is about the stages after it.

Captions: ``N / ROWS_PER_CAPTION`` distinct ones (default 8 rows each on average, drawn uniformly),
as web captions repeat; the encoder's de-duplication is what makes 2 M rows take minutes rather
than hours on 2 cores (the tokenizer alone does about 5,000 captions/s here), and its LRU cache
(embed.cache_size) is part of the memory measured.

Memory, read from /proc (Linux):
- the driver: its peak resident set (``ru_maxrss``) after each stage;
- every process below the driver (Ray's GCS, raylet, workers and actors): the peak resident set
  the kernel recorded for it (``VmHWM``), and the largest private (anonymous) part sampled every
  0.2 s (``RssAnon``). A worker's resident set also counts the object-store pages it mapped
  (shared memory, counted again in every process that maps them): the private part is what each
  process costs on its own.

Prints one table and the driver's ratio at N against N/2, with the target "flat" (at most 1.10):
the driver must not hold the dataset. Exits non-zero only if something crashes. Sizes:
BENCH_SOAK_N (default 2,000,000), BENCH_SOAK_ROWS_PER_CAPTION (8), BENCH_SOAK_K (1,024),
BENCH_SOAK_OBJECT_STORE_MB (1,024: the object store each size's Ray gets).

``--encoder-only`` runs the same captions through ``CaptionEncoder`` alone, each size in a process
of its own without Ray, in the embed stage's calls (embed.rows_per_call rows each): the
process's RSS after loading the model, at the end, and with the caption cache emptied and
glibc's ``malloc_trim``; the cache's and the tokenizer's word cache's sizes. It splits the
embedding actor's memory into the encoder's and the Ray actor's around it (docs/benchmarks.md, "Memory at scale").
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchlib import descendants

N = int(os.environ.get("BENCH_SOAK_N", 2_000_000))
ROWS_PER_CAPTION = int(os.environ.get("BENCH_SOAK_ROWS_PER_CAPTION", 8))
K = int(os.environ.get("BENCH_SOAK_K", 1024))
OBJECT_STORE_MB = int(os.environ.get("BENCH_SOAK_OBJECT_STORE_MB", 1024))
FLAT = 1.10
ROWS_PER_FILE = 100_000
# The clustering of the laion preset and of the library defaults: a 256-rows-per-centre sample
# for the fit (the demo preset fits on every row), one restart, capacity slack 0.003.
OVERRIDES = [f"cluster.fine_k={K}", "cluster.num_experts=8", "cluster.sample_per_centre=256",
             "cluster.restarts=1", "cluster.capacity_slack=0.003", "embed.model=open_clip:mode-tiny",
             "embed.batch_size=1024", "embed.rows_per_call=8192", "embed.num_cpus_per_actor=1"]
STAGES = ("embeddings", "clusters", "assignments")

WORDS = {
    "adj": "red small vintage wooden modern tiny golden rustic bright old shiny frozen handmade "
           "colorful empty quiet busy foggy sunny broken ancient striped".split(),
    "noun": "dog cat bicycle house guitar mountain lake car bridge cake chair lamp tree boat "
            "castle train flower robot camera teapot".split(),
    "place": ["on a beach", "in a city street", "on the kitchen table", "in a snowy field",
              "in an old barn", "at a market stall", "by a rainy window", "on the forest floor",
              "on a museum shelf", "along a garden path"],
}


def captions(n: int, seed: int) -> list[str]:
    """n distinct captions: a few words and a number, seeded."""
    import numpy as np

    rng = np.random.default_rng(seed)
    picks = {k: rng.integers(len(v), size=n) for k, v in WORDS.items()}
    adj, noun, place = WORDS["adj"], WORDS["noun"], WORDS["place"]
    return [f"a {adj[a]} {noun[b]} {place[c]}, photo {i}"
            for i, (a, b, c) in enumerate(zip(picks["adj"], picks["noun"], picks["place"],
                                              strict=True))]


class Sampler(threading.Thread):
    """Peak memory of every process below this one, polled until stopped."""

    def __init__(self, every: float = 0.2) -> None:
        super().__init__(daemon=True, name="soak-sampler")
        self.every, self.stop = every, threading.Event()
        self.seen: dict[int, dict] = {}

    def poll(self) -> None:
        for pid in descendants():
            try:
                with open(f"/proc/{pid}/status") as f:
                    status = dict(line.split(":", 1) for line in f if ":" in line)
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    title = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                continue
            hwm = int(status.get("VmHWM", "0 kB").split()[0]) / 1024
            anon = int(status.get("RssAnon", "0 kB").split()[0]) / 1024
            rec = self.seen.setdefault(pid, {"hwm_mb": 0.0, "anon_mb": 0.0, "title": title})
            rec["hwm_mb"] = max(rec["hwm_mb"], hwm)
            if anon > rec["anon_mb"]:
                rec["anon_mb"], rec["title"] = anon, title

    def run(self) -> None:
        while not self.stop.wait(self.every):
            self.poll()


def _kind(title: str) -> str:
    if "gcs_server" in title:
        return "GCS"
    if "raylet" in title:
        return "raylet"
    if "_EmbedBatches" in title:
        return "embedding actor"
    if title.startswith("ray::"):
        return "other worker"
    return "other Ray process"


def driver_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024     # KiB on Linux


def one_size(n: int, out: Path) -> dict:
    """Run the three stages over n rows in this process; what it measured."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray
    from ray.data import DataContext

    from pipeline.core.config import load_config
    from pipeline.core.rundir import RunDir, StageOutput
    from pipeline.core.stages import StageRun, run_stage

    sampler = Sampler()
    sampler.start()
    ray.init(address="local", num_cpus=2, object_store_memory=OBJECT_STORE_MB * 1024**2,
             include_dashboard=False, log_to_driver=False)
    DataContext.get_current().enable_progress_bars = False
    cfg = load_config("demo", OVERRIDES)
    run = RunDir(str(out / "run"), cfg.storage)
    result = {"n": n, "driver_mb": {"start": round(driver_mb())}, "wall_s": {}}

    t0 = time.perf_counter()
    distinct = captions(max(1, n // ROWS_PER_CAPTION), seed=n)
    which = np.random.default_rng(0).integers(len(distinct), size=n)
    sr = StageRun("ingest", cfg, run, {"data": f"synthetic: {n} rows, {len(distinct)} captions"})
    started = sr.begin()
    folder = Path(run.stage_path("ingest", "samples"))
    folder.mkdir(parents=True, exist_ok=True)
    for f, lo in enumerate(range(0, n, ROWS_PER_FILE)):
        hi = min(n, lo + ROWS_PER_FILE)
        pq.write_table(pa.table({
            "key": [f"{i:09d}" for i in range(lo, hi)],
            "caption": [distinct[j] for j in which[lo:hi]],
            "shard": ["synthetic"] * (hi - lo), "pos": np.arange(lo, hi, dtype=np.int64)}),
            folder / f"{f:05d}.parquet")
    del distinct, which
    sr.finish(StageOutput(n, n, {}, {}), started)
    result["wall_s"]["ingest (written directly)"] = round(time.perf_counter() - t0, 1)
    result["driver_mb"]["ingest (written directly)"] = round(driver_mb())

    for stage in STAGES:
        t0 = time.perf_counter()
        manifest = run_stage(stage, cfg, run, log=lambda line: print("  " + line, flush=True))
        assert manifest["rows_out"] == n or stage == "clusters", manifest
        result["wall_s"][stage] = round(time.perf_counter() - t0, 1)
        result["driver_mb"][stage] = round(driver_mb())
    result["embeddings_mb_on_disk"] = round(sum(
        p.stat().st_size for p in Path(run.stage_path("embeddings")).rglob("*.parquet")) / 1e6)
    sampler.poll()
    ray.shutdown()
    sampler.stop.set()
    by_kind: dict[str, dict] = {}
    for rec in sampler.seen.values():
        kind = _kind(rec["title"])
        best = by_kind.setdefault(kind, {"hwm_mb": 0.0, "anon_mb": 0.0, "title": ""})
        best["hwm_mb"] = round(max(best["hwm_mb"], rec["hwm_mb"]))
        if rec["anon_mb"] > best["anon_mb"]:
            best["anon_mb"], best["title"] = round(rec["anon_mb"]), rec["title"][:60]
    result["processes"] = by_kind
    return result


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS:")).split()[1]) / 1024


def encoder_only(n: int) -> dict:
    """The embed stage's encoder over n rows, in this process, no Ray: its memory."""
    import ctypes
    import gc

    import numpy as np

    from pipeline.core.config import load_config
    from pipeline.data.encoders import CaptionEncoder, release_free_memory

    cfg = load_config("demo", OVERRIDES).embed
    encoder = CaptionEncoder(cfg.model, batch_size=cfg.batch_size, cache_size=cfg.cache_size)
    out = {"n": n, "rss_mb": {"model loaded": round(rss_mb())}}
    distinct = captions(max(1, n // ROWS_PER_CAPTION), seed=n)
    which = np.random.default_rng(0).integers(len(distinct), size=n)
    for lo in range(0, n, cfg.rows_per_call):      # as the embed stage's actor calls it
        encoder.encode([distinct[j] for j in which[lo:lo + cfg.rows_per_call]])
        release_free_memory()
    del distinct, which
    gc.collect()
    out["rss_mb"]["at the end"] = round(rss_mb())
    out["cached"], out["encoded"] = len(encoder._cache), encoder.encoded
    out["tokenizer_words"] = len(getattr(encoder._backend.tokenizer, "cache", ()))
    encoder._cache.clear()
    encoder._vectors = None
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    out["rss_mb"]["cache emptied, malloc_trim"] = round(rss_mb())
    return out


def _sizes(flag: str, env: dict) -> list[dict] | None:
    """Run this file with ``flag`` for N/2 and N, each in its own process (and, for the stages,
    its own run directory); their results."""
    results = []
    for n in (N // 2, N):
        print(f"soak: {n:,} rows (its own process)", flush=True)
        with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
            extra = [tmp] if flag == "--one" else []
            proc = subprocess.run([sys.executable, __file__, flag, str(n), *extra], env=env,
                                  stdout=subprocess.PIPE, text=True)
        lines = proc.stdout.splitlines()
        print("\n".join(line for line in lines if not line.startswith("RESULT ")))
        if proc.returncode != 0:
            print(f"soak at {n:,} rows failed (exit {proc.returncode})")
            return None
        results.append(json.loads(next(line for line in lines
                                       if line.startswith("RESULT "))[len("RESULT "):]))
    return results


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--one":
        print("RESULT " + json.dumps(one_size(int(sys.argv[2]), Path(sys.argv[3]))), flush=True)
        return 0
    if len(sys.argv) == 3 and sys.argv[1] == "--one-encoder":
        print("RESULT " + json.dumps(encoder_only(int(sys.argv[2]))), flush=True)
        return 0
    from benchlib import print_table

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if sys.argv[1:] == ["--encoder-only"]:
        results = _sizes("--one-encoder", env)
        if results is None:
            return 1
        half, full = results
        rows = [(f"RSS {what}", half["rss_mb"][what], full["rss_mb"][what],
                 f"{full['rss_mb'][what] / half['rss_mb'][what]:.2f}") for what in half["rss_mb"]]
        rows += [(what, half[key], full[key], "") for what, key in (
            ("captions cached", "cached"), ("captions through the model", "encoded"),
            ("tokenizer word cache", "tokenizer_words"))]
        print_table(("CaptionEncoder alone (MB)", f"N={half['n']:,}", f"N={full['n']:,}", "ratio"),
                    rows)
        return 0
    results = _sizes("--one", env)
    if results is None:
        return 1
    half, full = results
    rows = []
    for what in ["start", "ingest (written directly)", *STAGES]:
        rows.append((f"driver peak RSS after {what}", half["driver_mb"][what],
                     full["driver_mb"][what],
                     f"{full['driver_mb'][what] / half['driver_mb'][what]:.2f}"))
    for kind in ("embedding actor", "other worker", "raylet", "GCS"):
        if kind in half["processes"] and kind in full["processes"]:
            for field, label in (("hwm_mb", "peak RSS"), ("anon_mb", "peak private RSS")):
                a, b = half["processes"][kind][field], full["processes"][kind][field]
                rows.append((f"largest {kind}: {label}", a, b, f"{b / max(a, 1):.2f}"))
    rows.append(("embeddings on disk (MB)", half["embeddings_mb_on_disk"],
                 full["embeddings_mb_on_disk"],
                 f"{full['embeddings_mb_on_disk'] / max(half['embeddings_mb_on_disk'], 1):.2f}"))
    for stage in ["ingest (written directly)", *STAGES]:
        rows.append((f"wall s: {stage}", half["wall_s"][stage], full["wall_s"][stage],
                     f"{full['wall_s'][stage] / max(half['wall_s'][stage], 0.1):.2f}"))
    print_table(("MB unless said", f"N={half['n']:,}", f"N={full['n']:,}", "ratio"), rows)
    ratio = full["driver_mb"]["assignments"] / half["driver_mb"]["assignments"]
    print(f"\ndriver peak at N={full['n']:,} / at N={half['n']:,}: {ratio:.2f} "
          f"(target: flat, <= {FLAT}): {'PASS' if ratio <= FLAT else 'MISS'}")
    print(f"largest other worker at N={full['n']:,}: {full['processes']['other worker']['title']}")
    print(f"object store per size: {OBJECT_STORE_MB} MB; K={K}; "
          f"{ROWS_PER_CAPTION} rows per distinct caption on average")
    return 0


if __name__ == "__main__":
    sys.exit(main())
