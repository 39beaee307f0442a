"""The k-means maths, pure numpy + faiss kernels, no Ray: Ray only maps these over blocks.

A distributed Lloyd iteration is ``block_stats`` on every block (per-centre float64 sums,
counts, objective), ``reduce_stats`` in a fixed order (so a seed gives bit-identical centroids
whatever the scheduling), then ``update_centroids``, which re-seeds empty clusters instead of
leaving them empty. ``balanced_assign`` is the capacity-constrained assignment used both while
fitting and at assignment time, on every block.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import faiss
import numpy as np
from scipy import sparse


@dataclass(frozen=True)
class Stats:
    """What a block contributes to one Lloyd update."""
    sums: np.ndarray       # (K, d) float64: sum of the points assigned to each centre
    counts: np.ndarray     # (K,) int64
    objective: float       # sum of squared distances to the assigned centre


def nearest(x: np.ndarray, centroids: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Squared L2 distances (n, k) and ids (n, k) of each row's k nearest centres (faiss)."""
    d, i = faiss.knn(np.ascontiguousarray(x, np.float32), np.ascontiguousarray(centroids, np.float32),
                     k)
    return np.maximum(d, 0.0), i.astype(np.int64)


def restart_seed(seed: int, restart: int) -> int:
    """The seed of restart ``restart`` of a fit seeded ``seed``: ``seed`` itself for the first,
    then a hash of both, so that the restarts of neighbouring seeds never share a draw (with
    ``seed + restart``, seed 2's second restart was seed 3's first: docs/clustering.md)."""
    if restart == 0:
        return seed
    return int(np.random.SeedSequence([seed, restart]).generate_state(1)[0] >> 1)


