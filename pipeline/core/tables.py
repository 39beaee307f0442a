"""Arrow and parquet helpers that several stages share: the embedding matrix column, row counts
from parquet footers, and reading an artifact partitioned by ``expert_id``: some partitions as
Ray Data reads them (``read_by_expert``), or every partition in a seeded mixed order
(``read_mixed``)."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import ray.data
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, Partitioning, ReadTask

from pipeline.core.storage import pyarrow_filesystem


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


# ----------------------------------------------------------------------------- the mixed read
PARTITION = "expert_id"
# Uncompressed bytes of one block of the mixed read. A task holds about three (the round's slices,
# their permuted copy, the batches being read): measured on two files of 200 MB in one row group
# each, arrow's peak was 110 MB in 32 MiB rounds, 1.2 GB read in one.
ROUND_BYTES = 32 * 2**20
# Bytes each column of an open file reads ahead. Arrow reads a whole column chunk at once
# otherwise, and Ray writes a training_data file as one row group: a task holding its group's
# files open would hold them whole.
READ_BUFFER = 2 * 2**20
# Files per read task, per partition: a group of twice as many files as partitions holds a file
# or more of every partition with half an average share of the rows or more.
FILES_PER_PARTITION = 2
# Footers read at once when listing a folder: on S3 each is a request of its own.
FOOTER_THREADS = 16


@dataclasses.dataclass(frozen=True)
class PartFile:
    """One parquet file of a folder partitioned by ``expert_id``, from its footer."""
    path: str
    expert: int
    rows: int
    nbytes: int     # uncompressed bytes of the columns read


def read_mixed(fs: fsspec.AbstractFileSystem, path: str, seed: int,
               columns: list[str] | None = None, cpus: float | None = None) -> ray.data.Dataset:
    """Every partition of a folder written with ``partition_cols=["expert_id"]``, as a Ray
    Dataset whose blocks each mix the partitions in proportion to their rows, from the first
    block on, whatever the folder's size. ``expert_id`` (int64) and ``columns`` as
    ``read_by_expert`` gives them; ``cpus``: what each read task reserves (1 when None).

    Why: Ray Data's parquet read lists the folder a partition after another and packs
    consecutive files into blocks of up to 128 MiB. Measured on 4 partitions of 235 to 330 MB
    (1.1 GB; tests/test_data_order.py, with a 300 MB object store), the first 20 batches of 128
    rows, through a local shuffle buffer of 2,048 rows, were one expert each, in 9 tries of 9. Its
    ``shuffle="files"`` draws the files in a random order, which mixes while a block packs
    many files; but a training_data file (``train.rows_per_file`` samples with their images,
    hundreds of MB) is a block of its own, and a shuffle buffer then mixes a few files: with
    every file its own block, the first 20 batches held rows of 4 files, one expert up to 58%
    of a batch (30% of the rows). A global shuffle would mix everything, at the price of
    holding or spilling the whole table.

    The order (``interleave``, ``mixed_groups``): the files, listed with their row counts
    from their footers, are put in a seeded stratified order in which every run of consecutive
    files holds each partition's share of its rows within two files; the order is cut into groups of
    at least twice as many files as there are partitions, one read task each. A task opens its
    group's files and reads them in rounds, each round a slice of every file in proportion to
    its rows, permuted (``_mixed_blocks``): every block holds every partition that the group
    does, in the group's proportions, and the groups' proportions are the folder's within two
    files each.

    Memory per task: about three blocks (``ROUND_BYTES`` of uncompressed rows each) and a read
    buffer per open column of its files (``READ_BUFFER``), not the files themselves. The driver reads
    the footers only (``FOOTER_THREADS`` at a time).

    What is deterministic for a seed: the groups, the rounds and the rows of each task's
    blocks, in order. What is not: Ray Data hands on the blocks of tasks running at once in the
    order they finish, unless the dataset's ``DataContext.execution_options.preserve_order``
    is set (tests set it; Ray Train's ingest replaces it with the driver's). Training does not
    set it: every block is mixed already, and keeping the order would hold back finished
    blocks behind a slower task's.
    """
    files = partition_files(fs, path, columns)
    if not files:
        raise ValueError(f"no rows in the parquet files under {path}")
    groups = mixed_groups(files, seed)
    source = MixedParquetDatasource(fs, groups, columns, seed)
    return ray.data.read_datasource(source, override_num_blocks=len(groups),
                                    **({} if cpus is None else {"num_cpus": cpus}))


class MixedParquetDatasource(Datasource):
    """The read tasks of ``read_mixed``: one per group of files, whatever the parallelism asked
    (a group is what mixes the partitions)."""

    def __init__(self, fs: fsspec.AbstractFileSystem, groups: list[list[PartFile]],
                 columns: list[str] | None, seed: int) -> None:
        super().__init__()
        self.fs, self.groups, self.columns, self.seed = fs, groups, columns, seed

    def estimate_inmemory_data_size(self) -> int:
        return sum(f.nbytes for group in self.groups for f in group)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        return [ReadTask(functools.partial(_mixed_blocks, self.fs, group, self.columns, (self.seed, i)),
                         BlockMetadata(num_rows=sum(f.rows for f in group),
                                       size_bytes=sum(f.nbytes for f in group),
                                       input_files=[f.path for f in group], exec_stats=None),
                         per_task_row_limit=per_task_row_limit)
                for i, group in enumerate(self.groups)]


def partition_files(fs: fsspec.AbstractFileSystem, path: str,
                    columns: Sequence[str] | None = None) -> list[PartFile]:
    """The non-empty parquet files of every ``expert_id=<e>`` folder under ``path``, their rows
    and bytes (of ``columns``; all when None) read from their footers, a few at a time."""
    files = parquet_files(fs, path)
    experts = [_expert_of(path, f) for f in files]
    with ThreadPoolExecutor(FOOTER_THREADS) as pool:
        footers = list(pool.map(functools.partial(_footer, fs), files))
    found = [PartFile(f, e, md.num_rows, _column_bytes(md, columns))
             for f, e, md in zip(files, experts, footers, strict=True)]
    return [f for f in found if f.rows > 0]


def _expert_of(root: str, file: str) -> int:
    folder = file[len(root.rstrip("/")) + 1:].split("/")[0]
    name, _, value = folder.partition("=")
    if name != PARTITION or not value.isdigit():
        raise ValueError(f"{file}: not in an {PARTITION}=<e> folder of {root}")
    return int(value)


def _footer(fs: fsspec.AbstractFileSystem, path: str) -> pq.FileMetaData:
    with _open(fs, path) as f:
        return pq.ParquetFile(f).metadata


def _open(fs: fsspec.AbstractFileSystem, path: str):
    # No fsspec read-ahead cache: arrow buffers each column itself (READ_BUFFER), and one cache
    # shared by a file's columns, read at offsets far apart, would refetch on every switch.
    return fs.open(path, "rb", cache_type="none")


def _column_bytes(md: pq.FileMetaData, columns: Sequence[str] | None) -> int:
    wanted = None if columns is None else set(columns)
    return sum(rg.column(j).total_uncompressed_size
               for rg in (md.row_group(i) for i in range(md.num_row_groups))
               for j in range(rg.num_columns)
               if wanted is None or rg.column(j).path_in_schema.split(".")[0] in wanted)


def interleave(rows: Sequence[Sequence[int]], seed: int) -> list[tuple[int, int]]:
    """A seeded stratified order of the files of several partitions, as (partition, file)
    indices: ``rows[p][j]`` is the row count of file j of partition p.

    Each partition's files are permuted and laid end to end on [0, 1) by their rows; each file
    is placed at the same seeded fraction of its own stretch (one fraction per partition:
    systematic sampling, whose counts in an interval are off by less than one, where a fraction
    per file is off by less than two); all files are then sorted by their places. Any interval of
    that line holds its length's share of every partition's rows within one file, and every run
    of consecutive files of the order, however short, each partition's share of its rows within
    two files.
    """
    rng = np.random.default_rng(seed)
    keys, items = [], []
    for p, sizes in enumerate(rows):
        order = rng.permutation(len(sizes))
        size = np.asarray(sizes, np.float64)[order]
        start = np.cumsum(size) - size
        keys.append((start + rng.random() * size) / max(size.sum(), 1.0))
        items += [(p, int(j)) for j in order]
    return [items[i] for i in np.argsort(np.concatenate([[], *keys]), kind="stable")]


def mixed_groups(files: Sequence[PartFile], seed: int) -> list[list[PartFile]]:
    """``files`` in their interleaved order (``interleave``), cut into runs of consecutive
    files, each at least FILES_PER_PARTITION times the number of partitions long (fewer only
    when there are fewer files): one read task each."""
    experts = sorted({f.expert for f in files})
    by_expert = [[f for f in files if f.expert == e] for e in experts]
    order = [by_expert[p][j] for p, j in interleave([[f.rows for f in fs] for fs in by_expert], seed)]
    groups = max(1, len(order) // (FILES_PER_PARTITION * len(experts)))
    return [[order[i] for i in run] for run in np.array_split(np.arange(len(order)), groups)]


def _mixed_blocks(fs: fsspec.AbstractFileSystem, group: list[PartFile], columns: list[str] | None,
                  seed: tuple[int, int]) -> Iterator[pa.Table]:
    """One group's rows in rounds: each round takes the next slice of every file, each slice
    the file's share of the round (its rows / rounds), and yields their rows in a seeded
    permutation. Rounds are ROUND_BYTES each, so the task holds a few blocks and a read buffer
    per open column, not its files."""
    rng = np.random.default_rng(seed)
    rounds = max(1, math.ceil(sum(f.nbytes for f in group) / ROUND_BYTES))
    readers = [_Slices(fs, f, columns, rounds) for f in group]
    try:
        for r in range(rounds):
            table = pa.concat_tables([s.take(r) for s in readers])
            yield table.take(rng.permutation(table.num_rows))
    finally:
        for s in readers:
            s.close()


class _Slices:
    """One open file read in ``rounds`` consecutive slices of near-equal rows, with its
    ``expert_id`` as a column (int64, as Ray's hive partitioning reads it)."""

    def __init__(self, fs: fsspec.AbstractFileSystem, file: PartFile, columns: list[str] | None,
                 rounds: int) -> None:
        self.file, self.rounds = file, rounds
        self.handle = _open(fs, file.path)
        parquet = pq.ParquetFile(self.handle, buffer_size=READ_BUFFER, pre_buffer=False)
        if parquet.metadata.num_rows != file.rows:
            raise RuntimeError(f"{file.path}: {parquet.metadata.num_rows:,} rows, not the "
                               f"{file.rows:,} its footer held when listed: the folder changed")
        schema = parquet.schema_arrow
        self.names = [*schema.names, PARTITION] if columns is None else list(columns)
        read = [c for c in self.names if c != PARTITION]
        # Row groups end batches early, so a slice is cut from what is read, not batch by batch.
        self.rest = pa.schema([schema.field(c) for c in read]).empty_table()
        self.batches = parquet.iter_batches(batch_size=math.ceil(file.rows / rounds),
                                            columns=read, use_threads=False)

    def take(self, r: int) -> pa.Table:
        """Slice ``r`` of the file: rows [r * rows // rounds, (r + 1) * rows // rounds)."""
        n = (r + 1) * self.file.rows // self.rounds - r * self.file.rows // self.rounds
        parts, have = [self.rest], self.rest.num_rows
        while have < n:
            batch = next(self.batches, None)
            if batch is None:
                raise RuntimeError(f"{self.file.path}: ended {n - have:,} rows short of its footer")
            parts.append(pa.Table.from_batches([batch]))
            have += batch.num_rows
        table = pa.concat_tables(parts)
        rest = table.slice(n)
        # copied: a slice would keep the whole batch it was cut from alive until the next round
        self.rest = rest.take(np.arange(rest.num_rows))
        table = table.slice(0, n)
        expert = pa.array(np.full(n, self.file.expert, np.int64))
        return pa.table({c: expert if c == PARTITION else table.column(c) for c in self.names})

    def close(self) -> None:
        self.handle.close()
