"""Fit the fine and coarse clusters on the run's caption embeddings (stage `clusters`).

    python jobs/cluster.py --run-dir runs/demo
    python jobs/cluster.py --run-dir runs/demo --set cluster.fine_k=256 --set cluster.num_experts=8

Writes clusters/fine_centroids.npy, coarse_centroids.npy, fine_to_expert.npy, fine_sizes.npy
and clusters/_manifest.json (objective per iteration, restarts, sizes, timings).
"""

import sys

from pipeline.core import cli


def main(argv=None) -> int:
    return cli.stage_job(__doc__, "clusters", argv)


if __name__ == "__main__":
    sys.exit(main())
