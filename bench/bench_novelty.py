"""How well novelty (pipeline/grow/growth.py) finds a new domain, side by side
with the reference rule it replaced (per-centre thresholds from the balanced assignment's own
distances, read from ``assignments/``).

A demo world of BENCH_NOVELTY_SAMPLES training pairs (default 3,000) is ingested, embedded,
clustered into BENCH_NOVELTY_K fine centres (default 32) and 4 experts, and assigned. Two new
sets of 800 pairs are drawn with other world seeds: half known domains and half arrows in the
same shards ("mixed"), and known domains only ("known"). Both go through the generation's
ingest, embeddings and novelty stages. Printed per set and rule: samples flagged novel, and
against truth.parquet (a pair belongs to the domain of its caption) the precision and recall of
"novel" for arrows. The world and the embeddings are deterministic; the balanced assignment
is not quite (row order), so a rerun can move a count by one or two. About 2 minutes on 2 cores.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pandas as pd
from benchlib import print_table

from pipeline.core import stages
from pipeline.core.config import DemoConfig, load_config
from pipeline.core.raycluster import init_ray
from pipeline.core.rundir import RunDir
from pipeline.data.demo_world import DOMAIN_SHARES, generate, generate_web

SAMPLES = int(os.environ.get("BENCH_NOVELTY_SAMPLES", 3000))
K = int(os.environ.get("BENCH_NOVELTY_K", 32))
SETS = {"mixed": ({**{d: s / 2 for d, s in DOMAIN_SHARES.items()}, "arrows": 0.5}, 12),
        "known": (DOMAIN_SHARES, 11)}


def scores(novel: np.ndarray, arrows: np.ndarray) -> tuple[str, str, str]:
    hit = int((novel & arrows).sum())
    precision = f"{hit / novel.sum():.2f}" if novel.sum() and arrows.sum() else "-"
    recall = f"{hit / arrows.sum():.2f}" if arrows.sum() else "-"
    return f"{int(novel.sum())} of {len(novel)}", precision, recall


def main() -> int:
    cfg = load_config("demo", [f"cluster.fine_k={K}", "cluster.restarts=1"])
    print(init_ray(cfg.ray))
    quiet = {"log": lambda *_: None}
    with tempfile.TemporaryDirectory() as tmp:
        generate(f"{tmp}/data", DemoConfig(samples=SAMPLES, samples_per_shard=500,
                                           new_domain_samples=0, eval_per_class=1, seed=3),
                 cfg.storage, **quiet)
        run = RunDir(f"{tmp}/run", cfg.storage)
        run.write_config(cfg)
        stages.run_stage("ingest", cfg, run, data=f"{tmp}/data/train", **quiet)
        for stage in ("embeddings", "clusters", "assignments"):
            stages.run_stage(stage, cfg, run, **quiet)
        assigned = pd.read_parquet(run.stage_path("assignments"), columns=["fine_id", "distance"])
        reference = assigned.groupby("fine_id")["distance"].quantile(cfg.grow.novelty_quantile)
        rows = []
        for name, (domains, seed) in SETS.items():
            generate_web(f"{tmp}/{name}", DemoConfig(samples=800, samples_per_shard=400),
                         cfg.storage, domains, seed, **quiet)
            unit = lambda stage, n=name: stages.gen_unit(n, stage)  # noqa: E731
            stages.run_stage(unit("ingest"), cfg, run, data=f"{tmp}/{name}", key_prefix=f"{name}/", **quiet)
            stages.run_stage(unit("embeddings"), cfg, run, **quiet)
            stages.run_stage(unit("novelty"), cfg, run, **quiet)
            truth = pd.read_parquet(f"{tmp}/{name}/truth.parquet")
            truth["key"] = f"{name}/" + truth["key"]
            flags = pd.read_parquet(run.generation(name).stage_path("novelty/samples")).merge(truth, on="key")
            arrows = (flags["caption_domain"] == "arrows").to_numpy()
            old_rule = flags["distance"].to_numpy() > reference.reindex(flags["fine_id"]).to_numpy()
            rows.append((name, "nearest-centre thresholds (pipeline)",
                         *scores(flags["novel"].to_numpy(), arrows)))
            rows.append((name, "assignments/ distances (reference)", *scores(old_rule, arrows)))
    print(f"\nnovelty on a {SAMPLES:,}-sample demo world, {K} fine centres, quantile "
          f"{cfg.grow.novelty_quantile}")
    print_table(("new set", "thresholds", "novel", "arrows precision", "arrows recall"), rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
