"""Stage ``clusters``: balanced fine k-means on Ray, then coarse clusters = data experts.

Reads ``embeddings/`` and writes (README, "Run directory")::

    clusters/fine_centroids.npy     (K, d) float32
    clusters/coarse_centroids.npy   (m, d) float32
    clusters/fine_to_expert.npy     (K,) int32, expert of every fine cluster
    clusters/fine_sizes.npy         (K,) int64, rows per fine cluster in the fit sample

The fit sample is a seeded uniform draw decided per row by a seeded hash of its key, so it does
not depend on file layout or scheduling; it is cut into blocks of ``cluster.fit_block_rows`` in a
fixed order, and the Lloyd iterations run on Ray with statistics-only map tasks
(``kmeans_ray.fit``). Experts are numbered by size, largest first (the order the paper trains
them in).
"""

from __future__ import annotations

import dataclasses
import io
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import ray.data
from ray.data import DataContext

from pipeline import kmeans, kmeans_ray, levels
from pipeline.config import ConfigView
from pipeline.keys import key_rank
from pipeline.rundir import RunDir, StageOutput
from pipeline.storage import pyarrow_filesystem, write_bytes_atomic

STAGE = "clusters"
FILES = ("fine_centroids", "coarse_centroids", "fine_to_expert", "fine_sizes")


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


def _save(run: RunDir, name: str, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array)
    write_bytes_atomic(run.fs, run.stage_path(STAGE, f"{name}.npy"), buf.getvalue())


def load(run: RunDir, generations: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """The clustering of the run and of its generations as one (see ``FILES``), by name.

    Generations (data added later with new experts, docs/growth.md) append their fine centres,
    coarse centres and expert ids after the original ones, so fine ids and expert ids are the
    same in every view. ``generations``: which to include (default: every one that added an
    expert, in the order it did); ``[]`` is the original clustering alone.
    """
    if run.manifest(STAGE) is None:
        raise FileNotFoundError(f"{run.stage_uri(STAGE)} has no manifest: run jobs/cluster.py first")
    arrays = {name: [load_level(run, name)] for name in FILES}
    generations = grown(run) if generations is None else list(generations)
    for g in generations:
        part = run.generation(g)
        if part.manifest(STAGE) is None:
            raise FileNotFoundError(f"{part.stage_uri(STAGE)} is not complete: rerun "
                                    f"jobs/add_experts.py --name {g}")
        for name in FILES:
            arrays[name].append(load_level(part, name))
    out = {name: np.concatenate(parts) for name, parts in arrays.items()}
    if not np.array_equal(np.unique(out["fine_to_expert"]), np.arange(len(out["coarse_centroids"]))):
        raise ValueError(f"{run.uri}: expert ids of the generations {generations} do "
                         "not follow each other (two add_experts jobs at once?)")
    return out


def grown(run: RunDir) -> list[str]:
    """The generations that added experts, in the order they claimed their ids
    (``pipeline/levels.py``), up to the first whose level is not written yet (a job still at it,
    or killed: its rerun finishes it), so that the ids of the union follow each other."""
    claimed = levels.claims(run)
    if not claimed:     # generations made before claims (stop 19): by their first expert id
        made = {g: run.generation(g).manifest(STAGE) for g in run.generation_names()}
        made = {g: m["stats"]["experts"][0]["expert_id"] for g, m in made.items()
                if m is not None and m["stats"]["experts"]}
        return sorted(made, key=made.get)
    found = []
    for c in claimed:
        if run.generation(c["generation"]).manifest(STAGE) is None:
            break
        found.append(c["generation"])
    return found


def owned(run: RunDir, expert_id: int, generation: str | None = None) -> list[int]:
    """The fine ids of the union that expert ``expert_id`` of ``generation`` (None: of the
    original clustering) owns, read from that level alone."""
    level = run if generation is None else run.generation(generation)
    first = 0 if generation is None else level.manifest(STAGE)["stats"]["first_fine_id"]
    return (first + np.flatnonzero(load_level(level, "fine_to_expert") == expert_id)).tolist()


def load_level(run: RunDir, name: str) -> np.ndarray:
    with run.fs.open(run.stage_path(STAGE, f"{name}.npy"), "rb") as f:
        return np.load(io.BytesIO(f.read()))


def run(cfg: ConfigView, run: RunDir, upstream: dict[str, Any], log=print) -> StageOutput:
    """Fit the fine and coarse levels on the run's embeddings and write ``clusters/``."""
    c = cfg.cluster
    n = int(upstream["embeddings"]["rows_out"])
    if n < c.fine_k:
        raise ValueError(f"cluster.fine_k={c.fine_k} centres need at least that many rows; the "
                         f"embeddings have {n}. Lower cluster.fine_k.")
    ds = ray.data.read_parquet(run.stage_uri("embeddings"), filesystem=pyarrow_filesystem(run.fs))
    level = fit_level(ds, n, c, c.fine_k, c.num_experts, log)
    save(run, level)
    log(f"[clusters] {c.fine_k} fine clusters -> {c.num_experts} experts, objective "
        f"{level.stats['objective']:.4g} (restart {level.stats['best_restart']})")
    fitted = level.stats["fit_rows"]
    return StageOutput(n, fitted, {"not_in_fit_sample": n - fitted}, level.stats)


@dataclasses.dataclass(frozen=True)
class Level:
    """A fitted clustering: what ``clusters/`` holds (``FILES``), and the fit's statistics."""
    fine_centroids: np.ndarray      # (K, d) float32
    coarse_centroids: np.ndarray    # (m, d) float32
    fine_to_expert: np.ndarray      # (K,) int32
    fine_sizes: np.ndarray          # (K,) int64
    stats: dict[str, Any]


def save(run: RunDir, level: Level) -> None:
    for name in FILES:
        _save(run, name, getattr(level, name))


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
        init = kmeans_ray.init_lowest_rank(blocks_r, fine_k)
        centroids, history = kmeans_ray.fit(blocks, init, c.iterations, kmeans.restart_seed(c.seed, r),
                                            c.balanced, c.capacity_slack)
        final = kmeans_ray.final_stats(blocks, centroids, c.balanced, c.capacity_slack)
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
