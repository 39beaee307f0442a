"""Stage ``ingest``: read image-caption shards into one row schema on Ray Data, counting every
bad record, and write the run's sample index.

Sources: img2dataset webdataset tars (``{key}.jpg``, ``{key}.txt``, ``{key}.json``) or
img2dataset parquet (a key, a caption and an image-bytes column), local or ``s3://``.

Rows (docs/stages.md, "`ingest/` and the row schema"): ``key`` (str), ``caption`` (str, cleaned), ``image`` (encoded
bytes; ``b""`` where the reader was asked not to keep image bytes), ``shard`` (URI of the source
file), ``pos`` (the sample's place in its shard), ``skip_reason`` ("" for a good row, else one of
``SKIP_REASONS``), ``detail`` (why, for a skipped row) and ``fixes`` (what was repaired in a good
row, comma-separated ``FIXES``). Readers never drop a row on their own: bad records travel with
their reason so that a stage can count them and still keep every good row. What counts as bad,
and what is repaired instead: docs/bad_input.md.

The stage decodes every image once, to find the ones that do not decode; later stages use its
verdicts (the good rows of ``ingest/samples``) instead of decoding again.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq
import ray.data
from ray.data import SaveMode
from ray.data.context import ShuffleStrategy
from ray.data.datasource import FileBasedDatasource

from pipeline.core.config import ConfigView, DataConfig, StorageConfig
from pipeline.core.console import Progress, Tally
from pipeline.core.rundir import RunDir, StageOutput
from pipeline.core.storage import expand_shards, filesystem, pyarrow_filesystem, strip_scheme
from pipeline.data.images import DEFAULT_MAX_PIXELS, verdict

SKIP_REASONS = (
    "missing_image",
    "missing_caption",
    "empty_caption",
    "caption_not_utf8",
    "empty_image",
    "not_an_image",
    "image_too_large",
    "corrupt_image",
    "duplicate_key",
    "truncated_tar",
    "unreadable_shard",
    "bad_schema",
)
# What a skipped row's ``detail`` says where its check has nothing more specific.
_DETAILS = {"missing_image": "no image file in the sample", "missing_caption": "no caption",
            "empty_caption": "nothing but whitespace and control characters",
            "caption_not_utf8": "the caption's bytes are not UTF-8"}
# Repairs of a good row, counted in the manifest's stats (docs/bad_input.md).
FIXES = ("caption_truncated", "caption_control_chars", "image_not_rgb")
IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp", "gif")
COLUMNS = ["key", "caption", "image", "shard", "pos", "skip_reason", "detail", "fixes"]
_ROWS_PER_BLOCK = 1000
# Unicode's control characters (category Cc: C0, DEL, C1), NUL included. Each becomes a space.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


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


def group_samples(members: Iterator[tuple[str, bytes]]) -> Iterator[dict[str, Any]]:
    """Consecutive members that share a key, as one sample ``{"__key__": key, suffix: bytes}``.

    Webdataset keeps a sample's files next to each other. A key that comes back after another
    one, or a suffix met twice in one sample, starts a new sample with the same key: the
    stage's duplicate-key rule then keeps the first (docs/bad_input.md), and no file is lost.
    """
    current: dict[str, Any] | None = None
    for name, data in members:
        parts = split_name(name)
        if parts is None:
            continue
        key, suffix = parts
        if current is not None and (key != current["__key__"] or suffix in current):
            yield current
            current = None
        if current is None:
            current = {"__key__": key}
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
    member the cut fell in, so that every complete sample before it is kept. A file that is
    not a tar at all sets ``state["unreadable"]``."""
    try:
        tar = tarfile.open(fileobj=fileobj, mode="r|*")
    except tarfile.TarError as e:
        state["unreadable"] = f"not a tar file ({e})"
        return
    name = ""
    try:
        for info in tar:
            name = info.name
            if info.isreg():
                yield info.name, tar.extractfile(info).read()
            name = ""
    except tarfile.ReadError:
        state["cut"] = name


