"""Hostile shards: every kind of bad record web data holds, planted among good ones, as
webdataset tars or as parquet files (docs/bad_input.md lists the rules they test).

``write(folder, fmt)`` returns a ``Planted``: what ingest must count, by reason and by repair,
and the keys it must keep. Keys start with ``hx`` so they never collide with a demo world's.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import struct
import tarfile
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.data.demo_world import tar_bytes

WORDS = ("red circle", "blue square", "green triangle", "yellow star", "black cross",
         "white ring", "orange bar", "purple dot")


@dataclasses.dataclass
class Record:
    key: str
    image: bytes | None          # None: no image file
    caption: bytes | str | None  # None: no caption file
    reason: str = ""             # the skip reason ingest must give ("" for a good row)
    fixes: tuple[str, ...] = ()  # what ingest must repair in a good row
    json: bytes | None = None


@dataclasses.dataclass
class Planted:
    skipped: dict[str, int]                  # reason -> rows
    good: set[str]                           # keys of every good row
    fixes: dict[str, int]                    # repair -> rows
    unreadable: list[str] = dataclasses.field(default_factory=list)   # shard file names


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    im.save(b, fmt, **kw)
    return b.getvalue()


def _picture(i: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(i)
    a = np.zeros((32, 32, 3), np.uint8)
    a[8:24, 8:24] = rng.integers(0, 255, 3)
    return Image.fromarray(a).convert(mode)


def bomb_png(side: int = 20_000) -> bytes:
    """A valid 1-bit PNG of side x side black pixels: ~50 kB on disk, 400 M pixels decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + \
            struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" * (1 + (side + 7) // 8)          # filter byte + packed bits
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def _gif() -> bytes:
    frames = [_picture(i, "P") for i in range(3)]
    return _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def _captions(captions: list[str] | None):
    """Captions for the good rows: the given ones in turn (a world's own, so that the good
    hostile rows cluster like its other samples), else made-up ones."""
    if captions:
        return itertools.cycle(captions)
    return iter(f"a photo of a {WORDS[i % len(WORDS)]} number {i}" for i in range(1000))


