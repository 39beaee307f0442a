"""The clustering on Ray: Lloyd's k-means over blocks, fitting a level, assigning rows.

Lloyd's iterations (``fit``): blocks are in the object store, float32 (n, d) numpy arrays
(``ray.put``) or Arrow tables with an ``embedding`` column (a Dataset's ``to_arrow_refs()``,
converted inside the task). Each iteration sends the current centroids once, every block returns
its ``kmeans.Stats`` (float64 sums, counts, objective: O(K*d), never the points), and the driver
reduces them in block order, so the same seed gives bit-identical centroids however Ray
schedules the tasks.

A level (``fit_level``): a seeded sample of a Dataset's embeddings, balanced fine k-means with
restarts, then the coarse clusters over the fine centres; what the ``clusters`` stage writes,
what a generation fits on its novel rows, and what the OneStep ablation fits with m centres.

Assignment (``assign_dataset``): every row of a Dataset to a centre, balanced per block, in an
order that does not depend on the files' layout; what the ``assignments`` stage writes.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import ray
import ray.data
from ray.data import DataContext
from ray.data.context import ShuffleStrategy

from pipeline.clustering import kmeans
from pipeline.core.keys import key_rank
from pipeline.core.tables import embedding_matrix

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


# ----------------------------------------------------------------------------- a level
def _sample(batch: pa.Table, fraction: float, seed: int) -> pa.Table:
    """The seeded sample's rows of a block, with their rank (the draw of initial centres)."""
    rank = key_rank(batch.column("key").to_numpy(zero_copy_only=False), seed)
    keep = rank < np.uint64(int(fraction * 2**64)) if fraction < 1 else np.ones(len(rank), bool)
    return batch.select(["key", "embedding"]).append_column("rank", pa.array(rank)).filter(keep)


def _same(batch: pa.Table) -> pa.Table:
    return batch


def coarse_level(fine_centroids: np.ndarray, sizes: np.ndarray, num_experts: int, seed: int,
                 balanced: bool = False, restarts: int = 100) -> tuple[np.ndarray, np.ndarray, float]:
    """Coarse centres over the fine ones, weighted by size; experts renumbered largest first.

    The fine centres are scaled to unit length first: captions compare by direction, and a fine
    centre's length only says how spread its captions are (a diffuse topic's mean is short).
    On the raw centres the lowest objective split the demo world's widest domain over two
    experts and merged two others (docs/clustering.md); on the unit sphere it follows topics.
    """
    weights = np.maximum(sizes.astype(np.float64), 1e-9)
    unit = fine_centroids / np.maximum(np.linalg.norm(fine_centroids, axis=1, keepdims=True), 1e-12)
    centroids, labels, objective = kmeans.weighted_kmeans(
        unit, weights, num_experts, seed, restarts=restarts, balanced=balanced)
    mass = np.bincount(labels, weights=weights, minlength=num_experts)
    order = np.lexsort((np.arange(num_experts), -mass))      # largest first, ties by index
    relabel = np.empty_like(order)
    relabel[order] = np.arange(num_experts)
    return centroids[order], relabel[labels].astype(np.int32), objective


@dataclasses.dataclass(frozen=True)
class Level:
    """A fitted clustering: what ``clusters/`` holds (``FILES``), and the fit's statistics."""
    fine_centroids: np.ndarray      # (K, d) float32
    coarse_centroids: np.ndarray    # (m, d) float32
    fine_to_expert: np.ndarray      # (K,) int32
    fine_sizes: np.ndarray          # (K,) int64
    stats: dict[str, Any]


def numbered(level: Level, first_expert: int) -> Level:
    """``level`` (numbered from 0, as ``fit_level`` does) with its experts numbered from
    ``first_expert``: a generation's, once claimed."""
    stats = {**level.stats, "experts": [{**e, "expert_id": e["expert_id"] + first_expert}
                                        for e in level.stats["experts"]]}
    return dataclasses.replace(level, stats=stats,
                               fine_to_expert=(level.fine_to_expert + first_expert).astype(np.int32))


