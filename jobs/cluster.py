"""Fit the fine and coarse clusters on the run's caption embeddings (stage `clusters`).

    python jobs/cluster.py --run-dir runs/demo
    python jobs/cluster.py --run-dir runs/demo --set cluster.fine_k=256 --set cluster.num_experts=8

Writes clusters/fine_centroids.npy, coarse_centroids.npy, fine_to_expert.npy, fine_sizes.npy
and clusters/_manifest.json (objective per iteration, restarts, sizes, timings).
"""

import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from pipeline import cli, cluster  # noqa: E402
from pipeline.raycluster import init_ray  # noqa: E402


def main(argv=None) -> int:
    args = cli.parser(__doc__).parse_args(argv)
    cfg, run = cli.load(args)
    print(init_ray(cfg.ray))
    m = cluster.run_stage(cfg, run, force=args.force)
    print(json.dumps({"fit_rows": m["rows_out"], "objective": m["stats"]["objective"],
                      "experts": m["stats"]["experts"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
