"""Throughput of the Ray Data embed stage against the bare encoder.

The same distinct generated captions go through ``CaptionEncoder.encode`` in this process (the
bare encoder, model loaded and warmed up) and through ``pipeline.data.embeddings.embed_dataset`` on a
private local Ray, with the same model and batch size and the same torch thread count on both
sides: Ray gives an actor with ``num_cpus_per_actor = t`` OMP_NUM_THREADS = t (a task with the
same CPUs reports what torch sees), and the driver calls ``torch.set_num_threads(t)``.

The stage runs to the end (``iter_internal_ref_bundles`` executes the whole Dataset, as
``materialize`` does) and the arrival of each output block is timed. The actor's one-off start
(worker process, imports, model load) all happens before its first block comes out, so the
throughput compared is the rows after the first block over the time after it. Shown beside it:
the whole run, start included, and the bare encoder called once per block as the actor calls it
(sentence-transformers sorts captions by length within a call, so smaller calls pad more), whose
ratio is the cost of Ray alone. Each side runs REPEATS times, alternating, and the fastest counts
(other work on the machine only ever slows a run down). Prints one table with the 0.85 target and
PASS/MISS; exits non-zero only if something crashes. Override with BENCH_EMBED_N,
BENCH_EMBED_BATCH, BENCH_EMBED_THREADS (e.g. "2,1"), BENCH_EMBED_REPEATS.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pandas as pd
import ray
import ray.data
from benchlib import print_table, tree_cpu_seconds

from pipeline.core.config import EmbedConfig
from pipeline.core.tables import embedding_matrix
from pipeline.data.embeddings import embed_dataset
from pipeline.data.encoders import CaptionEncoder

N = int(os.environ.get("BENCH_EMBED_N", 16_384))
BATCH = int(os.environ.get("BENCH_EMBED_BATCH", 256))
THREADS = [int(t) for t in os.environ.get("BENCH_EMBED_THREADS", "2").split(",")]
REPEATS = int(os.environ.get("BENCH_EMBED_REPEATS", 2))
MODEL = "minilm-offline"
ROWS_PER_BLOCK = 2_048          # the stage streams several blocks, as it does reading shards
ROWS_PER_CALL = EmbedConfig().rows_per_call
TARGET = 0.85

ADJECTIVES = ("red small vintage wooden modern tiny golden rustic bright old shiny frozen "
              "handmade colorful empty quiet busy foggy sunny broken ancient").split()
NOUNS = ("dog cat bicycle house guitar mountain lake car bridge cake chair lamp tree boat castle "
         "train flower robot camera teapot").split()
RELATIONS = ("sitting on", "standing near", "parked by", "floating above", "hidden behind",
             "leaning against", "resting under", "placed beside")
PLACES = ("a beach", "a city street", "the kitchen table", "a snowy field", "an old barn",
          "a market stall", "a rainy window", "the forest floor", "a museum shelf", "a garden path")


def captions(n: int, seed: int = 0) -> list[str]:
    """n distinct web-like captions of varying length (about 10 to 25 tokens), seeded."""
    rng = np.random.default_rng(seed)
    out: dict[str, None] = {}
    while len(out) < n:
        adjectives = " ".join(rng.choice(ADJECTIVES, size=rng.integers(1, 4), replace=False))
        text = (f"{adjectives} {rng.choice(NOUNS)} {rng.choice(RELATIONS)} {rng.choice(PLACES)}, "
                f"photo {int(rng.integers(1, 10_000))}")
        if rng.random() < 0.4:
            text += f" taken in {int(rng.integers(1950, 2025))} with a {rng.choice(ADJECTIVES)} lens"
        out[text] = None
    return list(out)


@ray.remote
def worker_threads() -> tuple[int, str | None]:
    """torch's thread count and OMP_NUM_THREADS in a Ray worker given the actor's CPUs."""
    import torch

    return torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")


def bare_run(encoder: CaptionEncoder, texts: list[str]) -> dict:
    cpu = time.process_time()
    t = time.perf_counter()
    emb = encoder.encode(texts)
    return {"seconds": time.perf_counter() - t, "cpu": time.process_time() - cpu, "emb": emb}


def bare_per_block_seconds(encoder: CaptionEncoder, frames: list[pd.DataFrame]) -> float:
    """The bare encoder called once per ``rows_per_call`` rows, as the stage's actor is:
    sentence-transformers sorts captions by length only within a call, so smaller calls pad
    more."""
    texts = [c for frame in frames for c in frame["caption"].tolist()]
    t = time.perf_counter()
    for start in range(0, len(texts), ROWS_PER_CALL):
        encoder.encode(texts[start:start + ROWS_PER_CALL])
    return time.perf_counter() - t


def stage_run(frames: list[pd.DataFrame], threads: int) -> dict:
    """Run the stage to the end, noting when each output block comes out of the executor."""
    cfg = EmbedConfig(model=MODEL, batch_size=BATCH, rows_per_call=ROWS_PER_CALL, num_actors=1,
                      num_cpus_per_actor=float(threads), cache_size=0)
    ds = embed_dataset(ray.data.from_pandas(frames), cfg)
    t = time.perf_counter()
    arrivals, cpu, rows, refs = [], [], [], []
    # Ref bundles, not iter_batches: the batch iterator holds a block back until the next one
    # arrives, which would bunch the arrival times at the end.
    for bundle in ds.iter_internal_ref_bundles():
        arrivals.append(time.perf_counter() - t)
        cpu.append(tree_cpu_seconds())
        rows.append(bundle.num_rows())
        refs.extend(bundle.block_refs)
    tables = ray.get(refs)
    keys = np.concatenate([tb.column("key").to_numpy(zero_copy_only=False) for tb in tables])
    return {"total": arrivals[-1], "first": arrivals[0], "rows_first": rows[0],
            "steady": arrivals[-1] - arrivals[0], "steady_cpu": cpu[-1] - cpu[0], "keys": keys,
            "emb": np.concatenate([embedding_matrix(tb) for tb in tables])}


def _seconds(values) -> str:
    return " ".join(f"{v:.1f}" for v in values)


def main() -> int:
    import torch

    wall = time.perf_counter()
    load_before = os.getloadavg()
    texts = captions(N)
    keys = [f"{i:09d}" for i in range(N)]
    frames = [pd.DataFrame({"key": keys[s:s + ROWS_PER_BLOCK], "caption": texts[s:s + ROWS_PER_BLOCK]})
              for s in range(0, N, ROWS_PER_BLOCK)]
    print(f"bench_embed: {N:,} distinct captions in {len(frames)} blocks, model {MODEL}, batch {BATCH}, "
          f"threads {THREADS}, best of {REPEATS}, {os.cpu_count()} CPUs, torch {torch.__version__}",
          flush=True)

    t = time.perf_counter()
    encoder = CaptionEncoder(MODEL, batch_size=BATCH)
    driver_start = time.perf_counter() - t
    encoder.encode(captions(BATCH, seed=1))     # first-call warm-up, as the stage's first block has

    # Ray starts its workers at nice 15; the bare baseline runs in this process at nice 0. On a
    # machine others are using, that alone would slow the Ray side, so both run at nice 0.
    os.environ["RAY_worker_niceness"] = "0"
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             object_store_memory=300 * 1024**2)
    ray.data.DataContext.get_current().enable_progress_bars = False
    results = []
    try:
        for threads in THREADS:
            torch.set_num_threads(threads)
            actor_threads, omp = ray.get(worker_threads.options(num_cpus=threads).remote())
            bare, per_block, stage = [], [], []
            for _ in range(REPEATS):
                bare.append(bare_run(encoder, texts))
                stage.append(stage_run(frames, threads))
                per_block.append(bare_per_block_seconds(encoder, frames))
            for run in stage:
                # Same rows both ways: every key once, embeddings equal up to batching round-off.
                if sorted(run["keys"]) != keys:
                    raise RuntimeError(f"stage returned {len(run['keys'])} rows, not each of the "
                                       f"{N} keys once")
            row_of = {k: i for i, k in enumerate(stage[-1]["keys"])}
            diff = float(np.abs(stage[-1]["emb"][[row_of[k] for k in keys]] - bare[-1]["emb"]).max())
            best = min(stage, key=lambda r: r["steady"] / (N - r["rows_first"]))
            results.append({"threads": threads, "actor_threads": actor_threads, "omp": omp,
                            "bare": min(bare, key=lambda r: r["seconds"]),
                            "per_block": min(per_block), "stage": best,
                            "diff": diff})
            print(f"  threads {threads}: bare encode {_seconds(r['seconds'] for r in bare)} s, per block "
                  f"{_seconds(per_block)} s; stage first block after "
                  f"{_seconds(r['first'] for r in stage)} s, all after "
                  f"{_seconds(r['total'] for r in stage)} s", flush=True)
    finally:
        ray.shutdown()

    header = ("threads driver / actor", "measure", "bare captions/s", "stage captions/s", "ratio",
              "target", "")
    table = []
    for r in results:
        st = r["stage"]
        bare_rate = N / r["bare"]["seconds"]
        steady_rate = (N - st["rows_first"]) / st["steady"]
        threads = f"{r['threads']} / {r['actor_threads']} (OMP={r['omp']})"
        ratio = steady_rate / bare_rate
        table.append((threads, "after the first block", f"{bare_rate:.0f}", f"{steady_rate:.0f}",
                      f"{ratio:.3f}", f">= {TARGET}", "PASS" if ratio >= TARGET else "MISS"))
        table.append((threads, "whole run, actor start included", f"{bare_rate:.0f}",
                      f"{N / st['total']:.0f}", f"{N / st['total'] / bare_rate:.3f}", "(info)", ""))
        per_block_rate = N / r["per_block"]
        table.append((threads, "bare called per actor call", f"{per_block_rate:.0f}",
                      f"{steady_rate:.0f}", f"{steady_rate / per_block_rate:.3f}", "(info)", ""))
        # Captions per CPU second: the stage is charged every Ray process (and this one) during
        # its steady part; the bare run only this process.
        bare_eff = N / r["bare"]["cpu"]
        stage_eff = (N - st["rows_first"]) / st["steady_cpu"]
        table.append((threads, "captions per CPU second, after 1st block", f"{bare_eff:.0f}",
                      f"{stage_eff:.0f}", f"{stage_eff / bare_eff:.3f}", "(cross-check)", ""))
    print_table(header, table)
    print()
    for r in results:
        st = r["stage"]
        print(f"threads {r['threads']}: stage's first block ({st['rows_first']} rows, includes the "
              f"actor's start: worker, imports, model load) after {st['first']:.1f} s, all {N} rows "
              f"after {st['total']:.1f} s; bare encode {r['bare']['seconds']:.1f} s; max |stage - bare| "
              f"embedding difference {r['diff']:.1e}")
    print(f"driver encoder start (imports + model load) {driver_start:.1f} s; load average before "
          f"{load_before[0]:.2f}, after {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs: above that, "
          f"other work shared them); wall time {time.perf_counter() - wall:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
