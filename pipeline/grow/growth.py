"""Growing a trained run: what in new data is novel, and new experts for it (docs/growth.md).

New data becomes a *generation* of the run directory, ``generations/<g>/``, a run directory of
its own whose units are declared in ``pipeline.core.stages.GENERATION_STAGES``: ``ingest`` and
``embeddings`` are the original stages' code, with keys namespaced ``<g>/``; then the three
stages of this module; then ``training_data`` (the original code again, on the novel samples)
and one training run per new expert. Nothing of the original run, or of an earlier generation,
is rewritten.

- ``novelty``: every new sample goes to its nearest fine centre of the run (the original
  clustering and the generations that added experts before this one). It is *novel* when its
  distance exceeds that centre's ``grow.novelty_quantile`` of the distances of the training
  samples nearest to it (per centre, since clusters differ in spread; a centre nearest to fewer
  than ``grow.min_rows_per_centre`` samples uses the median of the other centres' thresholds).
  Familiar samples keep that centre's expert and are counted, not trained on.
- ``new_clusters``: when at least ``grow.min_novel_rows`` samples are novel, the same balanced
  k-means as ``clusters`` fits new fine centres on them (about as many rows per centre as the
  original level) and groups them into new experts, numbered after the run's last expert
  (``new_experts``: a number, or ``"auto"``: the original rows per expert decide it).
- ``new_assignments``: every novel sample to one of the new fine centres, by expert.

The step as a whole (checks, these stages in order, the new experts' training) is
``pipeline/grow/generations.py``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import ray.data
from ray.data import SaveMode

from pipeline.clustering import assignments, clusters, kmeans, kmeans_ray
from pipeline.core.config import ConfigView
from pipeline.core.rundir import RunDir, StageOutput
from pipeline.core.storage import pyarrow_filesystem
from pipeline.core.tables import embedding_matrix
from pipeline.grow import levels

SAMPLES = "novelty/samples"     # key, fine_id, distance, threshold, novel, expert_id: every row
NOVEL = "novelty/novel"         # key, embedding: the novel rows (what the new level is fit on)


def _quantile(group: pd.DataFrame, q: float) -> pd.DataFrame:
    return pd.DataFrame({"fine_id": [int(group["fine_id"].iloc[0])], "n": [len(group)],
                         "threshold": [float(np.quantile(group["distance"], q))]})


def nearest(batch: pa.Table, fine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's nearest fine centre (int32) and its L2 distance (float32): no capacities."""
    labels, d2 = kmeans.assign_block(embedding_matrix(batch), fine, False, 0)
    return labels.astype(np.int32), np.sqrt(np.maximum(d2, 0)).astype(np.float32)


def _nearest(batch: pa.Table, fine: np.ndarray) -> pd.DataFrame:
    labels, distance = nearest(batch, fine)
    return pd.DataFrame({"fine_id": labels, "distance": distance})


def thresholds(training: list[ray.data.Dataset], fine: np.ndarray, q: float, min_rows: int,
               block_rows: int) -> tuple[np.ndarray, dict]:
    """Per fine centre, the ``q`` quantile of its training samples' distances to it.

    Each training embedding (``training``: the run's, and the novel ones of earlier
    generations) is measured to its nearest centre, as a new sample will be: the assignment's
    own distances are not, since the balanced assignment sends a sample past a full centre to a
    farther one and so widens every centre's tail. A centre nearest to fewer than ``min_rows``
    training samples gets the median threshold of the others.
    """
    parts = []
    for ds in training:
        near = ds.map_batches(_nearest, batch_format="pyarrow", batch_size=block_rows,
                              fn_kwargs={"fine": fine})
        parts.append(near.groupby("fine_id").map_groups(_quantile, batch_format="pandas",
                                                        fn_kwargs={"q": q}).to_pandas())
    table = pd.concat(parts, ignore_index=True)
    if len(training) > 1:   # a centre measured in two sets: the larger one's estimate
        table = table.sort_values("n").drop_duplicates("fine_id", keep="last")
    out = np.full(len(fine), np.nan)
    counts = np.zeros(len(fine), np.int64)
    out[table["fine_id"].to_numpy()] = table["threshold"].to_numpy()
    counts[table["fine_id"].to_numpy()] = table["n"].to_numpy()
    enough = counts >= min_rows
    if not enough.any():
        raise ValueError(f"no fine centre is nearest to {min_rows} training samples "
                         "(grow.min_rows_per_centre)")
    fallback = float(np.median(out[enough]))
    out[~enough] = fallback
    return out, {"centres_with_own_quantile": int(enough.sum()), "fallback": fallback,
                 "min": float(out.min()), "median": float(np.median(out)), "max": float(out.max())}


