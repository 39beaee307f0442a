"""Arrow and parquet helpers that several stages share: the embedding matrix column, row counts
from parquet footers, and reading an artifact partitioned by ``expert_id``."""

from __future__ import annotations

from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import ray.data
from ray.data.datasource import Partitioning

from pipeline.storage import pyarrow_filesystem


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


def parquet_files(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    """The parquet files under a folder (none when it does not exist)."""
    fs.invalidate_cache(path)   # Ray wrote there through its own handle: no stale listing
    if not fs.exists(path):
        return []
    return sorted(p for p in fs.find(path) if p.endswith(".parquet"))


def count_rows(fs: fsspec.AbstractFileSystem, path: str) -> int:
    """Rows in the parquet files under a folder, from their footers (no data is read)."""
    files = parquet_files(fs, path)
    if not files:
        return 0
    return pads.dataset(files, filesystem=pyarrow_filesystem(fs), format="parquet").count_rows()


def parquet_schema(fs: fsspec.AbstractFileSystem, path: str) -> pa.Schema:
    return pads.dataset(parquet_files(fs, path), filesystem=pyarrow_filesystem(fs),
                        format="parquet").schema


def read_by_expert(fs: fsspec.AbstractFileSystem, path: str, scheme: str,
                   experts: list[int] | None = None, columns: list[str] | None = None,
                   cpus: float | None = None) -> ray.data.Dataset:
    """A folder written with ``partition_cols=["expert_id"]`` as a Ray Dataset with an int
    ``expert_id`` column (optionally only some experts' partitions, some columns; ``cpus``: what
    each read task reserves, Ray Data's 1 CPU when None)."""
    hive = Partitioning("hive", base_dir=path, field_types={"expert_id": int})
    paths = scheme + path if experts is None else [f"{scheme}{path}/expert_id={e}" for e in experts]
    return ray.data.read_parquet(paths, filesystem=pyarrow_filesystem(fs), partitioning=hive,
                                 columns=columns,
                                 ray_remote_args={} if cpus is None else {"num_cpus": cpus})
