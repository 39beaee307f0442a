"""Stage ``clusters``: balanced fine k-means on Ray, then coarse clusters = data experts.

Reads ``embeddings/`` and writes (docs/stages.md, "The run directory")::

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

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import ray.data

from pipeline.clustering import kmeans_ray
from pipeline.core.config import ConfigView
from pipeline.core.rundir import RunDir, StageOutput
from pipeline.core.storage import pyarrow_filesystem, write_bytes_atomic
from pipeline.grow import levels

STAGE = "clusters"
FILES = ("fine_centroids", "coarse_centroids", "fine_to_expert", "fine_sizes")


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
    (``pipeline/grow/levels.py``), up to the first whose level is not written yet (a job still at it,
    or killed: its rerun finishes it), so that the ids of the union follow each other."""
    claimed = levels.claims(run)
    if not claimed:     # generations written without id claims: by their first expert id
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
    level = kmeans_ray.fit_level(ds, n, c, c.fine_k, c.num_experts, log)
    save(run, level)
    log(f"[clusters] {c.fine_k} fine clusters -> {c.num_experts} experts, objective "
        f"{level.stats['objective']:.4g} (restart {level.stats['best_restart']})")
    fitted = level.stats["fit_rows"]
    return StageOutput(n, fitted, {"not_in_fit_sample": n - fitted}, level.stats)


def save(run: RunDir, level: kmeans_ray.Level) -> None:
    for name in FILES:
        _save(run, name, getattr(level, name))