def _flag(batch: pa.Table, fine: np.ndarray, fine_to_expert: np.ndarray,
          limit: np.ndarray) -> pa.Table:
    labels, distance = nearest(batch, fine)
    threshold = limit[labels].astype(np.float32)
    return pa.table({"key": batch.column("key"), "embedding": batch.column("embedding"),
                     "fine_id": pa.array(labels), "distance": pa.array(distance),
                     "threshold": pa.array(threshold), "novel": pa.array(distance > threshold),
                     "expert_id": pa.array(fine_to_expert[labels].astype(np.int32))})


def _novel(batch: pa.Table) -> pa.Table:
    return batch.filter(batch.column("novel")).select(["key", "embedding"])


def _tally(batch: pd.DataFrame) -> pd.DataFrame:
    return batch.groupby(["expert_id", "novel"], as_index=False).size()


def earlier(run: RunDir) -> list[str]:
    """The generations a generation's novelty is measured against: those that added experts,
    except itself."""
    return [g for g in clusters.grown(run.root) if g != run.generation_name]


def novelty(cfg: ConfigView, run: RunDir, upstream: dict[str, Any], log=print) -> StageOutput:
    """Stage ``generations/<g>/novelty``: flag each new sample novel or familiar."""
    root, g = run.root, cfg.grow
    before = earlier(run)
    arrays = clusters.load(root, before)
    fine, f2e = arrays["fine_centroids"], arrays["fine_to_expert"]
    dim = int(upstream["embeddings"]["stats"]["dim"])
    if dim != fine.shape[1]:
        raise ValueError(f"the new data's embeddings are {dim}-d but the run's fine centres are "
                         f"{fine.shape[1]}-d: embed with the run's encoder (embed.model of its "
                         "config.yaml)")
    fs = pyarrow_filesystem(run.fs)
    training = [ray.data.read_parquet(root.stage_uri("embeddings"), filesystem=fs),
                *(ray.data.read_parquet(root.generation(b).stage_uri(NOVEL), filesystem=fs)
                  for b in before)]
    limit, limit_stats = thresholds(training, fine, g.novelty_quantile, g.min_rows_per_centre,
                                    cfg.cluster.block_rows)
    flagged = ray.data.read_parquet(run.stage_uri("embeddings"), filesystem=fs).map_batches(
        _flag, batch_format="pyarrow", batch_size=cfg.cluster.block_rows,
        fn_kwargs={"fine": fine, "fine_to_expert": f2e, "limit": limit}).materialize()
    flagged.drop_columns(["embedding"]).write_parquet(run.stage_path(SAMPLES), filesystem=fs,
                                                      mode=SaveMode.OVERWRITE)
    flagged.map_batches(_novel, batch_format="pyarrow").write_parquet(
        run.stage_path(NOVEL), filesystem=fs, mode=SaveMode.OVERWRITE)
    tally = flagged.select_columns(["expert_id", "novel"]).map_batches(_tally, batch_format="pandas") \
        .to_pandas().groupby(["expert_id", "novel"])["size"].sum()
    novel = int(sum(n for (_, is_novel), n in tally.items() if is_novel))
    familiar = {str(e): int(n) for (e, is_novel), n in tally.items() if not is_novel}
    rows = int(tally.sum())
    stats = {"novel": novel, "familiar": sum(familiar.values()), "familiar_by_expert": familiar,
             "quantile": g.novelty_quantile, "thresholds": limit_stats,
             "earlier_generations": before}
    log(f"[novelty] {rows:,} new samples: {novel:,} novel, {stats['familiar']:,} familiar "
        f"(by nearest expert {familiar}); a sample is novel beyond the {g.novelty_quantile:g} "
        f"quantile of its centre's training distances")
    return StageOutput(int(upstream["embeddings"]["rows_out"]), rows, {}, stats)