def init_centroids(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k distinct rows of x drawn with a seeded generator (faiss's own default init)."""
    if len(x) < k:
        raise ValueError(f"need at least k={k} points to initialise, got {len(x)}")
    rows = np.random.default_rng(seed).choice(len(x), size=k, replace=False)
    return np.array(x[np.sort(rows)], np.float32)


def capacities(n: int, k: int, offset: int = 0, slack: float = 0.0) -> np.ndarray:
    """Per-centre capacities for n rows: sizes m//k or m//k + 1, summing to m = n + ceil(n * slack).

    With ``slack`` 0 they sum to exactly n, so every centre gets n//k or n//k + 1 rows. A small
    slack lets a row stay at its nearest centre when that centre is only slightly over n/k, at
    the price of some centres ending below it. The centres that get the extra point rotate with
    ``offset`` (the block index), so that summed over many blocks no centre collects every
    block's remainder.
    """
    if slack < 0:
        raise ValueError(f"capacity slack must be >= 0, got {slack}")
    n = n + int(np.ceil(n * slack))
    caps = np.full(k, n // k, np.int64)
    extra = (np.arange(n % k) + offset * (n % k)) % k
    caps[extra] += 1
    return caps


def balanced_assign(x: np.ndarray, centroids: np.ndarray, caps: np.ndarray,
                    candidates: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Assign every row to a centre without any centre exceeding ``caps``.

    Greedy by regret: rows that would lose most by missing their nearest centre choose first,
    each taking its nearest centre that still has room among its ``candidates`` nearest; rows
    left over (all candidates full) repeat against the centres with room left. Returns
    (labels, squared distances to the assigned centre).
    """
    n = len(x)
    if caps.sum() < n:
        raise ValueError(f"capacities sum to {caps.sum()} < {n} rows")
    labels = np.full(n, -1, np.int64)
    dist = np.zeros(n, np.float32)
    room = caps.astype(np.int64).copy()
    todo = np.arange(n)
    while len(todo):
        open_ids = np.flatnonzero(room > 0)
        m = min(candidates, len(open_ids))
        d, local = nearest(x[todo], centroids[open_ids], m)
        ids = open_ids[local]
        regret = d[:, 1] - d[:, 0] if m > 1 else -d[:, 0]
        order = np.lexsort((todo, -regret))             # ties broken by row index: deterministic
        pending = np.ones(len(todo), bool)
        for j in range(m):
            rows = order[pending[order]]
            if not len(rows):
                break
            want = ids[rows, j]
            # Within each centre, the first `room` rows in priority order get in.
            by_centre = np.argsort(want, kind="stable")
            sorted_want = want[by_centre]
            starts = np.searchsorted(sorted_want, sorted_want, side="left")
            rank = np.empty(len(rows), np.int64)
            rank[by_centre] = np.arange(len(rows)) - starts
            ok = rank < room[want]
            took = rows[ok]
            labels[todo[took]] = want[ok]
            dist[todo[took]] = d[took, j]
            np.subtract.at(room, want[ok], 1)
            pending[took] = False
        todo = todo[pending]
    return labels, dist


def assign_block(x: np.ndarray, centroids: np.ndarray, balanced: bool,
                 index: int, slack: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Labels and squared distances of one block: capacity-constrained or plain nearest."""
    if balanced:
        return balanced_assign(x, centroids, capacities(len(x), len(centroids), index, slack))
    d, i = nearest(x, centroids)
    return i[:, 0], d[:, 0]


def block_stats(x: np.ndarray, labels: np.ndarray, dist: np.ndarray, k: int) -> Stats:
    """Per-centre float64 sums and counts of one block, and its objective."""
    counts = np.bincount(labels, minlength=k).astype(np.int64)
    # A (k, n) one-hot CSR matrix times the rows: each centre's rows are added in block order,
    # in float64, the same additions as np.add.at bit for bit and about 8x faster.
    onehot = sparse.csr_array((np.ones(len(labels)), np.argsort(labels, kind="stable"),
                               np.r_[0, np.cumsum(counts)]), shape=(k, len(labels)))
    sums = onehot @ np.asarray(x, np.float64)
    return Stats(sums, counts, float(dist.astype(np.float64).sum()))


def reduce_stats(parts: Iterable[Stats]) -> Stats:
    """Sum block statistics in the order given (callers pass them sorted by block index)."""
    parts = list(parts)
    if not parts:
        raise ValueError("no block statistics to reduce")
    sums = np.zeros_like(parts[0].sums)
    counts = np.zeros_like(parts[0].counts)
    objective = 0.0
    for p in parts:
        sums += p.sums
        counts += p.counts
        objective += p.objective
    return Stats(sums, counts, objective)


def update_centroids(stats: Stats, previous: np.ndarray, seed: int) -> tuple[np.ndarray, int]:
    """New centroids = means; each empty cluster is re-seeded by splitting a large one.

    As faiss does: an empty centre takes a copy of a centre picked with probability proportional
    to its size (above the mean), and the two are pushed apart by a small symmetric
    perturbation, so both end up owning half of that cluster at the next assignment. Returns
    (centroids, number of re-seeded clusters).
    """
    counts = stats.counts
    new = previous.astype(np.float64).copy()
    filled = counts > 0
    new[filled] = stats.sums[filled] / counts[filled, None]
    empty = np.flatnonzero(~filled)
    if len(empty):
        rng = np.random.default_rng(seed)
        sizes = counts.astype(np.float64).copy()
        for e in empty:
            big = sizes > max(sizes.mean(), 1.0)
            donors = np.flatnonzero(big) if big.any() else np.flatnonzero(sizes > 1)
            p = sizes[donors] / sizes[donors].sum()
            donor = int(rng.choice(donors, p=p))
            eps = 1e-3 * (np.abs(new[donor]).mean() + 1e-12)
            direction = rng.standard_normal(new.shape[1])
            new[e] = new[donor] + eps * direction
            new[donor] = new[donor] - eps * direction
            sizes[e] = sizes[donor] / 2
            sizes[donor] /= 2
    return new.astype(np.float32), len(empty)


def lloyd(x: np.ndarray, k: int, iterations: int, seed: int, balanced: bool,
          blocks: int = 1, slack: float = 0.0) -> tuple[np.ndarray, list[float]]:
    """Single-process reference of the distributed fit: same maths, blocks processed in order.

    Returns the centroids and the objective of each iteration (computed before its update).
    """
    centroids = init_centroids(x, k, seed)
    parts = np.array_split(np.arange(len(x)), blocks)
    history = []
    for it in range(iterations):
        stats = []
        for b, rows in enumerate(parts):
            labels, dist = assign_block(x[rows], centroids, balanced, b, slack)
            stats.append(block_stats(x[rows], labels, dist, k))
        total = reduce_stats(stats)
        history.append(total.objective)
        centroids, _ = update_centroids(total, centroids, seed + it + 1)
    return centroids, history


def weighted_kmeans(x: np.ndarray, weights: np.ndarray, k: int, seed: int, iterations: int = 50,
                    restarts: int = 10, balanced: bool = False) -> tuple[np.ndarray, np.ndarray, float]:
    """Small weighted k-means, for the coarse level: x are the fine centres, weights their sizes.

    Each restart starts from k distinct rows drawn with ``restart_seed(seed, restart)``; the lowest weighted
    objective wins. With ``balanced`` every cluster gets len(x)//k or len(x)//k + 1 rows (the
    same number of fine clusters per expert). An empty cluster takes the row farthest from its
    centre. Returns (centroids (k, d) float32, labels (n,) int64, weighted objective).
    """
    x = np.ascontiguousarray(x, np.float32)
    w = np.asarray(weights, np.float64)
    if len(x) < k:
        raise ValueError(f"need at least k={k} rows, got {len(x)}")
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError("weights must be non-negative with a positive sum")
    best = None
    for r in range(restarts):
        centroids = init_centroids(x, k, restart_seed(seed, r))
        for _ in range(iterations):
            labels, dist = assign_block(x, centroids, balanced, 0)
            new = centroids.astype(np.float64).copy()
            for j in range(k):
                members = labels == j
                if w[members].sum() > 0:
                    new[j] = np.average(x[members], axis=0, weights=w[members])
                elif members.any():
                    new[j] = x[members].mean(axis=0)
                else:
                    far = int(np.argmax(dist))
                    new[j] = x[far]
                    dist[far] = -1.0
            new = new.astype(np.float32)
            if np.array_equal(new, centroids):
                break
            centroids = new
        labels, dist = assign_block(x, centroids, balanced, 0)
        for j in np.flatnonzero(np.bincount(labels, minlength=k) == 0):
            # Every expert must own a fine cluster: it takes the worst-fitting shareable row.
            shareable = np.bincount(labels, minlength=k)[labels] > 1
            far = int(np.argmax(np.where(shareable, dist, -1.0)))
            labels[far], dist[far], centroids[j] = j, 0.0, x[far]
        objective = float((w * dist).sum())
        if best is None or objective < best[2]:
            best = (centroids, labels, objective)
    return best