def _marker(key: str, path: str, pos: int, reason: str, detail: str) -> dict[str, Any]:
    """The one row that stands for records a reader could not read (a cut, a whole file)."""
    return {"key": key, "caption": None, "image": None, "shard": path, "pos": pos,
            "skip_reason": reason, "detail": detail, "fixes": ""}


class SampleTarDatasource(FileBasedDatasource):
    """Webdataset tars as rows of the row schema, on Ray Data's file-based datasource API.

    Ray lists the files, opens them (with its S3 retries) and calls ``_read_stream`` per file.
    A tar cut short ends in a counted skip: every sample read before the cut is kept, and the
    sample the cut fell in is marked ``truncated_tar`` (the partly read row gets the reason,
    else one marker row stands for it). A file that is not a tar is one ``unreadable_shard``
    row. Each finished shard is reported to ``counter``.
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
        pos = 0
        for pos, sample in enumerate(group_samples(_tar_members(counted, state)), start=1):
            rows.append(_raw_row(sample, path, pos - 1, self._keep_images))
            if len(rows) > _ROWS_PER_BLOCK:  # keep the last row: the cut may concern it
                yield _frame(rows[:-1])
                rows = rows[-1:]
        if "unreadable" in state:
            rows.append(_marker(f"{path}#unreadable", path, -1, "unreadable_shard",
                                state["unreadable"]))
        # tarfile ends quietly when the cut falls inside a header; a tar is whole 512-byte blocks.
        elif "cut" in state or counted.bytes_read % tarfile.BLOCKSIZE != 0:
            parts = split_name(state.get("cut", ""))
            key = parts[0].rsplit("/", 1)[-1] if parts else f"{path}#truncated"
            detail = f"the tar ends {counted.bytes_read:,} bytes in, inside " + \
                (f"member {state['cut']!r}" if state.get("cut") else "a header")
            if rows and rows[-1]["key"] == key:
                rows[-1].update(skip_reason="truncated_tar", detail=detail)
            else:
                rows.append(_marker(key, path, pos, "truncated_tar", detail))
        if rows:
            yield _frame(rows)
        if self._counter is not None:
            self._counter.add({"shards": 1}, key=path)     # a retried read counts once


def _raw_row(sample: dict[str, Any], path: str, pos: int, keep_images: bool) -> dict[str, Any]:
    image = next((sample[s] for s in IMAGE_SUFFIXES if s in sample), None)
    if image is not None and not keep_images:
        image = b""
    return {"key": sample["__key__"].rsplit("/", 1)[-1], "caption": sample.get("txt"),
            "image": image, "shard": path, "pos": pos, "skip_reason": "", "detail": "",
            "fixes": ""}


def _frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame.from_records(rows, columns=COLUMNS)


# ----------------------------------------------------------------------------- parquet
def schema_problem(schema: pa.Schema, data: DataConfig) -> str:
    """Why a parquet file's schema cannot be read as samples ("" if it can): a configured column
    missing, or of a type that is not the key's (string or integer), the caption's (string or
    binary) or the image's (binary)."""
    wanted = {data.key_column: ("key", (pa.types.is_string, pa.types.is_large_string,
                                        pa.types.is_integer)),
              data.caption_column: ("caption", (pa.types.is_string, pa.types.is_large_string,
                                                pa.types.is_binary, pa.types.is_large_binary)),
              data.image_column: ("image", (pa.types.is_binary, pa.types.is_large_binary))}
    for column, (role, checks) in wanted.items():
        if column not in schema.names:
            return (f"no {role} column {column!r} (columns: {', '.join(schema.names)}; set "
                    f"data.{role}_column)")
        kind = schema.field(column).type
        if not any(check(kind) for check in checks):
            return f"the {role} column {column!r} is {kind}, which is not a {role}"
    return ""


