"""Stage ``embeddings``: every good caption embedded by the clustering encoder, on Ray Data.

Shards are read captions-only (image bytes stream past, nothing is decoded), bad records are
counted by reason, and captions go through ``CaptionEncoder`` in an actor pool. Output, one row
per good sample (README, "Run directory")::

    embeddings/*.parquet    key: string, embedding: fixed_size_list<float32>[d], unit L2 norm

The counts come from a small counter actor that every batch reports to, and ``rows_out`` is
read back from the written files' metadata, so the manifest's arithmetic checks the write too.
"""

from __future__ import annotations

import collections
import time
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import ray
import ray.data
from ray.data import ActorPoolStrategy, SaveMode

from pipeline.config import Config, EmbedConfig
from pipeline.encoders import CaptionEncoder
from pipeline.ingest import read_samples
from pipeline.rundir import RunDir, stage_hash
from pipeline.storage import pyarrow_filesystem

STAGE = "embeddings"


@ray.remote(num_cpus=0)
class Counter:
    """Sums the counts that map tasks and actors report, one call per batch."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()

    def add(self, counts: dict[str, int]) -> None:
        self.counts.update({k: int(v) for k, v in counts.items()})

    def totals(self) -> dict[str, int]:
        return dict(self.counts)


def embedding_table(keys: Any, emb: np.ndarray) -> pa.Table:
    """The embeddings schema: ``key`` string, ``embedding`` fixed_size_list<float32>[d]."""
    emb = np.ascontiguousarray(emb, np.float32)
    values = pa.array(emb.reshape(-1), pa.float32())
    return pa.table({"key": pa.array(np.asarray(keys, dtype=object), pa.string()),
                     "embedding": pa.FixedSizeListArray.from_arrays(values, emb.shape[1])})


def embedding_matrix(table: pa.Table, column: str = "embedding") -> np.ndarray:
    """(n, d) float32 view of a fixed-size-list column (no copy for a single chunk)."""
    col = table.column(column).combine_chunks()
    if col.type.num_fields != 1 or not pa.types.is_fixed_size_list(col.type):
        raise TypeError(f"column {column!r} must be fixed_size_list<float32>, got {col.type}")
    d = col.type.list_size
    return col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), d)


def _keep_good(batch: pd.DataFrame, counter: ray.actor.ActorHandle) -> pd.DataFrame:
    reasons = batch["skip_reason"].value_counts().to_dict()
    ray.get(counter.add.remote({"rows_in": len(batch),
                                **{f"skip:{k}": v for k, v in reasons.items() if k}}))
    return batch.loc[batch["skip_reason"] == "", ["key", "caption"]]


class _EmbedBatches:
    """The actor of the pool: one encoder, its caption cache, and counts sent per batch."""

    def __init__(self, model: str, batch_size: int, cache_size: int,
                 counter: ray.actor.ActorHandle | None) -> None:
        self.encoder = CaptionEncoder(model, batch_size=batch_size, cache_size=cache_size)
        self.counter = counter

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        before = self.encoder.encoded
        emb = self.encoder.encode(batch["caption"].tolist())
        if self.counter is not None:
            ray.get(self.counter.add.remote({"embedded": len(emb),
                                             "encoded": self.encoder.encoded - before}))
        return embedding_table(batch["key"], emb)


def embed_dataset(ds: ray.data.Dataset, cfg: EmbedConfig,
                  counter: ray.actor.ActorHandle | None = None) -> ray.data.Dataset:
    """Map rows with ``key`` and ``caption`` to rows with ``key`` and ``embedding``.

    The encoder runs in an actor pool of up to ``cfg.num_actors`` actors, each with
    ``cfg.num_cpus_per_actor`` CPUs and ``cfg.num_gpus_per_actor`` GPUs; each call gets
    ``cfg.rows_per_call`` rows, encoded ``cfg.batch_size`` captions at a time.
    """
    return ds.map_batches(
        _EmbedBatches,
        fn_constructor_kwargs={"model": cfg.model, "batch_size": cfg.batch_size,
                               "cache_size": cfg.cache_size, "counter": counter},
        compute=ActorPoolStrategy(min_size=1, max_size=cfg.num_actors),
        num_cpus=cfg.num_cpus_per_actor, num_gpus=cfg.num_gpus_per_actor or None,
        batch_size=cfg.rows_per_call, batch_format="numpy")


def count_rows(run: RunDir, stage: str, *parts: str) -> int:
    """Rows in the parquet files under a stage folder, from their footers."""
    files = [p for p in run.fs.find(run.stage_path(stage, *parts)) if p.endswith(".parquet")]
    if not files:
        return 0
    return pads.dataset(files, filesystem=pyarrow_filesystem(run.fs), format="parquet").count_rows()


def run_stage(cfg: Config, run: RunDir, data_uri: str, force: bool = False,
              log=print) -> dict[str, Any]:
    """Read the shards at ``data_uri``, embed every good caption, write ``embeddings/``."""
    inputs = {"data": data_uri, "format": cfg.data.format}
    config_hash = stage_hash(cfg, ("data", "embed"), inputs)
    done = run.completed(STAGE, config_hash)
    if done and not force:
        log(f"[embed] complete for this config ({run.stage_uri(STAGE)}): skipped")
        return done
    started = run.begin(STAGE)
    t0 = time.perf_counter()
    counter = Counter.remote()
    ds = read_samples(data_uri, cfg.data, cfg.storage, keep_images=False, decode_images=False)
    ds = ds.map_batches(_keep_good, batch_format="pandas", fn_kwargs={"counter": counter})
    ds = embed_dataset(ds, cfg.embed, counter)
    ds.write_parquet(run.stage_path(STAGE), filesystem=pyarrow_filesystem(run.fs),
                     mode=SaveMode.OVERWRITE, min_rows_per_file=cfg.embed.rows_per_file)
    seconds = time.perf_counter() - t0
    totals = ray.get(counter.totals.remote())
    rows_out = count_rows(run, STAGE)
    if rows_out != totals.get("embedded", 0):
        raise RuntimeError(f"[embed] {totals.get('embedded', 0)} rows embedded but {rows_out} "
                           "rows in the written files (a retried task, or files from elsewhere?)")
    skipped = {k.split(":", 1)[1]: v for k, v in totals.items() if k.startswith("skip:")}
    stats = {"model": cfg.embed.model, "dim": _dim(run),
             "captions_encoded": totals.get("encoded", 0),
             "duplicate_captions_reused": rows_out - totals.get("encoded", 0),
             "seconds": round(seconds, 2), "rows_per_second": round(rows_out / seconds, 1)}
    return run.finish(STAGE, config_hash=config_hash, inputs=inputs,
                      rows_in=totals.get("rows_in", 0), rows_out=rows_out, rows_skipped=skipped,
                      started_at=started, stats=stats)


def _dim(run: RunDir) -> int:
    schema = pads.dataset(run.stage_path(STAGE), filesystem=pyarrow_filesystem(run.fs),
                          format="parquet").schema
    return int(schema.field("embedding").type.list_size)
