"""Stage ``embeddings``: every good caption embedded by the clustering encoder, on Ray Data.

Reads the captions of ``ingest/samples`` (ingest's good rows: no shard is read again, no image
bytes travel) and embeds them with ``CaptionEncoder`` in an actor pool. Output, one row per good
sample (docs/stages.md, "The run directory")::

    embeddings/*.parquet    key: string, embedding: fixed_size_list<float32>[d], unit L2 norm

The counts come from a small counter actor that every batch reports to, and ``rows_out`` is read
back from the written files' metadata, so the manifest's arithmetic checks the write too.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import ray.data
from ray.data import ActorPoolStrategy, SaveMode

from pipeline.core.config import ConfigView, EmbedConfig, parse_resources
from pipeline.core.console import Progress, Tally
from pipeline.core.rundir import RunDir, StageOutput
from pipeline.core.storage import pyarrow_filesystem
from pipeline.core.tables import count_rows, embedding_table, parquet_schema
from pipeline.data.encoders import CaptionEncoder, release_free_memory


class _EmbedBatches:
    """The actor of the pool: one encoder, its caption cache, and counts sent per batch."""

    def __init__(self, model: str, batch_size: int, cache_size: int, counter: Tally | None) -> None:
        self.encoder = CaptionEncoder(model, batch_size=batch_size, cache_size=cache_size)
        self.counter = counter

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        before = self.encoder.encoded
        emb = self.encoder.encode(batch["caption"].tolist())
        release_free_memory()   # the call's temporaries, back to the system (docs/benchmarks.md, "Memory at scale")
        if self.counter is not None and len(emb):   # keyed: a retried batch counts once
            keys = batch["key"]
            self.counter.add({"embedded": len(emb), "encoded": self.encoder.encoded - before},
                             key=f"{keys[0]}|{keys[-1]}|{len(keys)}")
        return embedding_table(batch["key"], emb)


def embed_dataset(ds: ray.data.Dataset, cfg: EmbedConfig,
                  counter: Tally | None = None) -> ray.data.Dataset:
    """Map rows with ``key`` and ``caption`` to rows with ``key`` and ``embedding``.

    The encoder runs in an actor pool of up to ``cfg.num_actors`` actors, each with
    ``cfg.num_cpus_per_actor`` CPUs, ``cfg.num_gpus_per_actor`` GPUs and
    ``cfg.actor_resources``; each call gets
    ``cfg.rows_per_call`` rows, encoded ``cfg.batch_size`` captions at a time.
    """
    return ds.map_batches(
        _EmbedBatches,
        fn_constructor_kwargs={"model": cfg.model, "batch_size": cfg.batch_size,
                               "cache_size": cfg.cache_size, "counter": counter},
        compute=ActorPoolStrategy(min_size=1, max_size=cfg.num_actors),
        num_cpus=cfg.num_cpus_per_actor, num_gpus=cfg.num_gpus_per_actor or None,
        resources=parse_resources("embed.actor_resources", cfg.actor_resources) or None,
        batch_size=cfg.rows_per_call, batch_format="numpy")


def run(cfg: ConfigView, run: RunDir, upstream: dict[str, Any], log=print) -> StageOutput:
    """Embed the caption of every good sample of ``ingest/``; write ``embeddings/``."""
    rows_in = int(upstream["ingest"]["rows_out"])
    counter = Tally()
    ds = ray.data.read_parquet(run.stage_uri("ingest", "samples"), columns=["key", "caption"],
                               filesystem=pyarrow_filesystem(run.fs))
    ds = embed_dataset(ds, cfg.embed, counter)

    with Progress("embeddings", lambda: counter.get("embedded"), rows_in, unit="captions", say=log):
        ds.write_parquet(run.stage_path("embeddings"), filesystem=pyarrow_filesystem(run.fs),
                         mode=SaveMode.OVERWRITE, min_rows_per_file=cfg.embed.rows_per_file)
    totals = counter.totals()
    counter.close()
    rows_out = count_rows(run.fs, run.stage_path("embeddings"))
    if rows_out != totals.get("embedded", 0):
        raise RuntimeError(f"[embeddings] {totals.get('embedded', 0)} rows embedded but {rows_out} "
                           "rows in the written files (a retried task, or files from elsewhere?)")
    schema = parquet_schema(run.fs, run.stage_path("embeddings"))
    stats = {"model": cfg.embed.model, "dim": int(schema.field("embedding").type.list_size),
             "captions_encoded": totals.get("encoded", 0),
             "duplicate_captions_reused": rows_out - totals.get("encoded", 0)}
    log(f"[embeddings] {rows_out:,} captions, {stats['captions_encoded']:,} distinct through "
        f"{cfg.embed.model} ({stats['dim']}-d)")
    return StageOutput(rows_in, rows_out, {}, stats)
