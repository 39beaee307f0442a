"""Stage ``ingest``: read image-caption shards into one row schema on Ray Data, counting every
bad record, and write the run's sample index.

Sources: img2dataset webdataset tars (``{key}.jpg``, ``{key}.txt``, ``{key}.json``) or
img2dataset parquet (a key, a caption and an image-bytes column), local or ``s3://``.

Rows (README, "Row schema"): ``key`` (str), ``caption`` (str, stripped), ``image`` (JPEG/PNG
bytes; ``b""`` where the reader was asked not to keep image bytes), ``shard`` (URI of the source
file) and ``skip_reason`` ("" for a good row, else one of ``SKIP_REASONS``). Readers never drop a
row on their own: bad records travel with their reason so that a stage can count them and still
keep every good row.

The stage decodes every image once, to find the ones that do not decode; later stages use its
verdicts (the good rows of ``ingest/samples``) instead of decoding again.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import pyarrow.fs
import ray.data
from PIL import Image
from ray.data import SaveMode
from ray.data.datasource import FileBasedDatasource

from pipeline.config import ConfigView, DataConfig, StorageConfig
from pipeline.console import Progress, Tally
from pipeline.rundir import RunDir, StageOutput
from pipeline.storage import expand_shards, filesystem, pyarrow_filesystem, strip_scheme

SKIP_REASONS = (
    "missing_image",
    "missing_caption",
    "empty_caption",
    "caption_not_utf8",
    "corrupt_image",
    "truncated_tar",
)
IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
COLUMNS = ["key", "caption", "image", "shard", "skip_reason"]
_ROWS_PER_BLOCK = 1000


# ----------------------------------------------------------------------------- webdataset tars
def split_name(name: str) -> tuple[str, str] | None:
    """A tar member's sample key and suffix, by the webdataset rule: the key is the path up to
    the first dot of the file name, the suffix (lower-cased) everything after it. None for a
    name without both (``README``, ``.hidden``)."""
    folder, _, filename = name.rpartition("/")
    stem, dot, suffix = filename.partition(".")
    if not stem or not dot or not suffix:
        return None
    return (f"{folder}/{stem}" if folder else stem), suffix.lower()


def group_samples(members: Iterator[tuple[str, bytes]], path: str) -> Iterator[dict[str, Any]]:
    """Consecutive members that share a key, as one sample ``{"__key__": key, suffix: bytes}``.

    Webdataset requires a sample's files to be contiguous: a key that comes back after another
    one, or a suffix twice in one sample, is an error (the shard is malformed, not a bad record).
    """
    current: dict[str, Any] | None = None
    seen: set[str] = set()
    for name, data in members:
        parts = split_name(name)
        if parts is None:
            continue
        key, suffix = parts
        if current is not None and key != current["__key__"]:
            yield current
            current = None
        if current is None:
            if key in seen:
                raise ValueError(f"{path}: the files of sample {key!r} are not contiguous "
                                 "(webdataset needs each sample's files next to each other)")
            seen.add(key)
            current = {"__key__": key}
        if suffix in current:
            raise ValueError(f"{path}: sample {key!r} has two {suffix!r} files")
        current[suffix] = data
    if current is not None:
        yield current


class _CountingReader:
    """Forward reads to a stream and count the bytes, to spot a tar cut inside a header."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.bytes_read = 0

    def read(self, n: int = -1) -> bytes:  # tarfile's stream mode only ever calls read()
        data = self._stream.read(n)
        self.bytes_read += len(data)
        return data


