"""Stage ``assignments``: every embedded sample gets a fine cluster and an expert.

Streams ``embeddings/`` in blocks of ``cluster.block_rows`` and writes (docs/stages.md, "The run directory")::

    assignments/expert_id=<e>/*.parquet   key: string, fine_id: int32, expert_id: int32,
                                          distance: float32 (L2 to the fine centre)
    assignments/_sizes.png                 histogram of fine-cluster sizes, bar chart of experts

With ``cluster.balanced`` every block is assigned under per-centre capacities of
(1 + ``cluster.capacity_slack``) times the block's rows per centre, so the full data stays
balanced, not only the fit sample. A row's block is decided by its key's hash, and a block's rows
are assigned in key order: the same embeddings give the same assignments however they are laid
out in files or delivered by Ray Data (docs/bad_input.md, "Killed jobs"). Files hold about
``cluster.rows_per_file`` rows. The manifest holds the rows per expert and per fine cluster; the
write replaces earlier files (a rerun never duplicates rows).
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import ray.data
from ray.data import SaveMode

from pipeline.clustering import clusters, kmeans_ray
from pipeline.core.config import ConfigView
from pipeline.core.rundir import RunDir, StageOutput
from pipeline.core.storage import pyarrow_filesystem, write_bytes_atomic
from pipeline.core.tables import count_rows, read_by_expert

STAGE = "assignments"


def _fine_counts(batch: pd.DataFrame) -> pd.DataFrame:
    return batch.groupby("fine_id", as_index=False).agg(n=("key", "size"),
                                                         distance=("distance", "sum"))


def plot_sizes(fine_counts: np.ndarray, expert_counts: np.ndarray,
               expert_ids: np.ndarray | None = None) -> bytes:
    """PNG: histogram of fine-cluster sizes and bar chart of expert sizes."""
    import matplotlib  # late import: 0.6 s, kept out of the Ray workers that import this module

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.hist(fine_counts, bins=min(50, max(10, len(fine_counts) // 8)), color="#4472c4")
    a.axvline(fine_counts.mean(), color="k", ls="--", lw=1, label=f"mean {fine_counts.mean():.0f}")
    a.set(title=f"{len(fine_counts)} fine clusters", xlabel="samples per fine cluster",
          ylabel="fine clusters")
    a.legend()
    ids = np.arange(len(expert_counts)) if expert_ids is None else np.asarray(expert_ids)
    b.bar(np.arange(len(expert_counts)), expert_counts, color="#ed7d31")
    b.set(title=f"{len(expert_counts)} experts", xlabel="expert_id", ylabel="samples")
    b.set_xticks(np.arange(len(expert_counts)), [str(e) for e in ids])
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def run(cfg: ConfigView, run: RunDir, upstream: dict[str, Any], log=print) -> StageOutput:
    """Assign every row of ``embeddings/`` with the fitted centres; write ``assignments/``."""
    arrays = clusters.load(run, generations=[])
    ds = ray.data.read_parquet(run.stage_uri("embeddings"), filesystem=pyarrow_filesystem(run.fs))
    return assign_and_write(run, ds, int(upstream["embeddings"]["rows_out"]),
                            arrays["fine_centroids"], arrays["fine_to_expert"], cfg.cluster, log)


def assign_and_write(run: RunDir, ds: ray.data.Dataset, rows_in: int, fine: np.ndarray,
                     fine_to_expert: np.ndarray, c: Any, log=print, fine_offset: int = 0) -> StageOutput:
    """Assign the rows of ``ds`` (key, embedding) to ``fine`` (balanced per ``c.balanced``) and
    write ``assignments/`` by expert. A generation (docs/growth.md) passes its own new centres,
    their expert ids and ``fine_offset``, the fine id its first centre has in the run."""
    experts = np.unique(fine_to_expert)
    assigned = kmeans_ray.assign_dataset(ds, rows_in, fine, fine_to_expert, c).materialize()
    tally = assigned.map_batches(_fine_counts, batch_format="pandas").to_pandas()
    fine_counts = np.zeros(len(fine), np.int64)
    np.add.at(fine_counts, tally["fine_id"].to_numpy(), tally["n"].to_numpy())
    expert_counts = np.array([fine_counts[fine_to_expert == e].sum() for e in experts], np.int64)
    if fine_offset:
        assigned = assigned.map_batches(_shift_fine, batch_format="pyarrow",
                                        fn_kwargs={"offset": fine_offset})
    # A partition per expert; repartition first so each expert gets few files, not one per block.
    assigned.repartition(max(1, int(np.ceil(rows_in / c.rows_per_file)))) \
        .write_parquet(run.stage_path(STAGE), filesystem=pyarrow_filesystem(run.fs),
                       partition_cols=["expert_id"], mode=SaveMode.OVERWRITE)
    rows_out = count_rows(run.fs, run.stage_path(STAGE))
    if rows_out != int(fine_counts.sum()):
        raise RuntimeError(f"[assignments] tallied {int(fine_counts.sum())} rows but wrote {rows_out}")
    write_bytes_atomic(run.fs, run.stage_path(STAGE, "_sizes.png"),
                       plot_sizes(fine_counts, expert_counts, experts))
    mean = fine_counts.mean()
    stats = {
        "balanced": c.balanced,
        "capacity_slack": c.capacity_slack,
        "rows_per_expert": {str(e): int(v) for e, v in zip(experts, expert_counts, strict=True)},
        "rows_per_fine_cluster": fine_counts.tolist(),
        "first_fine_id": fine_offset,
        "fine_sizes": {"min": int(fine_counts.min()), "max": int(fine_counts.max()),
                       "mean": float(mean), "cv": float(fine_counts.std() / mean),
                       "max_over_mean": float(fine_counts.max() / mean),
                       "empty": int((fine_counts == 0).sum())},
        "mean_distance": float(tally["distance"].sum() / max(rows_out, 1)),
    }
    sizes = stats["fine_sizes"]
    log(f"[assignments] fine clusters {sizes['min']}..{sizes['max']} rows (cv {sizes['cv']:.3f}), "
        f"experts {stats['rows_per_expert']}; plot: {run.stage_uri(STAGE, '_sizes.png')}")
    return StageOutput(rows_in, rows_out, {}, stats)


def _shift_fine(batch: pa.Table, offset: int) -> pa.Table:
    i = batch.schema.get_field_index("fine_id")
    shifted = pa.array(batch.column(i).to_numpy(zero_copy_only=False) + np.int32(offset), pa.int32())
    return batch.set_column(i, "fine_id", shifted)


def read(run: RunDir, experts: list[int] | None = None) -> ray.data.Dataset:
    """The assignments as a Ray Dataset (optionally only some experts' partitions)."""
    return read_by_expert(run.fs, run.stage_path(STAGE), run.scheme, experts)


_STOP = frozenset("a an the of on in at with and or to for by from is are this that it its as".split())


def top_words(captions: pd.Series, n: int = 6) -> list[tuple[str, int]]:
    """The most frequent words of some captions (lower-cased, common English words dropped)."""
    words = captions.str.lower().str.findall(r"[a-z][a-z0-9'-]+").explode().dropna()
    counts = words[~words.isin(_STOP)].value_counts()
    return [(w, int(c)) for w, c in counts.head(n).items()]


def expert_summary(run: RunDir, n_words: int = 6) -> pd.DataFrame:
    """Per expert: samples and most frequent caption words. Reads the run's assignments and
    ingest/samples into pandas on the driver: for the demo and small runs."""
    a = read(run).select_columns(["key", "expert_id"]).to_pandas()
    captions = ray.data.read_parquet(run.stage_uri("ingest", "samples"),
                                     filesystem=pyarrow_filesystem(run.fs),
                                     columns=["key", "caption"]).to_pandas()
    merged = a.merge(captions, on="key", how="left")
    rows = []
    for e, group in merged.groupby("expert_id"):
        words = top_words(group["caption"].dropna(), n_words)
        rows.append({"expert_id": int(e), "samples": len(group),
                     "top_words": ", ".join(w for w, _ in words)})
    return pd.DataFrame(rows)