def fit_level(ds: ray.data.Dataset, n: int, c: Any, fine_k: int, num_experts: int,
              log=print) -> Level:
    """Balanced fine k-means on the rows of ``ds`` (``key``, ``embedding``; ``n`` of them), then
    ``num_experts`` coarse clusters over the fine centres, numbered from 0 (``numbered``).

    ``c`` holds the fit's settings (``cluster.*``: sample_per_centre, seed, fit_block_rows,
    restarts, iterations, balanced, capacity_slack, balanced_coarse); ``fine_k`` and
    ``num_experts`` are given apart, since a generation (docs/growth.md) sizes its own level.
    """
    t0 = time.perf_counter()
    target = c.sample_per_centre * fine_k
    fraction = 1.0 if target == 0 or target >= n else target / n
    # Block order decides the float64 reduction order: keep it fixed for bit-identical refits.
    options = DataContext.get_current().execution_options
    keep_order, options.preserve_order = options.preserve_order, True
    try:
        sample = ds.map_batches(_sample, batch_format="pyarrow",
                                fn_kwargs={"fraction": fraction, "seed": c.seed}) \
            .map_batches(_same, batch_format="pyarrow", batch_size=c.fit_block_rows).materialize()
    finally:
        options.preserve_order = keep_order
    blocks = sample.to_arrow_refs()
    fitted = sample.count()
    if fitted < fine_k:
        raise ValueError(f"the fit sample has {fitted} rows, fewer than {fine_k} fine centres; "
                         "raise cluster.sample_per_centre or set it to 0 (all rows)")
    log(f"[clusters] fitting {fine_k} fine centres on {fitted:,} of {n:,} rows in {len(blocks)} "
        f"blocks ({'balanced' if c.balanced else 'plain'}, {c.iterations} iterations, "
        f"{c.restarts} restart(s))")
    t_load = time.perf_counter() - t0
    best = None
    restarts = []
    for r in range(c.restarts):
        if r:   # a different seeded draw of initial centres per restart
            blocks_r = sample.map_batches(_rerank, batch_format="pyarrow",
                                          fn_kwargs={"seed": kmeans.restart_seed(c.seed, r)}).to_arrow_refs()
        else:
            blocks_r = blocks
        init = init_lowest_rank(blocks_r, fine_k)
        centroids, history = fit(blocks, init, c.iterations, kmeans.restart_seed(c.seed, r),
                                            c.balanced, c.capacity_slack)
        final = final_stats(blocks, centroids, c.balanced, c.capacity_slack)
        restarts.append({"restart": r, "objective": final.objective,
                         "history": [h["objective"] for h in history],
                         "reseeded": [h["reseeded"] for h in history]})
        log(f"[clusters] restart {r}: objective {final.objective:.6g}")
        if best is None or final.objective < best[2].objective:
            best = (r, centroids, final)
    r, fine, final = best
    sizes = final.counts
    coarse, fine_to_expert, coarse_objective = coarse_level(fine, sizes, num_experts, c.seed,
                                                            c.balanced_coarse, c.coarse_restarts)
    expert_rows = np.bincount(fine_to_expert, weights=sizes, minlength=num_experts)
    stats = {
        "sample_fraction": fraction, "fit_rows": int(fitted), "blocks": len(blocks),
        "best_restart": r, "objective": final.objective, "restarts": restarts,
        "coarse_objective": coarse_objective,
        "fine_sizes": {"min": int(sizes.min()), "max": int(sizes.max()),
                       "mean": float(sizes.mean()), "empty": int((sizes == 0).sum())},
        "experts": [{"expert_id": e, "fine_clusters": int((fine_to_expert == e).sum()),
                     "fit_rows": int(expert_rows[e])} for e in range(num_experts)],
        "seconds": {"sample": round(t_load, 2), "total": round(time.perf_counter() - t0, 2)},
    }
    return Level(fine, coarse, fine_to_expert.astype(np.int32),
                 sizes.astype(np.int64), stats)


def _rerank(batch: pa.Table, seed: int) -> pa.Table:
    rank = key_rank(batch.column("key").to_numpy(zero_copy_only=False), seed)
    return batch.set_column(batch.schema.get_field_index("rank"), "rank", pa.array(rank))


# ----------------------------------------------------------------------------- assignment
def assign_table(batch: pa.Table, fine: np.ndarray, fine_to_expert: np.ndarray,
                 balanced: bool, slack: float = 0.0) -> pa.Table:
    """One block of embeddings to its assignment rows (capacity-limited when ``balanced``).
    The rows are put in key order first: under capacities a row's centre depends on the rows
    assigned before it, and the order Ray Data delivers them in is not fixed."""
    batch = batch.take(pa.compute.sort_indices(batch, sort_keys=[("key", "ascending")]))
    if "block" in batch.column_names:
        batch = batch.drop_columns(["block"])
    keys = batch.column("key")
    # The block's first key decides which centres take the remainder rows: fixed per block.
    offset = int(key_rank(keys.slice(0, 1).to_numpy(zero_copy_only=False), 0)[0] % 2**31)
    labels, d2 = kmeans.assign_block(embedding_matrix(batch), fine, balanced, offset, slack)
    return pa.table({"key": keys, "fine_id": pa.array(labels.astype(np.int32)),
                     "expert_id": pa.array(fine_to_expert[labels].astype(np.int32)),
                     "distance": pa.array(np.sqrt(np.maximum(d2, 0)).astype(np.float32))})


# Seed of the hash that puts a row in its assignment block (another draw than the others').
_BLOCK_SALT = 524_287


def _block_of(batch: pa.Table, blocks: int) -> pa.Table:
    keys = batch.column("key").to_numpy(zero_copy_only=False)
    block = (key_rank(keys, _BLOCK_SALT) % np.uint64(blocks)).astype(np.int32)
    return batch.append_column("block", pa.array(block))


def assign_dataset(ds: ray.data.Dataset, rows_in: int, fine: np.ndarray, fine_to_expert: np.ndarray,
                   c: Any) -> ray.data.Dataset:
    """The assignment rows of ``ds`` (key, embedding), lazily, in blocks of about
    ``c.block_rows`` rows: one block when every row fits, else blocks decided by the keys'
    hashes (a sort-based groupby: plain tasks, no aggregator actors), so that the same rows
    make the same blocks however the files lay them out."""
    kwargs = {"fine": fine, "fine_to_expert": fine_to_expert, "balanced": c.balanced,
              "slack": c.capacity_slack}
    blocks = int(np.ceil(rows_in / c.block_rows))
    if blocks <= 1:     # one batch of every row, whatever order they come in
        return ds.map_batches(assign_table, batch_format="pyarrow", batch_size=c.block_rows,
                              fn_kwargs=kwargs)
    ds = ds.map_batches(_block_of, batch_format="pyarrow", fn_kwargs={"blocks": blocks})
    ds.context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    return ds.groupby("block").map_groups(assign_table, batch_format="pyarrow", fn_kwargs=kwargs)