class SampleParquetDatasource(FileBasedDatasource):
    """img2dataset parquet files as rows of the row schema, one file at a time, so that a file
    that cannot be read is one counted row (``unreadable_shard``: not parquet, cut short;
    ``bad_schema``: a column missing or of the wrong type) and the other files are read."""

    def __init__(self, paths: list[str], data: DataConfig, keep_images: bool,
                 counter: Tally | None = None, **kwargs: Any) -> None:
        super().__init__(paths, **kwargs)
        self._data, self._keep_images, self._counter = data, keep_images, counter

    def _open_input_source(self, filesystem: pyarrow.fs.FileSystem, path: str,
                           **open_args: Any) -> pyarrow.NativeFile:
        return filesystem.open_input_file(path)      # parquet needs random access (the footer)

    def _read_stream(self, f: pyarrow.NativeFile, path: str) -> Iterator[pd.DataFrame]:
        d = self._data
        pos = 0
        try:
            pf = pq.ParquetFile(f)
            problem = schema_problem(pf.schema_arrow, d)
            if problem:
                yield _frame([_marker(f"{path}#bad_schema", path, -1, "bad_schema", problem)])
            else:
                for batch in pf.iter_batches(batch_size=_ROWS_PER_BLOCK,
                                             columns=[d.key_column, d.caption_column, d.image_column]):
                    yield _parquet_rows(batch.to_pandas(), d, path, pos, self._keep_images)
                    pos += batch.num_rows
        except (pa.ArrowException, OSError) as e:   # not parquet, or cut short
            yield _frame([_marker(f"{path}#unreadable", path, pos if pos else -1,
                                  "unreadable_shard", f"{type(e).__name__}: {e}"[:300])])
        if self._counter is not None:
            self._counter.add({"shards": 1}, key=path)     # a retried read counts once


def _parquet_rows(batch: pd.DataFrame, data: DataConfig, path: str, start: int,
                  keep_images: bool) -> pd.DataFrame:
    images = batch[data.image_column].tolist()
    if not keep_images:
        images = [None if im is None else b"" for im in images]
    n = len(batch)
    return pd.DataFrame({
        "key": batch[data.key_column].astype(str),
        "caption": batch[data.caption_column].tolist(),
        "image": images,
        "shard": path,
        "pos": np.arange(start, start + n, dtype=np.int64),
        "skip_reason": np.full(n, "", dtype=object),
        "detail": np.full(n, "", dtype=object),
        "fixes": np.full(n, "", dtype=object),
    }, columns=COLUMNS)


# ----------------------------------------------------------------------------- validation
def validate_batch(batch: pd.DataFrame, decode_images: bool = True,
                   max_caption_chars: int = 2000,
                   max_image_pixels: int | None = None) -> pd.DataFrame:
    """Give every row of a raw batch its ``skip_reason``; captions become cleaned ``str``.

    Checks, in order: a reader-level reason already set; image present; caption present;
    caption valid UTF-8; caption not empty once cleaned (``clean_caption``); image decodes
    (only with ``decode_images``: ``pipeline.data.images.verdict``, which refuses an image over
    ``max_image_pixels`` from its header; None: Pillow's default limit).
    """
    limit = max_image_pixels or DEFAULT_MAX_PIXELS
    reasons = batch["skip_reason"].tolist()
    details = batch["detail"].tolist()
    fixes = batch["fixes"].tolist()
    captions: list[str | None] = []
    for i, (caption, image) in enumerate(zip(batch["caption"], batch["image"], strict=True)):
        text = None
        if not reasons[i]:
            if image is None:
                reasons[i] = "missing_image"
            elif caption is None:
                reasons[i] = "missing_caption"
            else:
                text, reasons[i], repaired = clean_caption(caption, max_caption_chars)
                mode = "RGB"
                if not reasons[i] and decode_images:
                    reasons[i], details[i], mode = verdict(bytes(image), limit)
                if not reasons[i]:
                    fixes[i] = ",".join([*repaired, *(["image_not_rgb"] if mode != "RGB" else [])])
            if reasons[i] and not details[i]:
                details[i] = _DETAILS[reasons[i]]
        captions.append(text if not reasons[i] else None)
    out = batch.copy()
    out["caption"] = captions
    out["skip_reason"] = reasons
    out["detail"] = [d if r else "" for d, r in zip(details, reasons, strict=True)]
    out["fixes"] = fixes
    return out


