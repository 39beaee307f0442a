"""Lloyd's k-means on Ray: the map step runs on workers over blocks, only statistics come back.

Blocks are numpy arrays already in the object store (``ray.put`` or a Dataset's blocks). Each
iteration sends the current centroids once, every block returns its ``kmeans.Stats`` (float64
sums, counts, objective: O(K*d), never the points), and the driver reduces them in block order,
so the same seed gives bit-identical centroids however Ray schedules the tasks.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import ray

from pipeline import kmeans

log = logging.getLogger(__name__)


@ray.remote(num_cpus=1)
def _block_stats(block: np.ndarray, centroids: np.ndarray, k: int, balanced: bool,
                 index: int) -> kmeans.Stats:
    labels, dist = kmeans.assign_block(block, centroids, balanced, index)
    return kmeans.block_stats(block, labels, dist, k)


def fit(blocks: Sequence[ray.ObjectRef], init: np.ndarray, iterations: int, seed: int,
        balanced: bool) -> tuple[np.ndarray, list[dict]]:
    """Run ``iterations`` distributed Lloyd steps from ``init``.

    Returns the centroids and one record per iteration (objective before the update, number of
    re-seeded empty clusters), the same as ``kmeans.lloyd`` computes in one process.
    """
    k = len(init)
    centroids = np.asarray(init, np.float32)
    history = []
    for it in range(iterations):
        ref = ray.put(centroids)
        parts = ray.get([_block_stats.remote(b, ref, k, balanced, i) for i, b in enumerate(blocks)])
        total = kmeans.reduce_stats(parts)
        centroids, reseeded = kmeans.update_centroids(total, centroids, seed + it + 1)
        history.append({"iteration": it, "objective": total.objective, "reseeded": reseeded})
        log.info("k-means iteration %d/%d: objective %.6g, %d empty clusters re-seeded",
                 it + 1, iterations, total.objective, reseeded)
    return centroids, history