def _tar_members(fileobj: Any, state: dict[str, str]) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each regular file, ending quietly at a cut; ``state["cut"]`` names the
    member the cut fell in, so that every complete sample before it is kept."""
    tar = tarfile.open(fileobj=fileobj, mode="r|*")
    name = ""
    try:
        for info in tar:
            name = info.name
            if info.isreg():
                yield info.name, tar.extractfile(info).read()
            name = ""
    except tarfile.ReadError:
        state["cut"] = name


class SampleTarDatasource(FileBasedDatasource):
    """Webdataset tars as rows of the row schema, on Ray Data's file-based datasource API.

    Ray lists the files, opens them (with its S3 retries) and calls ``_read_stream`` per file.
    A tar cut short ends in a counted skip: every sample read before the cut is kept, and the
    sample the cut fell in is marked ``truncated_tar`` (the partly read row gets the reason,
    else one marker row stands for it). Each finished shard is reported to ``counter``.
    """

    def __init__(self, paths: list[str], keep_images: bool, counter: Tally | None = None,
                 **kwargs: Any) -> None:
        super().__init__(paths, **kwargs)
        self._keep_images = keep_images
        self._counter = counter

    def _read_stream(self, f: pyarrow.NativeFile, path: str) -> Iterator[pd.DataFrame]:
        counted = _CountingReader(f)
        state: dict[str, str] = {}
        rows: list[dict[str, Any]] = []
        for sample in group_samples(_tar_members(counted, state), path):
            rows.append(_raw_row(sample, path, self._keep_images))
            if len(rows) > _ROWS_PER_BLOCK:  # keep the last row: the cut may concern it
                yield _frame(rows[:-1])
                rows = rows[-1:]
        # tarfile ends quietly when the cut falls inside a header; a tar is whole 512-byte blocks.
        if "cut" in state or counted.bytes_read % tarfile.BLOCKSIZE != 0:
            parts = split_name(state.get("cut", ""))
            key = parts[0].rsplit("/", 1)[-1] if parts else f"{path}#truncated"
            if rows and rows[-1]["key"] == key:
                rows[-1]["skip_reason"] = "truncated_tar"
            else:
                rows.append({"key": key, "caption": None, "image": None, "shard": path,
                             "skip_reason": "truncated_tar"})
        if rows:
            yield _frame(rows)
        if self._counter is not None:
            self._counter.add({"shards": 1})


def _raw_row(sample: dict[str, Any], path: str, keep_images: bool) -> dict[str, Any]:
    image = next((sample[s] for s in IMAGE_SUFFIXES if s in sample), None)
    if image is not None and not keep_images:
        image = b""
    return {"key": sample["__key__"].rsplit("/", 1)[-1], "caption": sample.get("txt"),
            "image": image, "shard": path, "skip_reason": ""}


def _frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame.from_records(rows, columns=COLUMNS)


# ----------------------------------------------------------------------------- validation
def validate_batch(batch: pd.DataFrame, decode_images: bool = True) -> pd.DataFrame:
    """Give every row of a raw batch its ``skip_reason``; captions become stripped ``str``.

    Checks, in order: a reader-level reason already set; image present; caption present;
    caption valid UTF-8; caption not empty after stripping whitespace; image decodes (only with
    ``decode_images``; a truncated JPEG fails here because PIL must load every pixel).
    """
    reasons = batch["skip_reason"].tolist()
    captions: list[str | None] = []
    for i, (caption, image) in enumerate(zip(batch["caption"], batch["image"], strict=True)):
        text = None
        if not reasons[i]:
            if image is None:
                reasons[i] = "missing_image"
            elif caption is None:
                reasons[i] = "missing_caption"
            else:
                text, reasons[i] = _caption_text(caption)
                if not reasons[i] and decode_images and not _decodes(image):
                    reasons[i] = "corrupt_image"
        captions.append(text if not reasons[i] else None)
    out = batch.copy()
    out["caption"] = captions
    out["skip_reason"] = reasons
    return out


def _caption_text(caption: Any) -> tuple[str | None, str]:
    if isinstance(caption, (bytes, bytearray)):
        try:
            caption = bytes(caption).decode("utf-8")
        except UnicodeDecodeError:
            return None, "caption_not_utf8"
    text = str(caption).strip()
    return (text, "") if text else (None, "empty_caption")


def _decodes(image: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(image)) as im:
            im.load()
        return True
    except Exception:  # PIL raises OSError, SyntaxError, ValueError... for broken files
        return False


def read_samples(uri: str, data: DataConfig, storage: StorageConfig, keep_images: bool = True,
                 decode_images: bool = True, counter: Tally | None = None,
                 key_prefix: str = "") -> ray.data.Dataset:
    """All rows of the shards at ``uri`` with their ``skip_reason`` (good rows have "").

    Args:
        uri: a folder, prefix, glob or single file; local or ``s3://``.
        data: the format and, for parquet, the column names.
        storage: the S3 endpoint and region, if any.
        keep_images: False keeps only the presence of each image (``b""``), for stages that
            need captions alone; the bytes still stream past but are not kept.
        decode_images: check that each image decodes (needs ``keep_images``).
        counter: a ``console.Tally`` told of each finished tar shard or parquet batch (progress).
        key_prefix: put before every key. Keys are unique within one data set only; data added
            to a run later (a generation, docs/growth.md) gets its own namespace this way.
    """
    fs, _ = filesystem(uri, storage)
    if data.format == "webdataset":
        paths = expand_shards(uri, storage, (".tar",))
        source = SampleTarDatasource([strip_scheme(p) for p in paths], keep_images, counter,
                                     filesystem=pyarrow_filesystem(fs))
        ds = ray.data.read_datasource(source)
    else:
        paths = expand_shards(uri, storage, (".parquet",))
        cols = [data.key_column, data.caption_column, data.image_column]
        ds = ray.data.read_parquet([strip_scheme(p) for p in paths], filesystem=pyarrow_filesystem(fs),
                                   columns=cols, include_paths=True)
        ds = ds.map_batches(_parquet_rows, batch_format="pandas",
                            fn_kwargs={"data": data, "keep_images": keep_images, "counter": counter})
    ds = ds.map_batches(validate_batch, batch_format="pandas",
                        fn_kwargs={"decode_images": decode_images and keep_images})
    if key_prefix:
        ds = ds.map_batches(_prefix_keys, batch_format="pandas", fn_kwargs={"prefix": key_prefix})
    return ds


def _prefix_keys(batch: pd.DataFrame, prefix: str) -> pd.DataFrame:
    out = batch.copy()
    out["key"] = prefix + out["key"].astype(str)
    return out


def _parquet_rows(batch: pd.DataFrame, data: DataConfig, keep_images: bool,
                  counter: Tally | None) -> pd.DataFrame:
    images = batch[data.image_column].tolist()
    if not keep_images:
        images = [None if im is None else b"" for im in images]
    if counter is not None:
        counter.add({"rows": len(batch)})
    return pd.DataFrame({
        "key": batch[data.key_column].astype(str),
        "caption": batch[data.caption_column].tolist(),
        "image": images,
        "shard": batch["path"],
        "skip_reason": np.full(len(batch), "", dtype=object),
    }, columns=COLUMNS)


def _good(batch: pd.DataFrame) -> pd.DataFrame:
    return batch[batch["skip_reason"] == ""]


def _bad(batch: pd.DataFrame) -> pd.DataFrame:
    return batch[batch["skip_reason"] != ""]


def good_rows(ds: ray.data.Dataset) -> ray.data.Dataset:
    """Only the rows with no skip reason."""
    return ds.map_batches(_good, batch_format="pandas")


def _tally(ds: ray.data.Dataset) -> pd.DataFrame:
    """Rows per (shard, skip_reason), summed from one small table per block: no shuffle."""
    def per_block(batch: pd.DataFrame) -> pd.DataFrame:
        return batch.groupby(["shard", "skip_reason"]).size().rename("n").reset_index()

    parts = ds.map_batches(per_block, batch_format="pandas").to_pandas()
    return parts.groupby(["shard", "skip_reason"], as_index=False)["n"].sum()


def _progress(uri: str, data: DataConfig, storage: StorageConfig, counter: Tally, log) -> Progress:
    """Shards done of all (tars), or rows read of all (parquet, counted from the footers)."""
    if data.format == "webdataset":
        total = len(expand_shards(uri, storage, (".tar",)))
        return Progress("ingest", lambda: counter.get("shards"), total, unit="shards", say=log)
    fs, _ = filesystem(uri, storage)
    total = pads.dataset([strip_scheme(p) for p in expand_shards(uri, storage, (".parquet",))],
                         filesystem=pyarrow_filesystem(fs), format="parquet").count_rows()
    return Progress("ingest", lambda: counter.get("rows"), total, unit="rows", say=log)


def run(cfg: ConfigView, run: RunDir, upstream: dict, log=print, *, data: str,
        key_prefix: str = "") -> StageOutput:
    """Validate every sample of the shards at ``data``; write the sample index.

    Writes ``ingest/samples/*.parquet`` (key, caption, shard: every good row) and
    ``ingest/skipped/*.parquet`` (key, shard, skip_reason: every bad record). Images are decoded
    once here to find corrupt ones; their bytes are not copied.
    """
    counter = Tally()
    with _progress(data, cfg.data, cfg.storage, counter, log):
        ds = read_samples(data, cfg.data, cfg.storage, counter=counter, key_prefix=key_prefix) \
            .drop_columns(["image"]).materialize()
    counter.close()
    tally = _tally(ds)
    reasons = tally.groupby("skip_reason")["n"].sum().to_dict()
    rows_out = reasons.pop("", 0)
    unknown = set(reasons) - set(SKIP_REASONS)
    if unknown:
        raise RuntimeError(f"ingest produced skip reasons outside SKIP_REASONS: {sorted(unknown)}")
    fs = pyarrow_filesystem(run.fs)
    ds.map_batches(_good, batch_format="pandas").select_columns(["key", "caption", "shard"]) \
        .write_parquet(run.stage_path("ingest", "samples"), filesystem=fs, mode=SaveMode.OVERWRITE)
    ds.map_batches(_bad, batch_format="pandas").select_columns(["key", "shard", "skip_reason"]) \
        .write_parquet(run.stage_path("ingest", "skipped"), filesystem=fs, mode=SaveMode.OVERWRITE)
    per_shard = tally.groupby("shard")["n"].sum()
    stats = {"shards": len(per_shard),
             "rows_per_shard": {"min": int(per_shard.min()), "max": int(per_shard.max())}}
    return StageOutput(int(tally["n"].sum()), int(rows_out), reasons, stats)
