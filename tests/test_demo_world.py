import hashlib
import io
import json
import tarfile

import pandas as pd
import pytest

from pipeline.core.config import DemoConfig, StorageConfig
from pipeline.data.demo_world import (
    BACKGROUND_DOMAINS,
    DOMAIN_SHARES,
    DOMAINS,
    FOREGROUND_DOMAINS,
    NEW_DOMAIN,
    TRAIN_DOMAINS,
    generate,
    same_content_negatives,
)


def _digests(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _small(seed, composite=False):
    return DemoConfig(samples=300, samples_per_shard=100, new_domain_samples=50,
                      eval_per_class=2, seed=seed, composite=composite)


@pytest.fixture(scope="module")
def composite_world(tmp_path_factory):
    """tiny_world's configuration with composite images."""
    out = tmp_path_factory.mktemp("composite")
    cfg = DemoConfig(samples=600, samples_per_shard=200, new_domain_samples=100,
                     eval_per_class=2, seed=3, composite=True)
    generate(str(out), cfg, StorageConfig(), log=lambda *_: None)
    return out


@pytest.mark.parametrize("composite", [False, True])
def test_same_seed_gives_byte_identical_files(tmp_path, composite):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, seed in ((a, 1), (b, 1), (c, 2)):
        generate(str(out), _small(seed, composite), StorageConfig(), log=lambda *_: None)
    da, db, dc = _digests(a), _digests(b), _digests(c)
    assert "train/00000.tar" in da and len(da) > 10
    assert da == db
    assert da["train/00000.tar"] != dc["train/00000.tar"]


def test_world_has_what_mode_needs(tiny_world):
    assert len(TRAIN_DOMAINS) >= 4 and NEW_DOMAIN not in TRAIN_DOMAINS
    for name in (*TRAIN_DOMAINS, NEW_DOMAIN):
        assert len(DOMAINS[name].classes) >= 6
    truth = pd.read_parquet(tiny_world / "truth.parquet")
    train = truth[truth.split == "train"]
    assert set(train.domain) == set(TRAIN_DOMAINS)
    assert set(truth[truth.split == "new_domain"].domain) == {NEW_DOMAIN}
    assert {"clean", "mismatch", "junk", "duplicate", "empty"} <= set(train.noise)
    world = json.loads((tiny_world / "world.json").read_text())
    assert world["splits"]["train"]["pairs"] == len(train) == 600
    assert world["composite"] is False


def test_plain_images_hold_one_concept_in_its_layer(tiny_world):
    truth = pd.read_parquet(tiny_world / "truth.parquet")
    fg, bg = truth[truth.fg_domain != ""], truth[truth.bg_domain != ""]
    assert len(fg) + len(bg) == len(truth)
    assert set(fg.fg_domain) == {*FOREGROUND_DOMAINS, NEW_DOMAIN}
    assert set(bg.bg_domain) == set(BACKGROUND_DOMAINS)
    assert (fg.fg_domain == fg.domain).all() and (fg.fg_label == fg.label).all()
    assert (bg.bg_domain == bg.domain).all() and (bg.bg_label == bg.label).all()


def test_composite_truth_is_consistent(composite_world):
    truth = pd.read_parquet(composite_world / "truth.parquet")
    train = truth[truth.split == "train"]
    assert set(train.fg_domain) == set(FOREGROUND_DOMAINS)
    assert set(train.bg_domain) == set(BACKGROUND_DOMAINS)
    for layer in ("fg", "bg"):
        assert all(label in DOMAINS[d].classes
                   for d, label in zip(train[f"{layer}_domain"], train[f"{layer}_label"], strict=True))
    own = list(zip(train.domain, train.label, strict=True))
    held = zip(train.fg_domain, train.fg_label, train.bg_domain, train.bg_label, strict=True)
    assert all(c in ((fd, fl), (bd, bl)) for c, (fd, fl, bd, bl) in zip(own, held, strict=True))
    clean = train[train.noise == "clean"]
    assert (clean.caption_domain == clean.domain).all() and (clean.caption_label == clean.label).all()
    nameless = train[train.noise.isin(["junk", "empty"])]
    assert (nameless.caption_domain == nameless.noise).all() and (nameless.caption_label == "").all()
    mismatch = train[train.noise == "mismatch"]
    assert all(label in DOMAINS[d].classes
               for d, label in zip(mismatch.caption_domain, mismatch.caption_label, strict=True))
    new = truth[truth.split == "new_domain"]
    assert set(new.fg_domain) == {NEW_DOMAIN} and set(new.bg_domain) == {""}
    world = json.loads((composite_world / "world.json").read_text())
    assert world["composite"] is True and world["splits"]["train"]["pairs"] == len(train) == 600


def test_composite_domain_shares_are_caption_shares(composite_world):
    """600 captions: a share's standard error is at most 0.02, so 0.06 is three of them."""
    train = pd.read_parquet(composite_world / "truth.parquet").query("split == 'train'")
    named = train[train.caption_label != ""]
    for column in (train.domain, named.caption_domain):
        shares = column.value_counts(normalize=True)
        for domain, share in DOMAIN_SHARES.items():
            assert abs(shares[domain] - share) < 0.06, (column.name, domain, shares[domain])


def test_arrows_are_drawn_alike_in_either_world(tiny_world, composite_world):
    def same(path):
        return (tiny_world / path).read_bytes() == (composite_world / path).read_bytes()

    assert same("new_domain/00000.tar") and same("eval/arrows/test/0.tar")
    assert not same("eval/shapes/test/0.tar") and not same("train/00000.tar")


def test_shards_follow_img2dataset_layout(tiny_world):
    with tarfile.open(tiny_world / "train" / "00000.tar") as tar:
        names = tar.getnames()
        first = names[0].split(".")[0]
        assert [n for n in names[:3]] == [f"{first}.jpg", f"{first}.txt", f"{first}.json"]
        meta = json.loads(tar.extractfile(f"{first}.json").read())
        assert meta["key"] == first and len(first) == 9


@pytest.mark.parametrize("world", ["tiny_world", "composite_world"])
def test_eval_tasks_use_clip_benchmark_layout(world, request):
    from PIL import Image

    root = request.getfixturevalue(world)
    for domain in (*TRAIN_DOMAINS, NEW_DOMAIN):
        task = root / "eval" / domain
        classes = (task / "classnames.txt").read_text().splitlines()
        templates = (task / "zeroshot_classification_templates.txt").read_text().splitlines()
        assert classes == list(DOMAINS[domain].classes)
        assert templates and all("{c}" in t for t in templates)
        for split in ("test", "val"):
            with tarfile.open(task / split / "0.tar") as tar:
                labels = [int(tar.extractfile(m).read()) for m in tar if m.name.endswith(".cls")]
                jpg = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
                assert Image.open(io.BytesIO(tar.extractfile(jpg).read())).size == (32, 32)
            assert sorted(set(labels)) == list(range(len(classes)))
    with tarfile.open(root / "eval" / "retrieval" / "test" / "0.tar") as tar:
        assert any(n.endswith(".txt") for n in tar.getnames())


def _row(caption, fg, bg=("", "")):
    return {"caption_domain": caption[0], "caption_label": caption[1], "fg_domain": fg[0],
            "fg_label": fg[1], "bg_domain": bg[0], "bg_label": bg[1]}


def test_same_content_negatives_counted_by_hand():
    """The ordered pairs (i, j) whose image j holds what caption i names: a->c, c->a (one),
    b->a, b->d (grid) and e->b (star); d's junk names nothing. 5 of 5 * 4."""
    one, grid, star = ("digits", "one"), ("textures", "grid"), ("shapes", "star")
    truth = pd.DataFrame([
        _row(one, one, grid),                                   # a
        _row(grid, star, grid),                                 # b
        _row(one, one, ("scenes", "fog")),                      # c
        _row(("junk", ""), ("digits", "two"), grid),            # d
        _row(star, ("digits", "two")),                          # e: a plain image, mismatched
    ])
    assert same_content_negatives(truth) == pytest.approx(5 / 20)
    assert same_content_negatives(truth.iloc[[0, 2]]) == 1.0
    assert same_content_negatives(truth.iloc[[3, 4]]) == 0.0
    with pytest.raises(ValueError, match="at least 2 rows"):
        same_content_negatives(truth.iloc[:1])


def _captioned_only(rows):
    """The same rows with each image holding only what its caption names."""
    return rows.assign(fg_domain=rows.caption_domain, fg_label=rows.caption_label,
                       bg_domain="", bg_label="")


def test_clustering_by_caption_removes_the_negatives_composites_add(tiny_world, composite_world):
    """On clean pairs, same-content negatives are caption collisions (two captions naming one
    concept) plus images whose unnamed layer is the concept named. A plain image holds only its
    caption's concept, so the second term is zero everywhere. A composite image's unnamed layer
    comes from the other layer's domains, which no caption in a one-domain subset names: the
    caption clustering removes the second term exactly, while over all data it is positive. The
    rate itself rises in a one-domain subset in both worlds (its captions spread over one
    domain's classes, not four domains'), so the test compares it with the collisions alone."""
    for world, composite in ((tiny_world, False), (composite_world, True)):
        truth = pd.read_parquet(world / "truth.parquet")
        clean = truth[(truth.split == "train") & (truth.noise == "clean")]
        for domain in TRAIN_DOMAINS:
            rows = clean[clean.caption_domain == domain]
            assert same_content_negatives(rows) == same_content_negatives(_captioned_only(rows))
        everything, collisions = same_content_negatives(clean), same_content_negatives(_captioned_only(clean))
        assert everything > collisions if composite else everything == collisions