def clean_caption(caption: Any, max_chars: int) -> tuple[str | None, str, list[str]]:
    """(text, skip reason, fixes) of one raw caption (docs/bad_input.md).

    Bytes must be UTF-8 (else ``caption_not_utf8``). Control characters (NUL, tabs, newlines,
    C1) become spaces; format characters such as right-to-left marks are kept, they are part of
    the text. Whitespace at the ends is stripped; nothing left is ``empty_caption``. A caption
    longer than ``max_chars`` characters is kept, cut to its first ``max_chars`` (the encoders
    read far fewer: open_clip's tokenizer 77 tokens, MiniLM 256 word pieces).
    """
    if isinstance(caption, (bytes, bytearray)):
        try:
            caption = bytes(caption).decode("utf-8")
        except UnicodeDecodeError:
            return None, "caption_not_utf8", []
    text = str(caption)
    fixes = []
    cleaned = _CONTROL.sub(" ", text)
    if cleaned != text and cleaned.strip() != text.strip():
        fixes.append("caption_control_chars")
    text = cleaned.strip()
    if not text:
        return None, "empty_caption", []
    if len(text) > max_chars:
        text = text[:max_chars].rstrip()
        fixes.append("caption_truncated")
    return text, "", fixes


def read_samples(uri: str, data: DataConfig, storage: StorageConfig, keep_images: bool = True,
                 decode_images: bool = True, counter: Tally | None = None,
                 key_prefix: str = "") -> ray.data.Dataset:
    """All rows of the shards at ``uri`` with their ``skip_reason`` (good rows have "").

    Args:
        uri: a folder, prefix, glob or single file; local or ``s3://``.
        data: the format, for parquet the column names, and the caption and image limits.
        storage: the S3 endpoint and region, if any.
        keep_images: False keeps only the presence of each image (``b""``), for stages that
            need captions alone; the bytes still stream past but are not kept.
        decode_images: check that each image decodes (needs ``keep_images``).
        counter: a ``console.Tally`` told of each finished shard (progress).
        key_prefix: put before every key. Keys are unique within one data set only; data added
            to a run later (a generation, docs/growth.md) gets its own namespace this way.

    Duplicate keys are not marked here: that needs every shard's keys (``mark_duplicates``).
    """
    fs, _ = filesystem(uri, storage)
    suffix = ".tar" if data.format == "webdataset" else ".parquet"
    paths = [strip_scheme(p) for p in expand_shards(uri, storage, (suffix,))]
    if data.format == "webdataset":
        source = SampleTarDatasource(paths, keep_images, counter, filesystem=pyarrow_filesystem(fs))
    else:
        source = SampleParquetDatasource(paths, data, keep_images, counter,
                                         filesystem=pyarrow_filesystem(fs))
    ds = ray.data.read_datasource(source)
    ds = ds.map_batches(validate_batch, batch_format="pandas",
                        fn_kwargs={"decode_images": decode_images and keep_images,
                                   "max_caption_chars": data.max_caption_chars,
                                   "max_image_pixels": data.max_image_pixels})
    if key_prefix:
        ds = ds.map_batches(_prefix_keys, batch_format="pandas", fn_kwargs={"prefix": key_prefix})
    return ds


def _prefix_keys(batch: pd.DataFrame, prefix: str) -> pd.DataFrame:
    out = batch.copy()
    out["key"] = prefix + out["key"].astype(str)
    return out


