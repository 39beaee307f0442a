import hashlib
import io
import json
import tarfile

import pandas as pd

from pipeline.config import DemoConfig, StorageConfig
from pipeline.demo_world import DOMAINS, NEW_DOMAIN, TRAIN_DOMAINS, generate


def _digests(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _small(seed):
    return DemoConfig(samples=300, samples_per_shard=100, new_domain_samples=50,
                      eval_per_class=2, seed=seed)


def test_same_seed_gives_byte_identical_files(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, seed in ((a, 1), (b, 1), (c, 2)):
        generate(str(out), _small(seed), StorageConfig(), log=lambda *_: None)
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


def test_shards_follow_img2dataset_layout(tiny_world):
    with tarfile.open(tiny_world / "train" / "00000.tar") as tar:
        names = tar.getnames()
        first = names[0].split(".")[0]
        assert [n for n in names[:3]] == [f"{first}.jpg", f"{first}.txt", f"{first}.json"]
        meta = json.loads(tar.extractfile(f"{first}.json").read())
        assert meta["key"] == first and len(first) == 9


def test_eval_tasks_use_clip_benchmark_layout(tiny_world):
    for domain in (*TRAIN_DOMAINS, NEW_DOMAIN):
        task = tiny_world / "eval" / domain
        classes = (task / "classnames.txt").read_text().splitlines()
        templates = (task / "zeroshot_classification_templates.txt").read_text().splitlines()
        assert classes == list(DOMAINS[domain].classes)
        assert templates and all("{c}" in t for t in templates)
        with tarfile.open(task / "test" / "0.tar") as tar:
            labels = [int(tar.extractfile(m).read()) for m in tar if m.name.endswith(".cls")]
            jpg = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
            from PIL import Image
            assert Image.open(io.BytesIO(tar.extractfile(jpg).read())).size == (32, 32)
        assert sorted(set(labels)) == list(range(len(classes)))