def records(captions: list[str] | None = None) -> list[Record]:
    """One shard's worth: a record of each row-level kind, between good ones."""
    jpg = [_encode(_picture(i), "JPEG", quality=90) for i in range(40)]
    wide = Image.fromarray((np.arange(32 * 32).reshape(32, 32) * 60).astype(np.uint16))
    caption = _captions(captions)
    long_text, rtl_text = next(caption), next(caption)
    r = [
        Record("hx-empty-image", b"", next(caption), "empty_image"),
        Record("hx-truncated-jpeg", jpg[1][: len(jpg[1]) // 2], next(caption), "corrupt_image"),
        Record("hx-not-an-image", b"<html>404 not found</html>" * 4, next(caption), "not_an_image"),
        Record("hx-png-as-jpg", _encode(_picture(3), "PNG"), next(caption)),
        Record("hx-cmyk", _encode(_picture(4, "CMYK"), "JPEG"), next(caption), fixes=("image_not_rgb",)),
        Record("hx-16bit", _encode(wide, "PNG"), next(caption), fixes=("image_not_rgb",)),
        Record("hx-gray", _encode(_picture(6, "L"), "PNG"), next(caption), fixes=("image_not_rgb",)),
        Record("hx-bomb", bomb_png(), next(caption), "image_too_large"),
        Record("hx-gif", _gif(), next(caption), fixes=("image_not_rgb",)),
        Record("hx-caption-empty", jpg[9], "", "empty_caption"),
        Record("hx-caption-space", jpg[10], " \t\n  ", "empty_caption"),
        Record("hx-caption-latin1", jpg[11], "caf\xe9 cr\xe8me".encode("latin-1"), "caption_not_utf8"),
        Record("hx-caption-100k", jpg[12], ((long_text + " ") * (100_000 // len(long_text) + 1))[:100_000],
               fixes=("caption_truncated",)),
        Record("hx-caption-nul-rtl", jpg[13], rtl_text.replace(" ", "\x00 ", 1) + " \u200f\u200e\x00",
               fixes=("caption_control_chars",)),
        Record("hx-garbage-json", jpg[14], next(caption), json=b"{not json\xff"),
        Record("hx-no-image", None, next(caption), "missing_image"),
        Record("hx-no-caption", jpg[16], None, "missing_caption"),
    ]
    r += [Record(f"hx-good-{i:02d}", jpg[20 + i], next(caption)) for i in range(8)]
    # the same key again, not next to its first copy, and straight after it (a suffix twice)
    r += [Record("hx-good-00", jpg[30], next(caption), "duplicate_key"),
          Record("hx-good-07", jpg[31], next(caption), "duplicate_key")]
    return r


def _members(recs: list[Record]):
    for rec in recs:
        if rec.image is not None:
            yield f"{rec.key}.jpg", rec.image
        if rec.caption is not None:
            yield f"{rec.key}.txt", rec.caption if isinstance(rec.caption, bytes) else rec.caption.encode()
        if rec.json is not None:
            yield f"{rec.key}.json", rec.json


def _second_shard(captions: list[str] | None) -> list[Record]:
    """Good rows and one key of the first shard again (another shard: skipped, the first kept)."""
    jpg = [_encode(_picture(100 + i), "JPEG") for i in range(6)]
    caption = _captions(captions[20:] if captions else None)
    recs = [Record(f"hx-b-{i}", jpg[i], next(caption)) for i in range(5)]
    return [*recs[:2], Record("hx-good-03", jpg[5], next(caption), "duplicate_key"), *recs[2:]]


def _cut(data: bytes, member: int, inside: str) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        info = tar.getmembers()[member]
    if inside == "payload":
        return data[: info.offset_data + info.size // 2]
    return data[: info.offset + 200]                  # 200 bytes into its 512-byte header


def write(folder: str | Path, fmt: str = "webdataset", captions: list[str] | None = None) -> Planted:
    """Hostile shards in ``folder`` (created): webdataset tars or parquet files. ``captions``:
    what the good rows say (a world's own captions keep them from skewing its clustering)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    first, second = records(captions), _second_shard(captions)
    expected = Counter(r.reason for r in [*first, *second] if r.reason)
    fixes = Counter(f for r in [*first, *second] if not r.reason for f in r.fixes)
    good = {r.key for r in [*first, *second] if not r.reason}
    if fmt == "webdataset":
        return _write_tars(folder, first, second, expected, fixes, good, captions)
    return _write_parquet(folder, first, second, expected, fixes, good)


def _write_tars(folder, first, second, expected, fixes, good, captions=None) -> Planted:
    # "hx-good-07" twice in a row: the second copy's files follow the first's directly
    order = [r for r in first if r.key != "hx-good-07" or r.reason]
    i = next(j for j, r in enumerate(order) if r.key == "hx-good-07")
    order.insert(i, next(r for r in first if r.key == "hx-good-07" and not r.reason))
    (folder / "hostile-a.tar").write_bytes(tar_bytes(_members(order)))
    (folder / "hostile-b.tar").write_bytes(tar_bytes(_members(second)))
    # cut inside the payload of the 3rd sample's image, and inside the 3rd sample's header
    caption = _captions(captions[30:] if captions else None)
    cut = [Record(f"hx-cut-{i}", _encode(_picture(200 + i), "JPEG"), next(caption)) for i in range(4)]
    whole = tar_bytes(_members(cut))
    (folder / "hostile-c.tar").write_bytes(_cut(whole, 4, "payload"))
    cut2 = [dataclasses.replace(r, key=r.key.replace("cut", "hdr")) for r in cut]
    (folder / "hostile-d.tar").write_bytes(_cut(tar_bytes(_members(cut2)), 4, "header"))
    (folder / "hostile-e.tar").write_bytes(b"this is not a tar file at all " * 40)
    (folder / "hostile-f.tar").write_bytes(b"")
    good |= {r.key for r in cut[:2]} | {r.key for r in cut2[:2]}
    expected["truncated_tar"] += 2
    expected["unreadable_shard"] += 2
    return Planted(dict(expected), good, dict(fixes), ["hostile-e.tar", "hostile-f.tar"])


def _table(recs: list[Record]) -> pa.Table:
    keep = [r for r in recs if r.reason not in ("missing_image", "missing_caption")] + \
        [r for r in recs if r.reason in ("missing_image", "missing_caption")]
    return pa.table({
        "key": pa.array([r.key for r in keep], pa.string()),
        "caption": pa.array([r.caption if not isinstance(r.caption, str) else r.caption.encode()
                             for r in keep], pa.binary()),
        "jpg": pa.array([r.image for r in keep], pa.binary()),
    })


def _write_parquet(folder, first, second, expected, fixes, good) -> Planted:
    pq.write_table(_table(first), folder / "hostile-a.parquet", row_group_size=8)
    second_table = _table(second)
    # strings, not bytes, for the captions of the second file: both types are read
    pq.write_table(second_table.set_column(1, "caption", pa.array(
        [c.decode() for c in second_table.column("caption").to_pylist()], pa.string())),
        folder / "hostile-b.parquet")
    good_rows = pd.DataFrame({"key": ["hx-p-0"], "caption": ["a red circle"],
                              "jpg": [_encode(_picture(300), "JPEG")]})
    pq.write_table(pa.Table.from_pandas(good_rows.drop(columns="caption")), folder / "hostile-c.parquet")
    wrong = good_rows.assign(caption=[7])
    pq.write_table(pa.Table.from_pandas(wrong), folder / "hostile-d.parquet")
    (folder / "hostile-e.parquet").write_bytes(b"PAR1 this is not parquet " * 40)
    whole = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(good_rows), whole)
    (folder / "hostile-f.parquet").write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    expected["bad_schema"] += 2
    expected["unreadable_shard"] += 2
    return Planted(dict(expected), good, dict(fixes),
                   ["hostile-c.parquet", "hostile-d.parquet", "hostile-e.parquet", "hostile-f.parquet"])