def _good(batch: pd.DataFrame) -> pd.DataFrame:
    return batch[batch["skip_reason"] == ""]


def _bad(batch: pd.DataFrame) -> pd.DataFrame:
    return batch[batch["skip_reason"] != ""]


def good_rows(ds: ray.data.Dataset) -> ray.data.Dataset:
    """Only the rows with no skip reason."""
    return ds.map_batches(_good, batch_format="pandas")


# ----------------------------------------------------------------------------- duplicate keys
def _repeated(batch: pd.DataFrame) -> pd.DataFrame:
    return batch[batch["count()"] > 1][["key"]]


def _with_keys(batch: pd.DataFrame, keys: set[str]) -> pd.DataFrame:
    return batch[batch["key"].isin(keys)][["key", "shard", "pos"]]


def duplicate_losers(ds: ray.data.Dataset) -> pd.DataFrame:
    """The good rows of ``ds`` whose key an earlier good row already has: ``key, shard, pos,
    kept`` (where the kept copy is). Earlier means in the order of shard URIs, then position
    in the shard, so the choice does not depend on how Ray reads. Only the rows of repeated
    keys come to the driver. The groupby runs on Ray Data's sort-based shuffle: plain tasks on
    the workers Ray already has, where the default hash shuffle starts aggregator actors (new
    processes: 7-8 s against 1-3 s for a small data set on 2 cores, measured)."""
    keys = good_rows(ds).select_columns(["key"])
    keys.context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    repeated = keys.groupby("key").count().map_batches(_repeated, batch_format="pandas").to_pandas()
    if repeated.empty:
        return pd.DataFrame(columns=["key", "shard", "pos", "kept"])
    rows = good_rows(ds).map_batches(_with_keys, batch_format="pandas",
                                     fn_kwargs={"keys": set(repeated["key"])}).to_pandas()
    rows = rows.sort_values(["shard", "pos"], kind="stable").reset_index(drop=True)
    first = rows.drop_duplicates("key").set_index("key")
    losers = rows[rows.duplicated("key")].copy()
    losers["kept"] = [f"{first.at[k, 'shard']} #{first.at[k, 'pos']}" for k in losers["key"]]
    return losers


def _mark(batch: pd.DataFrame, losers: dict[tuple[str, int], str]) -> pd.DataFrame:
    out = batch.copy()
    for i, (shard, pos) in enumerate(zip(out["shard"], out["pos"], strict=True)):
        kept = losers.get((shard, int(pos)))
        if kept is not None and out.iat[i, out.columns.get_loc("skip_reason")] == "":
            out.iat[i, out.columns.get_loc("skip_reason")] = "duplicate_key"
            out.iat[i, out.columns.get_loc("detail")] = f"key already read at {kept}"
            out.iat[i, out.columns.get_loc("caption")] = None
            out.iat[i, out.columns.get_loc("fixes")] = ""
    return out


def mark_duplicates(ds: ray.data.Dataset, losers: pd.DataFrame) -> ray.data.Dataset:
    """``ds`` with the ``losers`` rows (``duplicate_losers``) marked ``duplicate_key``."""
    if losers.empty:
        return ds
    where = {(s, int(p)): k for s, p, k in zip(losers["shard"], losers["pos"], losers["kept"],
                                                strict=True)}
    return ds.map_batches(_mark, batch_format="pandas", fn_kwargs={"losers": where})


def skipped_duplicates(run: RunDir) -> pd.DataFrame:
    """``shard, pos, kept`` of the rows ingest skipped as ``duplicate_key`` (read by
    training_data, which re-reads the shards and must drop the same copies)."""
    path = run.stage_path("ingest", "skipped")
    run.fs.invalidate_cache(path)
    files = [f for f in run.fs.ls(path, detail=False) if f.endswith(".parquet")] \
        if run.fs.exists(path) else []
    if not files:       # no bad record at all: Ray Data wrote no file
        return pd.DataFrame(columns=["shard", "pos", "kept"])
    table = pq.read_table(files, filesystem=pyarrow_filesystem(run.fs),
                          columns=["shard", "pos", "skip_reason", "detail"],
                          filters=[("skip_reason", "=", "duplicate_key")])
    df = table.to_pandas()
    return pd.DataFrame({"shard": df["shard"], "pos": df["pos"],
                         "kept": df["detail"].str.removeprefix("key already read at ")})


