"""Refit the run's clustering for several k-means seeds and measure each expert's domain purity
on a demo world's clean pairs (docs/clustering.md).

    python jobs/cluster_stability.py --run-dir demo_out/run                 # seeds 0-4
    python jobs/cluster_stability.py --run-dir R --seeds 0,1,2 --truth URI/truth.parquet

Reads embeddings/ (run jobs/embed.py first) and the world's truth.parquet (default: the demo
world next to the run directory); writes experiment/cluster_stability.json and .md. The run's
own clusters/ and assignments/ are not touched: the refits stay in memory.
"""

import sys

from pipeline.clustering import stability
from pipeline.core import cli
from pipeline.evaluation import eval as evaluation


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        seeds = []
    if not seeds:
        raise SystemExit(f"--seeds takes comma-separated integers like 0,1,2; got {text!r}")
    return seeds


def main(argv=None) -> int:
    p = cli.parser(__doc__)
    p.add_argument("--seeds", type=_seeds, default=[0, 1, 2, 3, 4], metavar="0,1,2,3,4",
                   help="k-means seeds (cluster.seed) to refit with (default 0,1,2,3,4)")
    p.add_argument("--truth", metavar="URI", help="the demo world's truth.parquet (default: "
                   "<run-dir>/../data/truth.parquet)")
    args = p.parse_args(argv)
    cfg, run = cli.load(args, write_config=False)
    if run.manifest("embeddings") is None:
        p.error(f"{run.stage_uri('embeddings')} is not complete: run jobs/embed.py first")
    truth = args.truth
    if truth is None:
        found = evaluation.inputs(run.uri, [], None, None, cfg.storage)
        truth = found[2] if found else None
    if truth is None:
        p.error("no truth.parquet next to the run directory: pass --truth URI")
    print(cli.start(cfg, run, truth))
    result = stability.study(cfg, run, args.seeds, truth)
    print(stability.markdown(result))
    print(f"written: {stability.write(run, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
