"""Run the whole pipeline on the generated demo world, on a local Ray, offline.

    python jobs/demo.py --out demo_out        # what `make demo` runs

Generates the world under <out>/data (once), then runs every stage into <out>/run and prints
what each stage produced. Completed stages are skipped on rerun.
"""

import io
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402

from pipeline import assign, cli, cluster, demo_world, embed, ingest  # noqa: E402
from pipeline.raycluster import init_ray  # noqa: E402
from pipeline.storage import filesystem, join  # noqa: E402


def main(argv=None) -> int:
    p = cli.parser(__doc__, run_dir=False)
    p.add_argument("--out", default="demo_out", metavar="URI", help="where data and run go")
    args = p.parse_args(argv)
    args.run_dir = join(args.out, "run")
    cfg, run = cli.load(args)
    data = join(args.out, "data")
    fs, path = filesystem(data, cfg.storage)
    if fs.exists(join(path, "world.json")):
        print(f"[data] demo world already at {data}: reused")
    else:
        print(f"[data] generating the demo world at {data}")
        demo_world.generate(data, cfg.demo, cfg.storage)
    print(init_ray(cfg.ray))
    m = ingest.run_stage(cfg, run, join(data, "train"), force=args.force)
    print(f"[ingest] {m['rows_in']} samples read, {m['rows_out']} kept, skipped "
          f"{m['rows_skipped']} from {m['stats']['shards']} shards")
    m = embed.run_stage(cfg, run, join(data, "train"), force=args.force)
    print(f"[embed] {m['rows_out']} captions embedded ({m['stats']['captions_encoded']} distinct "
          f"went through {m['stats']['model']}), skipped {m['rows_skipped']}")
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
    print(f"\nrun directory: {run.uri}")
    for stage in ("ingest", "embeddings", "clusters", "assignments"):
        print(f"  {stage + '/':14s} {run.stage_uri(stage)}  (manifest: _manifest.json)")
    return 0


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
