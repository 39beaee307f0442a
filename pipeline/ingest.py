"""Read image-caption shards into one row schema on Ray Data, counting every bad record.

Sources: img2dataset webdataset tars (``{key}.jpg``, ``{key}.txt``, ``{key}.json``) or
img2dataset parquet (a key, a caption and an image-bytes column), local or ``s3://``.

Rows (see README, "Row schema"): ``key`` (str), ``caption`` (str, stripped), ``image`` (JPEG/PNG
bytes; ``b""`` where the reader was asked not to keep image bytes), ``shard`` (URI of the source
file) and ``skip_reason`` ("" for a good row, else one of ``SKIP_REASONS``). Readers never drop a
row on their own: bad records travel with their reason so that a stage can count them and still
keep every good row; ``good_rows`` filters them out.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
import ray.data
from PIL import Image
from ray.data import SaveMode
from ray.data._internal.datasource import webdataset_datasource as wds

from pipeline.config import Config, DataConfig, StorageConfig
from pipeline.rundir import RunDir, stage_hash
from pipeline.storage import expand_shards, filesystem, pyarrow_filesystem

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
STAGE = "ingest"


class _CountingReader:
    """Forward reads to a stream and count the bytes, to spot a tar cut inside a header."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.bytes_read = 0

    def read(self, n: int = -1) -> bytes:  # tarfile's stream mode only ever calls read()
        data = self._stream.read(n)
        self.bytes_read += len(data)
        return data


def _tar_members(fileobj: Any, state: dict[str, str]) -> Iterator[dict[str, Any]]:
    """(name, bytes) of each regular file, ending quietly at a cut; ``state["cut"]`` names the
    member the cut fell in. Ray's iterator raises there instead, and the exception then also
    swallows the complete sample that its key grouping was still holding."""
    tar = tarfile.open(fileobj=fileobj, mode="r|*")
    name = ""
    try:
        for info in tar:
            name = info.name
            if info.isreg():
                yield {"fname": info.name, "data": tar.extractfile(info).read()}
            name = ""
    except tarfile.ReadError:
        state["cut"] = name


class _SampleTarDatasource(wds.WebDatasetDatasource):
    """Ray's webdataset reader, with a truncated tar ending in a counted skip.

    Keeps Ray's datasource (file listing, S3 retries, key grouping) and yields every sample read
    before the cut. The sample the cut fell in is marked ``truncated_tar``: a row that was already
    partly read gets the reason, else one marker row stands for it.
    """

    def __init__(self, paths: list[str], keep_images: bool, **kwargs: Any) -> None:
        super().__init__(paths, decoder=None, **kwargs)
        self._keep_images = keep_images

    def _read_stream(self, stream, path: str) -> Iterator[pd.DataFrame]:
        counted = _CountingReader(stream)
        state: dict[str, str] = {}
        samples = wds._group_by_keys(_tar_members(counted, state), meta={"__url__": path})
        rows: list[dict[str, Any]] = []
        for sample in samples:
            rows.append(_raw_row(sample, path, self._keep_images))
            if len(rows) > _ROWS_PER_BLOCK:  # keep the last row: the cut may concern it
                yield _frame(rows[:-1])
                rows = rows[-1:]
        # tarfile ends quietly when the cut falls inside a header; a tar is whole 512-byte blocks.
        if "cut" in state or counted.bytes_read % tarfile.BLOCKSIZE != 0:
            base = wds._base_plus_ext(state.get("cut", ""))[0]
            key = base.rsplit("/", 1)[-1] if base else f"{path}#truncated"
            if rows and rows[-1]["key"] == key:
                rows[-1]["skip_reason"] = "truncated_tar"
            else:
                rows.append({"key": key, "caption": None, "image": None, "shard": path,
                             "skip_reason": "truncated_tar"})
        if rows:
            yield _frame(rows)


def _raw_row(sample: dict[str, Any], path: str, keep_images: bool) -> dict[str, Any]:
    image = next((sample[s] for s in IMAGE_SUFFIXES if s in sample), None)
    if image is not None and not keep_images:
        image = b""
    return {"key": sample["__key__"].rsplit("/", 1)[-1], "caption": sample.get("txt"),
            "image": image, "shard": path, "skip_reason": ""}


