"""Stage ``embeddings``: every good caption embedded by the clustering encoder, on Ray Data.

Reads the captions of ``ingest/samples`` (ingest's good rows: no shard is read again, no image
bytes travel) and embeds them with ``CaptionEncoder`` in an actor pool. Output, one row per good
sample (docs/stages.md, "The run directory")::

    embeddings/*.parquet    key: string, embedding: fixed_size_list<float32>[d], unit L2 norm

The counts come from a small counter actor that every batch reports to, and ``rows_out`` is read
back from the written files' metadata, so the manifest's arithmetic checks the write too. Should
the counter actor die mid-stage (``CountsLost``), the write is checked against the rows read
instead (one embedding per caption), and ``captions_encoded``, which only the encoders know, is
recorded as unknown (null).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray.data
from ray.data import ActorPoolStrategy, SaveMode

from pipeline.core.config import ConfigView, EmbedConfig, parse_resources
from pipeline.core.console import CountsLost, Progress, Tally
from pipeline.core.rundir import RunDir, StageOutput
from pipeline.core.storage import filesystem, pyarrow_filesystem, scheme
from pipeline.core.tables import count_rows, embedding_table, parquet_files, parquet_schema
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


def run(cfg: ConfigView, run: RunDir, upstream: dict[str, Any], log=print,
        source: str | None = None) -> StageOutput:
    """Embed the caption of every good sample of ``ingest/``; write ``embeddings/``. With
    ``source``, import the embeddings found there instead (``import_embeddings``)."""
    if source is not None:
        return import_embeddings(cfg, run, upstream, source, log)
    rows_in = int(upstream["ingest"]["rows_out"])
    counter = Tally()
    ds = ray.data.read_parquet(run.stage_uri("ingest", "samples"), columns=["key", "caption"],
                               filesystem=pyarrow_filesystem(run.fs))
    ds = embed_dataset(ds, cfg.embed, counter)

    with Progress("embeddings", lambda: counter.get("embedded"), rows_in, unit="captions", say=log):
        ds.write_parquet(run.stage_path("embeddings"), filesystem=pyarrow_filesystem(run.fs),
                         mode=SaveMode.OVERWRITE, min_rows_per_file=cfg.embed.rows_per_file)
    try:
        totals: dict[str, int] | None = counter.totals()
    except CountsLost as e:
        totals = None
        log(f"[embeddings] the stage's counts are incomplete ({e}): the written rows are checked "
            "against the rows read instead, and captions_encoded is unknown")
    counter.close()
    rows_out = count_rows(run.fs, run.stage_path("embeddings"))
    embedded = rows_in if totals is None else totals.get("embedded", 0)
    if rows_out != embedded:
        raise RuntimeError(f"[embeddings] {embedded} rows {'read' if totals is None else 'embedded'} "
                           f"but {rows_out} rows in the written files (a retried task, or files "
                           "from elsewhere?)")
    schema = parquet_schema(run.fs, run.stage_path("embeddings"))
    encoded = None if totals is None else totals.get("encoded", 0)
    stats = {"model": cfg.embed.model, "dim": int(schema.field("embedding").type.list_size),
             "captions_encoded": encoded,
             "duplicate_captions_reused": None if encoded is None else rows_out - encoded}
    log(f"[embeddings] {rows_out:,} captions, {'?' if encoded is None else f'{encoded:,}'} "
        f"distinct through {cfg.embed.model} ({stats['dim']}-d)")
    return StageOutput(rows_in, rows_out, {}, stats)


# ----------------------------------------------------------------------------- bring your own
# Why an imported row is left out (manifest rows_skipped; a key ingest did not keep is counted
# in the stats instead: it is not one of the stage's input rows).
NO_EMBEDDING, NOT_FINITE, ZERO, WRONG_DIM = ("no_embedding", "embedding_not_finite",
                                             "embedding_zero", "embedding_wrong_dim")


def source_files(source: str, storage: Any) -> tuple[Any, list[str]]:
    """The filesystem and parquet files of an import's ``source`` (a file or a folder)."""
    fs, path = filesystem(source, storage)
    files = [path] if path.endswith(".parquet") and fs.isfile(path) else parquet_files(fs, path)
    if not files:
        raise FileNotFoundError(f"--from {source}: no parquet files there")
    return fs, files


