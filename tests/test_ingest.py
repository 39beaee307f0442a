import dataclasses
import io
import tarfile

import boto3
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.core.config import DataConfig, StorageConfig
from pipeline.data.demo_world import tar_bytes, web_pairs, write_parquet_copy
from pipeline.data.ingest import read_samples

LOCAL = StorageConfig()


def _rows(ds):
    df = ds.to_pandas()
    return df.sort_values("key").reset_index(drop=True)


def _comparable(df):
    return df[["key", "caption", "image", "skip_reason"]]


def test_tar_and_parquet_read_the_same_rows(ray_local, tiny_world, tmp_path):
    n = write_parquet_copy(str(tiny_world / "train"), str(tmp_path / "pq"), LOCAL)
    tar_rows = _rows(read_samples(str(tiny_world / "train"), DataConfig(), LOCAL))
    pq_rows = _rows(read_samples(str(tmp_path / "pq"), DataConfig(format="parquet"), LOCAL))
    assert n == len(tar_rows) == 600
    pd.testing.assert_frame_equal(_comparable(tar_rows), _comparable(pq_rows))
    assert set(tar_rows.skip_reason) == {"", "empty_caption"}


def test_s3_reads_the_same_rows_as_local(ray_local, tiny_world, s3_endpoint, tmp_path):
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    for shard in sorted((tiny_world / "train").glob("*.tar")):
        s3.upload_file(str(shard), "mode", f"world/train/{shard.name}")
    write_parquet_copy(str(tiny_world / "train"), str(tmp_path / "pq"), LOCAL)
    for f in sorted((tmp_path / "pq").glob("*.parquet")):
        s3.upload_file(str(f), "mode", f"world/pq/{f.name}")
    remote = StorageConfig(s3_endpoint_url=s3_endpoint)
    local = _rows(read_samples(str(tiny_world / "train"), DataConfig(), LOCAL))
    from_s3 = _rows(read_samples("s3://mode/world/train", DataConfig(), remote))
    pd.testing.assert_frame_equal(_comparable(local), _comparable(from_s3))
    assert from_s3.shard.str.startswith("mode/world/train/").all()
    pq_s3 = _rows(read_samples("s3://mode/world/pq", DataConfig(format="parquet"), remote))
    pd.testing.assert_frame_equal(_comparable(local), _comparable(pq_s3))


def _good_pairs(stream, n, shard):
    pairs = web_pairs(7, stream, n, 32, {"shapes": 1.0}, 10_000)
    return [dataclasses.replace(p, key=f"{shard:05d}{p.key[5:]}") for p in pairs if p.noise == "clean"]


def _members(pairs, drop=()):
    for p in pairs:
        for ext, data in (("jpg", p.jpg), ("txt", p.txt.encode())):
            if (p.key, ext) not in drop:
                yield f"{p.key}.{ext}", data