# ----------------------------------------------------------------------------- the stage
def _tally(ds: ray.data.Dataset) -> pd.DataFrame:
    """Rows per (shard, skip_reason, fixes), summed from one small table per block: no shuffle."""
    def per_block(batch: pd.DataFrame) -> pd.DataFrame:
        return batch.groupby(["shard", "skip_reason", "fixes"]).size().rename("n").reset_index()

    parts = ds.map_batches(per_block, batch_format="pandas").to_pandas()
    return parts.groupby(["shard", "skip_reason", "fixes"], as_index=False)["n"].sum()


def run(cfg: ConfigView, run: RunDir, upstream: dict, log=print, *, data: str,
        key_prefix: str = "") -> StageOutput:
    """Validate every sample of the shards at ``data``; write the sample index.

    Writes ``ingest/samples/*.parquet`` (key, caption, shard, pos: every good row) and
    ``ingest/skipped/*.parquet`` (key, shard, pos, skip_reason, detail: every bad record).
    Images are decoded once here to find corrupt ones; their bytes are not copied.
    """
    counter = Tally()
    total = len(expand_shards(data, cfg.storage,
                              (".tar",) if cfg.data.format == "webdataset" else (".parquet",)))
    with Progress("ingest", lambda: counter.get("shards"), total, unit="shards", say=log):
        ds = read_samples(data, cfg.data, cfg.storage, counter=counter, key_prefix=key_prefix) \
            .drop_columns(["image"]).materialize()
    counter.close()
    losers = duplicate_losers(ds)
    if not losers.empty:
        log(f"[ingest] {len(losers):,} rows repeat the key of an earlier row: skipped as "
            "duplicate_key, the first copy kept (docs/bad_input.md)")
        ds = mark_duplicates(ds, losers).materialize()
    tally = _tally(ds)
    reasons = tally.groupby("skip_reason")["n"].sum().to_dict()
    rows_out = reasons.pop("", 0)
    unknown = set(reasons) - set(SKIP_REASONS)
    if unknown:
        raise RuntimeError(f"ingest produced skip reasons outside SKIP_REASONS: {sorted(unknown)}")
    fs = pyarrow_filesystem(run.fs)
    ds.map_batches(_good, batch_format="pandas").select_columns(["key", "caption", "shard", "pos"]) \
        .write_parquet(run.stage_path("ingest", "samples"), filesystem=fs, mode=SaveMode.OVERWRITE)
    ds.map_batches(_bad, batch_format="pandas") \
        .select_columns(["key", "shard", "pos", "skip_reason", "detail"]) \
        .write_parquet(run.stage_path("ingest", "skipped"), filesystem=fs, mode=SaveMode.OVERWRITE)
    per_shard = tally.groupby("shard")["n"].sum()
    good = tally[tally["skip_reason"] == ""]
    fixes = {f: int(good.loc[good["fixes"].str.split(",").map(lambda fs, f=f: f in fs), "n"].sum())
             for f in FIXES}
    unreadable = tally[tally["skip_reason"].isin(["unreadable_shard", "bad_schema"])]
    stats = {"shards": len(per_shard),
             "rows_per_shard": {"min": int(per_shard.min()), "max": int(per_shard.max())},
             "fixes": fixes, "unreadable_shards": sorted(unreadable["shard"].unique().tolist())}
    return StageOutput(int(tally["n"].sum()), int(rows_out), reasons, stats)