def source_dim(fs: Any, files: list[str], source: str) -> int:
    """The vectors' dimension: a fixed-size list's, else the first row's length; a clear error
    when the columns are not ``key`` (string) and ``embedding`` (a list of floats)."""
    schema = pq.read_schema(files[0], filesystem=pyarrow_filesystem(fs))
    missing = {"key", "embedding"} - set(schema.names)
    if missing:
        raise ValueError(f"--from {source}: no column {sorted(missing)} (it has {schema.names}); "
                         "an import needs `key` (the samples' keys, as ingest wrote them) and "
                         "`embedding` (a list of floats)")
    kind = schema.field("embedding").type
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)) \
            or not pa.types.is_floating(kind.value_type):
        raise ValueError(f"--from {source}: column `embedding` is {kind}, not a list of floats")
    if not (pa.types.is_string(schema.field("key").type) or pa.types.is_large_string(schema.field("key").type)):
        raise ValueError(f"--from {source}: column `key` is {schema.field('key').type}, not a string")
    if pa.types.is_fixed_size_list(kind):
        return int(kind.list_size)
    with fs.open(files[0], "rb") as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=64, columns=["embedding"]):
            lengths = [len(v) for v in batch.column(0).to_pylist() if v is not None]
            if lengths:
                return lengths[0]
    raise ValueError(f"--from {source}: the first file holds no vector")


def imported_source(run: RunDir) -> str | None:
    """The URI the run's embeddings were imported from (None: encoded, or none yet), so that a
    job running every stage keeps an import rather than encoding the captions again."""
    m = run.manifest("embeddings")
    return m["inputs"]["external"].get("source") if m else None


def check_source(cfg: ConfigView, run: RunDir, upstream: dict[str, Any],
                 source: str | None = None) -> None:
    """Before an import replaces anything: ``source`` holds parquet files with ``key`` and
    ``embedding`` columns, of the dimension ``embed.model``'s vectors have (routing embeds the
    class names with it)."""
    if source is None:
        return
    fs, files = source_files(source, cfg.storage)
    dim = source_dim(fs, files, source)
    encoder_dim = CaptionEncoder(cfg.embed.model, batch_size=1, cache_size=1).encode(["a"]).shape[1]
    if dim != encoder_dim:
        raise ValueError(f"--from {source}: the vectors are {dim}-d, but embed.model "
                         f"{cfg.embed.model!r} gives {encoder_dim}-d ones: evaluation routes by "
                         "embedding class names with embed.model, so it must name the encoder "
                         "that made these vectors (--set embed.model=...)")


class _Normalise:
    """An imported batch as (key, unit vector, why it is unusable or ""): null vectors, vectors
    of another length, non-finite or zero ones are marked, not dropped, so the sample they
    belong to is counted under its own reason."""

    def __init__(self, dim: int) -> None:
        self.dim = dim

    def __call__(self, batch: pa.Table) -> pa.Table:
        col = batch.column("embedding").combine_chunks()
        n = len(col)
        if pa.types.is_fixed_size_list(col.type):
            ok_len = np.full(n, col.type.list_size == self.dim)
        else:
            lengths = col.value_lengths().fill_null(0).to_numpy(zero_copy_only=False)
            ok_len = lengths == self.dim
        valid = col.is_valid().to_numpy(zero_copy_only=False)
        usable = ok_len & valid
        vectors = np.zeros((n, self.dim), np.float64)
        if usable.any():    # the rows of the right length, flattened: exactly dim values each
            values = col.filter(pa.array(usable)).flatten().to_numpy(zero_copy_only=False)
            vectors[usable] = np.asarray(values, np.float64).reshape(-1, self.dim)
        finite = np.isfinite(vectors).all(axis=1)
        norms = np.linalg.norm(np.where(finite[:, None], vectors, 0.0), axis=1)
        why = np.where(~valid, NO_EMBEDDING, np.where(~ok_len, WRONG_DIM, np.where(
            ~finite, NOT_FINITE, np.where(norms == 0, ZERO, ""))))
        unit = np.where((why == "")[:, None], vectors / np.maximum(norms, 1e-300)[:, None], 0.0)
        table = embedding_table(batch.column("key").to_numpy(zero_copy_only=False), unit)
        return table.append_column("unusable", pa.array(why.astype(object), pa.string()))


def _classes(batch: pa.Table) -> tuple[np.ndarray, dict[str, int]]:
    """After the full outer join of ingest's keys with the imported rows: which rows are the
    usable rows of kept samples, and counts of everything else."""
    kept = batch.column("kept").is_valid().to_numpy(zero_copy_only=False)
    imported = batch.column("embedding").is_valid().to_numpy(zero_copy_only=False)
    why = np.asarray(batch.column("unusable").fill_null("").to_pylist(), dtype=object)
    good = kept & imported & (why == "")
    counts = {"unknown_keys": int((imported & ~kept).sum()), "written": int(good.sum())}
    for reason in (NO_EMBEDDING, NOT_FINITE, ZERO, WRONG_DIM):     # a null vector: none
        counts[reason] = int((kept & imported & (why == reason)).sum())
    counts[NO_EMBEDDING] += int((kept & ~imported).sum())
    return good, counts