def plan_level(novel: int, base_rows: int, base_fine: int, base_experts: int,
               new_experts: int | str) -> tuple[int, int]:
    """(experts, fine centres) of a new level over ``novel`` rows: about the original rows per
    fine centre, and ``new_experts`` experts (``"auto"``: about the original rows per expert)."""
    n = max(1, round(novel * base_experts / base_rows)) if new_experts == "auto" else int(new_experts)
    k = max(n, round(novel * base_fine / base_rows))
    return n, min(k, novel)


def new_clusters(cfg: ConfigView, run: RunDir, upstream: dict[str, Any], log=print, *,
                 new_experts: int | str = "auto") -> StageOutput:
    """Stage ``generations/<g>/clusters``: the new level over the novel samples, or no expert
    (the manifest says why) when there are fewer than ``grow.min_novel_rows``."""
    root = run.root
    novel = int(upstream["novelty"]["stats"]["novel"])
    if novel < cfg.grow.min_novel_rows:
        why = (f"{novel:,} novel samples, fewer than grow.min_novel_rows={cfg.grow.min_novel_rows:,}: "
               "no new expert")
        log(f"[clusters] {why}")
        return StageOutput(novel, 0, {"too_few_novel_rows": novel}, {"experts": [], "why": why})
    base = upstream["../assignments"]
    base_rows, base_fine = int(base["rows_out"]), len(base["stats"]["rows_per_fine_cluster"])
    base_experts = len(base["stats"]["rows_per_expert"])
    n, k = plan_level(novel, base_rows, base_fine, base_experts, new_experts)
    how = f"auto: about {base_rows // base_experts:,} rows per expert" if new_experts == "auto" \
        else "as asked"
    ds = ray.data.read_parquet(run.stage_uri(NOVEL), filesystem=pyarrow_filesystem(run.fs))
    level = kmeans_ray.fit_level(ds, novel, cfg.cluster, k, n, log)
    # The ids come last, claimed once per generation: another add_experts may be numbering its
    # own level at the same moment (pipeline/grow/levels.py, docs/growth.md "Numbering").
    first, first_fine = levels.claim(root, run.generation_name, n, k,
                                     len(clusters.load_level(root, "coarse_centroids")),
                                     len(clusters.load_level(root, "fine_centroids")))
    level = kmeans_ray.numbered(level, first)
    why = (f"{novel:,} novel samples -> {k} fine centres (about {base_rows // base_fine:,} rows "
           f"each, as the original level) -> {n} new expert(s) ({how}), ids "
           f"{list(range(first, first + n))}")
    log(f"[clusters] {why}")
    clusters.save(run, level)
    stats = {**level.stats, "why": why, "first_fine_id": first_fine, "first_expert_id": first}
    return StageOutput(novel, level.stats["fit_rows"],
                       {"not_in_fit_sample": novel - level.stats["fit_rows"]}, stats)


def new_assignments(cfg: ConfigView, run: RunDir, upstream: dict[str, Any], log=print) -> StageOutput:
    """Stage ``generations/<g>/assignments``: the novel samples to the new fine centres."""
    level = upstream["clusters"]["stats"]
    if not level["experts"]:
        raise ValueError(f"{run.uri}: this generation added no expert ({level['why']})")
    arrays = {name: clusters.load_level(run, name) for name in ("fine_centroids", "fine_to_expert")}
    ds = ray.data.read_parquet(run.stage_uri(NOVEL), filesystem=pyarrow_filesystem(run.fs))
    return assignments.assign_and_write(run, ds, int(upstream["novelty"]["stats"]["novel"]),
                                        arrays["fine_centroids"], arrays["fine_to_expert"],
                                        cfg.cluster, log, fine_offset=level["first_fine_id"])


def read_novelty(run: RunDir) -> pd.DataFrame:
    """A generation's ``novelty/samples`` (small runs, tests and the demo)."""
    return ray.data.read_parquet(run.stage_uri(SAMPLES),
                                 filesystem=pyarrow_filesystem(run.fs)).to_pandas()