def plant_bad_shards(folder, cut_member=10):
    """Two shards: one with one bad record per reason, one truncated inside its 6th sample
    (member 10 is that sample's image, member 11 its caption).

    Returns (expected skip counts, keys of every good row).
    """
    pairs = _good_pairs("bad-a", 40, 0)[:12]
    bad = {p.key: reason for p, reason in zip(pairs, [
        "corrupt_image", "empty_caption", "caption_not_utf8", "missing_image", "missing_caption"], strict=False)}
    members = []
    for p in pairs:
        reason = bad.get(p.key)
        jpg, txt = p.jpg, p.txt.encode()
        if reason == "corrupt_image":
            jpg = jpg[: len(jpg) // 2]
        elif reason == "empty_caption":
            txt = b"  \n "
        elif reason == "caption_not_utf8":
            txt = b"caf\xe9 \xff sign"
        if reason != "missing_image":
            members.append((f"{p.key}.jpg", jpg))
        if reason != "missing_caption":
            members.append((f"{p.key}.txt", txt))
    (folder / "a.tar").write_bytes(tar_bytes(iter(members)))

    cut_pairs = _good_pairs("bad-b", 40, 1)[:10]
    whole = tar_bytes(_members(cut_pairs))
    with tarfile.open(fileobj=io.BytesIO(whole)) as tar:
        member = tar.getmembers()[cut_member]
    cut = member.offset_data + member.size // 2
    (folder / "b.tar").write_bytes(whole[:cut])

    expected = {r: 1 for r in bad.values()} | {"truncated_tar": 1}
    good = {p.key for p in pairs if p.key not in bad} | {p.key for p in cut_pairs[:5]}
    return expected, good


@pytest.mark.parametrize("cut_member", [10, 11])
def test_planted_bad_records_are_counted_and_good_rows_kept(ray_local, tmp_path, cut_member):
    expected, good = plant_bad_shards(tmp_path, cut_member)
    rows = _rows(read_samples(str(tmp_path), DataConfig(), LOCAL))
    counts = rows[rows.skip_reason != ""].skip_reason.value_counts().to_dict()
    assert counts == expected
    kept = rows[rows.skip_reason == ""]
    assert set(kept.key) == good and len(kept) == len(good) == 12
    for image in kept.image:
        Image.open(io.BytesIO(image)).load()
    assert kept.caption.str.strip().eq(kept.caption).all() and kept.caption.str.len().gt(0).all()


def test_captions_only_mode_keeps_presence_not_bytes(ray_local, tmp_path):
    expected, good = plant_bad_shards(tmp_path)
    rows = _rows(read_samples(str(tmp_path), DataConfig(), LOCAL, keep_images=False))
    counts = rows[rows.skip_reason != ""].skip_reason.value_counts().to_dict()
    # Without image bytes a corrupt JPEG cannot be seen; every other reason still is.
    assert counts == {k: v for k, v in expected.items() if k != "corrupt_image"}
    assert (rows[rows.skip_reason == ""].image == b"").all()


def test_missing_data_fails_clearly(ray_local, tmp_path):
    with pytest.raises(FileNotFoundError, match="no shards"):
        read_samples(str(tmp_path / "nowhere"), DataConfig(), LOCAL)
    (tmp_path / "x.parquet").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"no \.tar shards"):
        read_samples(str(tmp_path), DataConfig(), LOCAL)


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_every_hostile_record_is_counted_and_every_good_one_kept(ray_local, tmp_path, fmt):
    """The bad-input matrix at ingest (tests/hostile.py; rules in docs/bad_input.md): each kind
    of bad record counted under its reason, each unreadable file once by name, every good row
    kept with its caption cleaned and its repairs counted; the counts add up."""
    from pipeline.core import stages
    from pipeline.core.config import load_config
    from pipeline.core.rundir import RunDir
    from tests import hostile

    planted = hostile.write(tmp_path / "data", fmt)
    cfg = load_config("demo", [f"data.format={fmt}"])
    run = RunDir(str(tmp_path / "run"), LOCAL)
    m = stages.run_stage("ingest", cfg, run, data=str(tmp_path / "data"), log=lambda *_: None)
    assert m["rows_skipped"] == planted.skipped
    assert m["rows_in"] == m["rows_out"] + sum(m["rows_skipped"].values())
    samples = pd.read_parquet(tmp_path / "run" / "ingest" / "samples")
    skipped = pd.read_parquet(tmp_path / "run" / "ingest" / "skipped")
    assert set(samples.key) == planted.good and samples.key.is_unique and len(samples) == m["rows_out"]
    assert skipped.skip_reason.value_counts().to_dict() == planted.skipped
    assert (skipped.detail.str.len() > 0).all()      # each skip says why
    assert m["stats"]["fixes"] == {f: planted.fixes.get(f, 0) for f in m["stats"]["fixes"]}
    assert sorted(p.rsplit("/", 1)[1] for p in m["stats"]["unreadable_shards"]) == planted.unreadable
    captions = samples.set_index("key").caption
    assert len(captions["hx-caption-100k"]) == cfg.data.max_caption_chars
    assert "\x00" not in captions["hx-caption-nul-rtl"] and "\u200f" in captions["hx-caption-nul-rtl"]
    assert captions.str.strip().eq(captions).all() and captions.str.len().gt(0).all()
    # the first copy of a repeated key is the one kept, and each skipped copy names it
    dups = skipped[skipped.skip_reason == "duplicate_key"]
    assert (dups.detail.str.contains("hostile-a")).all()
    first = samples.set_index("key").loc["hx-good-03"]
    assert first.shard.endswith("hostile-a." + ("tar" if fmt == "webdataset" else "parquet"))


def test_any_decodable_image_becomes_8_bit_rgb_and_16_bit_is_scaled_not_clipped():
    from pipeline.data.images import open_rgb, verdict
    from tests import hostile

    wide = np.array([[0, 257 * 100, 65535]], np.uint16)
    b = io.BytesIO()
    Image.fromarray(wide).save(b, "PNG")
    assert verdict(b.getvalue())[2] == "I;16"
    rgb = open_rgb(b.getvalue())
    assert rgb.mode == "RGB" and np.asarray(rgb)[0, :, 0].tolist() == [0, 100, 255]
    assert verdict(hostile.bomb_png())[0] == "image_too_large"
    assert open_rgb(hostile._gif()).mode == "RGB"
    assert verdict(b"")[0] == "empty_image" and verdict(b"GIF89a" + b"\0" * 20)[0] == "not_an_image"
    assert verdict(hostile.records()[1].image)[0] == "corrupt_image"    # a JPEG cut in half
