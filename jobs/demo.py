"""Run the whole pipeline on the generated demo world, on a local Ray, offline.

    python jobs/demo.py --out demo_out        # what `make demo` runs

Generates the world under <out>/data (once), then runs every stage into <out>/run and prints
what each stage produced, then the wall time of each part. Completed stages are skipped on rerun.
"""

import io
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402

from pipeline import assign, cli, cluster, demo_world, embed, evaluate, experts, ingest, shards  # noqa: E402
from pipeline.raycluster import init_ray  # noqa: E402
from pipeline.storage import filesystem, join  # noqa: E402
from pipeline.train import format_seconds  # noqa: E402


class Clock:
    """Wall time of each part of the demo, printed at the end (the 15-minute budget)."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.parts: list[tuple[str, float]] = []

    def lap(self, part: str) -> None:
        now = time.perf_counter()
        self.parts.append((part, now - self.last))
        self.last = now

    def summary(self) -> str:
        parts = ", ".join(f"{p} {format_seconds(s)}" for p, s in self.parts)
        return f"demo wall time {format_seconds(time.perf_counter() - self.start)}: {parts}"


def main(argv=None) -> int:
    p = cli.parser(__doc__, run_dir=False)
    p.add_argument("--out", default="demo_out", metavar="URI", help="where data and run go")
    p.add_argument("--skip-training", action="store_true",
                   help="stop after the clustering stages (no seed, experts or baselines)")
    args = p.parse_args(argv)
    args.run_dir = join(args.out, "run")
    cfg, run = cli.load(args)
    clock = Clock()
    data = join(args.out, "data")
    fs, path = filesystem(data, cfg.storage)
    if fs.exists(join(path, "world.json")):
        print(f"[data] demo world already at {data}: reused")
    else:
        print(f"[data] generating the demo world at {data}")
        demo_world.generate(data, cfg.demo, cfg.storage)
    print(init_ray(cfg.ray))
    clock.lap("world and ray")
    m = ingest.run_stage(cfg, run, join(data, "train"), force=args.force)
    print(f"[ingest] {m['rows_in']} samples read, {m['rows_out']} kept, skipped "
          f"{m['rows_skipped']} from {m['stats']['shards']} shards")
    clock.lap("ingest")
    m = embed.run_stage(cfg, run, join(data, "train"), force=args.force)
    print(f"[embed] {m['rows_out']} captions embedded ({m['stats']['captions_encoded']} distinct "
          f"went through {m['stats']['model']}), skipped {m['rows_skipped']}")
    clock.lap("embed")
    m = cluster.run_stage(cfg, run, force=args.force)
    print(f"[cluster] {cfg.cluster.fine_k} fine clusters -> {cfg.cluster.num_experts} experts "
          f"on {m['rows_out']} rows, objective {m['stats']['objective']:.4g}")
    m = assign.run_stage(cfg, run, force=args.force)
    sizes = m["stats"]["fine_sizes"]
    print(f"[assign] {m['rows_out']} samples assigned; fine clusters {sizes['min']}..{sizes['max']} "
          f"rows (cv {sizes['cv']:.3f}); plot: {run.stage_uri('assignments', '_sizes.png')}")
    summary = assign.expert_summary(run)
    if fs.exists(join(path, "truth.parquet")):
        truth = pd.read_parquet(io.BytesIO(fs.cat_file(join(path, "truth.parquet"))))
        summary = summary.merge(_domain_mix(run, truth), on="expert_id", how="left")
    print("\nexperts (what each one is about):")
    print(summary.to_string(index=False))
    clock.lap("cluster and assign")
    if not args.skip_training:
        m = shards.run_stage(cfg, run, join(data, "train"), force=args.force)
        print(f"[training_data] {m['rows_out']} samples with images, by expert "
              f"{m['stats']['rows_per_expert']}")
        clock.lap("training data")
        experts.train_seed(cfg, run)
        clock.lap("seed")
        _, failed = experts.launch(cfg, run, experts.plan(cfg), cfg.train.max_concurrent)
        clock.lap("experts and baselines")
        if failed:
            print(f"failed runs: {failed}")
            return 1
        print("\nruns (experts.json):")
        print(_runs_table(experts.registry(run)).to_string(index=False))
        tasks, retrieval, truth = evaluate.demo_inputs(data, cfg.storage)
        report = evaluate.run_stage(cfg, run, tasks, retrieval, truth)
        print()
        print(evaluate.markdown(report))
        clock.lap("evaluate")
    print(f"\nrun directory: {run.uri}")
    for stage in ("ingest", "embeddings", "clusters", "assignments", "training_data", "checkpoints",
                  "eval"):
        print(f"  {stage + '/':14s} {run.stage_uri(stage)}  (manifest: _manifest.json)")
    print(clock.summary())
    return 0


def _runs_table(entries: list[dict]) -> pd.DataFrame:
    return pd.DataFrame([{"run": e["name"], "samples": e["samples"],
                          "steps": f"{e['metrics']['start_step']}->{e['metrics']['step']}",
                          "loss": f"{e['metrics']['first_loss']:.3f}->{e['metrics']['final_loss']:.3f}",
                          "seconds": e["wall"]["seconds"]} for e in entries])


def _domain_mix(run, truth: pd.DataFrame) -> pd.DataFrame:
    """The demo world knows each sample's true domain: the share of each domain per expert."""
    a = assign.read(run).select_columns(["key", "expert_id"]).to_pandas()
    train = truth.loc[truth["split"] == "train", ["key", "domain"]]
    merged = a.merge(train, on="key", how="left")
    share = pd.crosstab(merged["expert_id"], merged["domain"], normalize="index")
    return pd.DataFrame({"expert_id": share.index,
                         "domains": [", ".join(f"{d} {v:.0%}" for d, v in row.sort_values(
                             ascending=False).items() if v >= 0.05) for _, row in share.iterrows()]})


if __name__ == "__main__":
    sys.exit(main())
