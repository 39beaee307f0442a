"""Lloyd's k-means on Ray: the map step runs on workers over blocks, only statistics come back.

Blocks are in the object store: float32 (n, d) numpy arrays (``ray.put``) or Arrow tables with an
``embedding`` column (a Dataset's ``to_arrow_refs()``, converted inside the task). Each
iteration sends the current centroids once, every block returns its ``kmeans.Stats`` (float64
sums, counts, objective: O(K*d), never the points), and the driver reduces them in block order,
so the same seed gives bit-identical centroids however Ray schedules the tasks.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import ray

from pipeline import kmeans
from pipeline.tables import embedding_matrix

log = logging.getLogger(__name__)


def as_matrix(block: np.ndarray | pa.Table) -> np.ndarray:
    return embedding_matrix(block) if isinstance(block, pa.Table) else block


@ray.remote(num_cpus=1)
def _block_stats(block: np.ndarray | pa.Table, centroids: np.ndarray, k: int, balanced: bool,
                 index: int, slack: float) -> kmeans.Stats:
    x = as_matrix(block)
    labels, dist = kmeans.assign_block(x, centroids, balanced, index, slack)
    return kmeans.block_stats(x, labels, dist, k)


@ray.remote(num_cpus=1)
def _lowest_ranks(block: pa.Table, k: int) -> tuple[np.ndarray, np.ndarray]:
    rank = block.column("rank").to_numpy()
    x = as_matrix(block)
    order = np.argsort(rank, kind="stable")
    # Web captions repeat: identical rows would start as identical (so empty) centres.
    _, first = np.unique(x[order], axis=0, return_index=True)
    keep = order[np.sort(first)][:k]
    return rank[keep], x[keep]


def init_lowest_rank(blocks: Sequence[ray.ObjectRef], k: int) -> np.ndarray:
    """The k distinct rows with the lowest ``rank`` over all blocks: a seeded uniform draw when
    ranks are seeded hashes of the keys, and independent of how rows fall into blocks."""
    parts = ray.get([_lowest_ranks.remote(b, k) for b in blocks])
    ranks = np.concatenate([p[0] for p in parts])
    rows = np.concatenate([p[1] for p in parts])
    if len(rows) < k:
        raise ValueError(f"need at least k={k} rows to initialise, got {len(rows)}")
    order = np.argsort(ranks, kind="stable")
    _, first = np.unique(rows[order], axis=0, return_index=True)
    order = order[np.sort(first)][:k]
    if len(order) < k:
        raise ValueError(f"need at least k={k} distinct rows to initialise, got {len(order)}")
    return np.ascontiguousarray(rows[order], np.float32)


def final_stats(blocks: Sequence[ray.ObjectRef], centroids: np.ndarray,
                balanced: bool, slack: float = 0.0) -> kmeans.Stats:
    """Statistics of one more assignment pass with the final centroids (sizes, objective)."""
    ref = ray.put(np.asarray(centroids, np.float32))
    k = len(centroids)
    return kmeans.reduce_stats(ray.get([_block_stats.remote(b, ref, k, balanced, i, slack)
                                        for i, b in enumerate(blocks)]))


def fit(blocks: Sequence[ray.ObjectRef], init: np.ndarray, iterations: int, seed: int,
        balanced: bool, slack: float = 0.0) -> tuple[np.ndarray, list[dict]]:
    """Run ``iterations`` distributed Lloyd steps from ``init``.

    Returns the centroids and one record per iteration (objective before the update, number of
    re-seeded empty clusters), the same as ``kmeans.lloyd`` computes in one process.
    """
    k = len(init)
    centroids = np.asarray(init, np.float32)
    history = []
    for it in range(iterations):
        ref = ray.put(centroids)
        parts = ray.get([_block_stats.remote(b, ref, k, balanced, i, slack)
                         for i, b in enumerate(blocks)])
        total = kmeans.reduce_stats(parts)
        centroids, reseeded = kmeans.update_centroids(total, centroids, seed + it + 1)
        history.append({"iteration": it, "objective": total.objective, "reseeded": reseeded})
        log.debug("k-means iteration %d/%d: objective %.6g, %d empty clusters re-seeded",
                 it + 1, iterations, total.objective, reseeded)
    return centroids, history
