"""Stage ``onestep``: the paper's OneStep ablation, the fine clustering straight to m centres.

MoDE clusters captions in two steps: many fine centres, then m coarse clusters over them, one per
data expert. The paper's OneStep-m asks what the fine level buys: balanced k-means with
``cluster.num_experts`` centres on the embeddings directly (the fine level's own settings and
code, ``kmeans_ray.fit_level``), every sample assigned to one of them
(``kmeans_ray.assign_dataset``, balanced as the fine level is), and one expert trained per
centre from the same seed model (``onestep-<e>`` runs, ``pipeline.training.runs``). Routing uses those m
centres as MoDE uses its fine ones. It is an ablation for ``jobs/experiment.py``; a MoDE run
needs none of it.

Reads ``embeddings/``; writes::

    onestep/centroids.npy     (m, d) float32, centre e is expert e's (numbered largest first)
    onestep/assignments/      key, distance by expert_id (parquet, one folder per expert)
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import ray.data
from pyarrow.fs import FileType
from ray.data import SaveMode

from pipeline.clustering import kmeans_ray
from pipeline.core.config import ConfigView
from pipeline.core.rundir import RunDir, StageOutput
from pipeline.core.storage import pyarrow_filesystem, write_bytes_atomic
from pipeline.core.tables import count_rows, read_by_expert

STAGE = "onestep"


def run(cfg: ConfigView, run: RunDir, upstream: dict[str, Any], log=print) -> StageOutput:
    """Fit ``cluster.num_experts`` balanced centres on the embeddings, assign every row to one,
    and write ``onestep/``."""
    c = cfg.cluster
    n = int(upstream["embeddings"]["rows_out"])
    ds = ray.data.read_parquet(run.stage_uri("embeddings"), filesystem=pyarrow_filesystem(run.fs))
    # m centres and m experts: the coarse step maps each centre to an expert of its own
    level = kmeans_ray.fit_level(ds, n, c, c.num_experts, c.num_experts, log)
    order = np.argsort(level.fine_to_expert, kind="stable")     # centre of expert 0 first
    centroids = level.fine_centroids[order]
    buf = io.BytesIO()
    np.save(buf, centroids)
    write_bytes_atomic(run.fs, run.stage_path(STAGE, "centroids.npy"), buf.getvalue())
    identity = np.arange(c.num_experts, dtype=np.int32)
    assigned = kmeans_ray.assign_dataset(ds, n, centroids, identity, c).select_columns(
        ["key", "distance", "expert_id"])
    folder = run.stage_path(STAGE, "assignments")
    assigned.repartition(max(1, int(np.ceil(n / c.rows_per_file)))).write_parquet(
        folder, filesystem=pyarrow_filesystem(run.fs), partition_cols=["expert_id"],
        mode=SaveMode.OVERWRITE)
    rows_out = count_rows(run.fs, folder)
    if rows_out != n:
        raise RuntimeError(f"[onestep] assigned {n} rows but wrote {rows_out}")
    sizes = {str(e): count_rows(run.fs, f"{folder}/expert_id={e}") for e in identity}
    log(f"[onestep] {c.num_experts} centres straight from the embeddings: experts {sizes}")
    return StageOutput(n, rows_out, {}, {"rows_per_expert": sizes, "objective": level.stats["objective"]})


def centroids(run: RunDir) -> np.ndarray:
    """The OneStep centres, centre e being expert e's."""
    with run.fs.open(run.stage_path(STAGE, "centroids.npy"), "rb") as f:
        return np.load(io.BytesIO(f.read()))


def keys(run: RunDir, expert: int) -> np.ndarray:
    """The keys OneStep assigned to ``expert`` (read into the driver: an ablation at the
    experiment's size, not a web-scale path)."""
    folder = run.stage_path(STAGE, "assignments")
    info = pyarrow_filesystem(run.fs).get_file_info(f"{folder}/expert_id={expert}")
    if info.type != FileType.Directory:
        return np.array([], dtype=object)
    rows = read_by_expert(run.fs, folder, run.scheme, [expert], columns=["key"]).to_pandas()
    return rows["key"].to_numpy(dtype=object)