def _frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame.from_records(rows, columns=COLUMNS)


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
                 decode_images: bool = True) -> ray.data.Dataset:
    """All rows of the shards at ``uri`` with their ``skip_reason`` (good rows have "").

    Args:
        uri: a folder, prefix, glob or single file; local or ``s3://``.
        data: the format and, for parquet, the column names.
        storage: the S3 endpoint and region, if any.
        keep_images: False keeps only the presence of each image (``b""``), for stages that
            need captions alone; the bytes still stream past but are not kept.
        decode_images: check that each image decodes (needs ``keep_images``).
    """
    fs, _ = filesystem(uri, storage)
    if data.format == "webdataset":
        paths = expand_shards(uri, storage, (".tar",))
        source = _SampleTarDatasource([_strip(p) for p in paths], keep_images, filesystem=fs)
        ds = ray.data.read_datasource(source)
    else:
        paths = expand_shards(uri, storage, (".parquet",))
        cols = [data.key_column, data.caption_column, data.image_column]
        ds = ray.data.read_parquet([_strip(p) for p in paths], filesystem=fs, columns=cols,
                                   include_paths=True)
        ds = ds.map_batches(_parquet_rows, batch_format="pandas",
                            fn_kwargs={"data": data, "keep_images": keep_images})
    return ds.map_batches(validate_batch, batch_format="pandas",
                          fn_kwargs={"decode_images": decode_images and keep_images})


def _strip(uri: str) -> str:
    return uri[len("s3://"):] if uri.startswith("s3://") else uri


def _parquet_rows(batch: pd.DataFrame, data: DataConfig, keep_images: bool) -> pd.DataFrame:
    images = batch[data.image_column].tolist()
    if not keep_images:
        images = [None if im is None else b"" for im in images]
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


def _tally(ds: ray.data.Dataset) -> pd.DataFrame:
    """Rows per (shard, skip_reason), summed from one small table per block: no shuffle."""
    def per_block(batch: pd.DataFrame) -> pd.DataFrame:
        return batch.groupby(["shard", "skip_reason"]).size().rename("n").reset_index()

    parts = ds.map_batches(per_block, batch_format="pandas").to_pandas()
    return parts.groupby(["shard", "skip_reason"], as_index=False)["n"].sum()


def good_rows(ds: ray.data.Dataset) -> ray.data.Dataset:
    """Only the rows with no skip reason."""
    return ds.map_batches(_good, batch_format="pandas")


def run_stage(cfg: Config, run: RunDir, data_uri: str, force: bool = False,
              log=print) -> dict[str, Any]:
    """The ``ingest`` stage: validate every sample and write the sample index.

    Writes ``ingest/samples/*.parquet`` (key, caption, shard: every good row),
    ``ingest/skipped/*.parquet`` (key, shard, skip_reason: every bad record) and the manifest.
    Images are decoded once here to find corrupt ones; their bytes are not copied.
    """
    inputs = {"data": data_uri, "format": cfg.data.format}
    config_hash = stage_hash(cfg, ("data",), inputs)
    done = run.completed(STAGE, config_hash)
    if done and not force:
        log(f"[ingest] complete for this config ({run.stage_uri(STAGE)}): skipped")
        return done
    started = run.begin(STAGE)
    ds = read_samples(data_uri, cfg.data, cfg.storage).drop_columns(["image"]).materialize()
    tally = _tally(ds)
    reasons = tally.groupby("skip_reason")["n"].sum().to_dict()
    rows_out = reasons.pop("", 0)
    unknown = set(reasons) - set(SKIP_REASONS)
    if unknown:
        raise RuntimeError(f"ingest produced skip reasons outside SKIP_REASONS: {sorted(unknown)}")
    fs = pyarrow_filesystem(run.fs)
    ds.map_batches(_good, batch_format="pandas").select_columns(["key", "caption", "shard"]) \
        .write_parquet(run.stage_path(STAGE, "samples"), filesystem=fs, mode=SaveMode.OVERWRITE)
    ds.map_batches(_bad, batch_format="pandas").select_columns(["key", "shard", "skip_reason"]) \
        .write_parquet(run.stage_path(STAGE, "skipped"), filesystem=fs, mode=SaveMode.OVERWRITE)
    per_shard = tally.groupby("shard")["n"].sum()
    stats = {"shards": len(per_shard),
             "rows_per_shard": {"min": int(per_shard.min()), "max": int(per_shard.max())}}
    return run.finish(STAGE, config_hash=config_hash, inputs=inputs, rows_in=int(tally["n"].sum()),
                      rows_out=rows_out, rows_skipped=reasons, started_at=started, stats=stats)