def _classify(batch: pa.Table, counter: Tally) -> pa.Table:
    """The usable rows of a joined batch; its counts go to ``counter``."""
    good, counts = _classes(batch)
    keys = batch.column("key").to_pylist()
    counter.add(counts, key=f"{keys[0]}|{keys[-1]}|{len(keys)}" if keys else None)
    return batch.filter(pa.array(good)).select(["key", "embedding"])


def _class_counts(batch: pa.Table) -> pa.Table:
    return pa.table({k: [v] for k, v in _classes(batch)[1].items()})


def import_embeddings(cfg: ConfigView, run: RunDir, upstream: dict[str, Any], source: str,
                      log=print) -> StageOutput:
    """Precomputed caption embeddings at ``source`` as the ``embeddings`` stage: joined with the
    keys ingest kept (a hash join on Ray Data, no table on the driver), normalised, counted.

    The dimension must be that of ``embed.model``'s vectors, which routing embeds class names
    with; a key that appears twice in ``source`` is an error (which vector would be meant?)."""
    rows_in = int(upstream["ingest"]["rows_out"])
    # the stage row's check (check_source) has compared the dimension with embed.model's
    fs, files = source_files(source, cfg.storage)
    dim = source_dim(fs, files, source)
    log(f"[embeddings] importing {len(files)} file(s) of {dim}-d vectors from {source}")
    counter = Tally()
    kept = ray.data.read_parquet(run.stage_uri("ingest", "samples"), columns=["key"],
                                 filesystem=pyarrow_filesystem(run.fs)) \
        .map_batches(lambda b: b.append_column("kept", pa.array(np.ones(len(b), bool))),
                     batch_format="pyarrow")
    imported = ray.data.read_parquet([f"{scheme(source)}{f}" for f in files],
                                     columns=["key", "embedding"], filesystem=pyarrow_filesystem(fs)) \
        .map_batches(_Normalise, fn_constructor_kwargs={"dim": dim}, batch_format="pyarrow",
                     batch_size=cfg.embed.rows_per_call,   # its float64 copies stay bounded
                     compute=ActorPoolStrategy(min_size=1, max_size=cfg.embed.num_actors))
    parts = max(1, int(np.ceil(rows_in / cfg.embed.rows_per_file)))
    joined = kept.join(imported, join_type="full_outer", num_partitions=parts, on=("key",))
    with Progress("embeddings", lambda: counter.get("written"), rows_in, unit="rows", say=log):
        joined.map_batches(_classify, fn_kwargs={"counter": counter}, batch_format="pyarrow") \
            .write_parquet(run.stage_path("embeddings"), filesystem=pyarrow_filesystem(run.fs),
                           mode=SaveMode.OVERWRITE, min_rows_per_file=cfg.embed.rows_per_file)
    try:
        totals = counter.totals()
    except CountsLost as e:     # the skip counts go into the manifest: count them again
        log(f"[embeddings] the stage's counts are incomplete ({e}): counting the join again")
        counts = joined.map_batches(_class_counts, batch_format="pyarrow").to_pandas()
        totals = {name: int(n) for name, n in counts.sum().items()}
    counter.close()
    rows_out = count_rows(run.fs, run.stage_path("embeddings"))
    skipped = {r: totals.get(r, 0) for r in (NO_EMBEDDING, NOT_FINITE, ZERO, WRONG_DIM) if totals.get(r)}
    if rows_out != totals.get("written", 0):
        raise RuntimeError(f"[embeddings] {totals.get('written', 0)} rows imported but {rows_out} "
                           "rows in the written files (a retried task, or files from elsewhere?)")
    if rows_out + sum(skipped.values()) > rows_in:
        raise ValueError(f"--from {source}: {rows_out + sum(skipped.values()) - rows_in:,} rows "
                         "repeat a key that another row holds: give each caption one vector")
    stats = {"model": cfg.embed.model, "dim": dim, "imported_from": source,
             "unknown_keys": totals.get("unknown_keys", 0), "captions_encoded": 0,
             "duplicate_captions_reused": 0}
    log(f"[embeddings] imported {rows_out:,} vectors from {source}; {stats['unknown_keys']:,} "
        f"keys ingest did not keep left out; skipped {skipped or 'none'}")
    return StageOutput(rows_in, rows_out, skipped, stats)
