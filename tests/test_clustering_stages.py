"""The clustering stages end to end on Ray: embed -> cluster -> assign over a few thousand rows."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import assign as assign_job
from jobs import cluster as cluster_job
from jobs import embed as embed_job
from jobs import ingest as ingest_job
from pipeline.clustering import clusters, kmeans, kmeans_ray
from pipeline.core import stages
from pipeline.core.config import DemoConfig, StorageConfig, load_config
from pipeline.core.rundir import RunDir
from pipeline.core.tables import embedding_matrix, embedding_table
from pipeline.data.demo_world import generate
from tests.test_ingest import plant_bad_shards


def manifest(run_dir: Path, stage: str) -> dict:
    return json.loads((run_dir / stage / "_manifest.json").read_text())


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world3k")
    generate(str(out), DemoConfig(samples=3000, samples_per_shard=750, new_domain_samples=0,
                                  eval_per_class=1, seed=11), StorageConfig(), log=lambda *_: None)
    return out


@pytest.fixture(scope="module")
def clustered(ray_local, world, tmp_path_factory):
    """One run through the four jobs, as a user would type them."""
    run_dir = tmp_path_factory.mktemp("run")
    # capacity slack: the library default, not the demo preset's 0.2 (docs/clustering.md)
    common = ["--run-dir", str(run_dir), "--set", "cluster.fine_k=32", "--set", "cluster.restarts=2",
              "--set", "cluster.capacity_slack=0.003"]
    assert ingest_job.main([*common, "--data", str(world / "train")]) == 0
    assert embed_job.main([*common, "--data", str(world / "train")]) == 0
    assert cluster_job.main(common) == 0
    assert assign_job.main(common) == 0
    return run_dir


def test_counts_add_up_through_all_four_stages(clustered, world):
    ing, emb, clu, asg = (manifest(clustered, s) for s in ("ingest", "embeddings", "clusters", "assignments"))
    truth = pd.read_parquet(world / "truth.parquet")
    assert ing["rows_in"] == len(truth) == 3000
    assert ing["rows_in"] == ing["rows_out"] + sum(ing["rows_skipped"].values())
    assert set(ing["rows_skipped"]) <= {"empty_caption"} and ing["rows_skipped"]   # the world's junk
    # embeddings uses ingest's verdicts: it reads its good rows and embeds every one
    assert emb["rows_in"] == emb["rows_out"] == ing["rows_out"] and emb["rows_skipped"] == {}
    assert clu["rows_in"] == emb["rows_out"] == asg["rows_in"] == asg["rows_out"]
    per_expert = asg["stats"]["rows_per_expert"]
    assert sum(per_expert.values()) == asg["rows_out"]
    assert sum(asg["stats"]["rows_per_fine_cluster"]) == asg["rows_out"]
    rows = pd.read_parquet(clustered / "assignments")
    assert len(rows) == asg["rows_out"] and rows.key.is_unique
    assert rows.groupby("expert_id").size().to_dict() == {int(k): v for k, v in per_expert.items()}
    embedded = pd.read_parquet(clustered / "embeddings")
    assert set(rows.key) == set(embedded.key)


def test_embeddings_schema_is_unit_norm_fixed_size_float32(clustered):
    table = pq.read_table(clustered / "embeddings")
    assert table.schema.field("key").type == pa.string()
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 384)
    x = embedding_matrix(table)
    assert np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)


def test_identical_captions_are_embedded_once(clustered):
    emb = manifest(clustered, "embeddings")
    assert emb["rows_out"] > emb["stats"]["captions_encoded"] > 0
    table = pq.read_table(clustered / "embeddings")
    distinct_vectors = np.unique(embedding_matrix(table), axis=0)
    # One pool actor with its cache: every distinct caption went through the model exactly once.
    assert emb["stats"]["captions_encoded"] == len(distinct_vectors)
    assert emb["stats"]["duplicate_captions_reused"] == emb["rows_out"] - len(distinct_vectors)


def test_cluster_artifacts_and_balance(clustered):
    run = RunDir(str(clustered), StorageConfig())
    arrays = clusters.load(run)
    assert arrays["fine_centroids"].shape == (32, 384)
    assert arrays["fine_centroids"].dtype == np.float32
    assert arrays["coarse_centroids"].shape == (4, 384)
    f2e = arrays["fine_to_expert"]
    assert f2e.dtype == np.int32 and set(f2e.tolist()) == {0, 1, 2, 3}
    clu = manifest(clustered, "clusters")
    assert len(clu["stats"]["restarts"]) == 2
    assert all(len(r["history"]) == 20 for r in clu["stats"]["restarts"])
    assert clu["stats"]["objective"] == min(r["objective"] for r in clu["stats"]["restarts"])
    asg = manifest(clustered, "assignments")
    sizes, slack = asg["stats"]["fine_sizes"], asg["stats"]["capacity_slack"]
    assert slack > 0          # a little slack lets a centre hold slightly more than its share
    cap = kmeans.capacities(asg["rows_out"], 32, slack=slack).max()     # one block
    assert sizes["empty"] == 0 and sizes["max"] <= cap and sizes["cv"] < 0.1
    experts = [e["fit_rows"] for e in clu["stats"]["experts"]]
    assert experts == sorted(experts, reverse=True)                     # largest expert first
    assert (clustered / "assignments" / "_sizes.png").read_bytes()[:4] == b"\x89PNG"


def test_assignments_match_nearest_centres_when_unbalanced(ray_local, clustered, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(clustered, run_dir)
    plain = ["--run-dir", str(run_dir), "--set", "cluster.balanced=false"]
    # the fit declares cluster.balanced too: assigning without refitting is refused
    with pytest.raises(stages.StaleUpstream, match=r"cluster\.balanced=True.*rerun jobs/cluster\.py"):
        assign_job.main(plain)
    assert cluster_job.main(plain) == 0 and assign_job.main(plain) == 0
    rows = pd.read_parquet(run_dir / "assignments").sort_values("key")
    run = RunDir(str(run_dir), StorageConfig())
    emb = pd.read_parquet(run_dir / "embeddings").sort_values("key")
    x = np.stack(emb.embedding.to_numpy()).astype(np.float32)
    fine = clusters.load(run)["fine_centroids"]
    d = ((x[:, None, :] - fine[None]) ** 2).sum(-1)
    assert (rows.fine_id.to_numpy() == d.argmin(1)).mean() > 0.999
    assert np.allclose(rows.distance.to_numpy(), np.sqrt(d.min(1)), atol=1e-3)
    f2e = clusters.load(run)["fine_to_expert"]
    assert (rows.expert_id.to_numpy() == f2e[rows.fine_id.to_numpy()]).all()


def test_rerun_skips_then_force_rewrites_without_duplicates(ray_local, clustered, monkeypatch):
    before = manifest(clustered, "assignments")
    fine_before = np.load(clustered / "clusters" / "fine_centroids.npy")
    common = ["--run-dir", str(clustered)]

    monkeypatch.setattr(clusters.kmeans_ray, "fit", lambda *a, **k: pytest.fail("refit"))
    assert cluster_job.main(common) == 0                    # complete: skipped
    monkeypatch.undo()
    assert cluster_job.main([*common, "--force"]) == 0      # same seed: bit-identical centres
    assert np.array_equal(np.load(clustered / "clusters" / "fine_centroids.npy"), fine_before)
    assert assign_job.main([*common, "--force"]) == 0
    after = manifest(clustered, "assignments")
    assert after["rows_out"] == before["rows_out"]
    assert len(pd.read_parquet(clustered / "assignments")) == before["rows_out"]
    assert after["stats"]["rows_per_fine_cluster"] == before["stats"]["rows_per_fine_cluster"]


def test_missing_embeddings_is_a_clear_error(tmp_path):
    run = RunDir(str(tmp_path), StorageConfig())
    with pytest.raises(FileNotFoundError, match="run jobs/embed.py first"):
        stages.run_stage("clusters", load_config("demo"), run, log=lambda *_: None)
    with pytest.raises(FileNotFoundError, match="run jobs/embed.py first"):
        stages.run_stage("assignments", load_config("demo"), run, log=lambda *_: None)


def test_too_few_rows_for_fine_k_names_the_field(ray_local, clustered, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(clustered, run_dir)
    with pytest.raises(ValueError, match="cluster.fine_k=5000"):
        cluster_job.main(["--run-dir", str(run_dir), "--set", "cluster.fine_k=5000"])


def test_embeddings_are_exactly_ingests_good_rows(ray_local, tmp_path):
    (tmp_path / "data").mkdir()
    expected, good = plant_bad_shards(tmp_path / "data")
    run = RunDir(str(tmp_path / "run"), StorageConfig())
    cfg = load_config("demo")
    ing = stages.run_stage("ingest", cfg, run, data=str(tmp_path / "data"), log=lambda *_: None)
    m = stages.run_stage("embeddings", cfg, run, log=lambda *_: None)
    assert ing["rows_skipped"] == expected
    # ingest's verdicts: the corrupt JPEG's caption is not embedded, every good one is
    keys = set(pd.read_parquet(tmp_path / "run" / "embeddings").key)
    assert keys == good and m["rows_in"] == m["rows_out"] == len(good) and m["rows_skipped"] == {}


def test_sample_is_seeded_uniform_and_layout_independent():
    keys = np.array([f"{i:09d}" for i in range(20000)], dtype=object)
    x = np.zeros((len(keys), 2), np.float32)
    table = embedding_table(keys, x)
    whole = kmeans_ray._sample(table, 0.25, seed=3).column("key").to_pylist()
    parts = [kmeans_ray._sample(table.slice(i, 3000), 0.25, seed=3).column("key").to_pylist()
             for i in range(0, len(keys), 3000)]
    assert whole == sum(parts, [])
    assert abs(len(whole) / len(keys) - 0.25) < 0.02
    other = kmeans_ray._sample(table, 0.25, seed=4).column("key").to_pylist()
    assert len(set(whole) & set(other)) < 0.4 * len(whole)      # a different seed, another draw


def test_each_demo_task_routes_to_the_expert_holding_its_domain(clustered, world):
    """For every demo task, the expert with most of that domain's assigned training
    captions gets the largest routing weight (authors' routing, default constants)."""
    from pipeline.data.encoders import CaptionEncoder
    from pipeline.evaluation.ensemble import class_embeddings, routing_weights

    run = RunDir(str(clustered), StorageConfig())
    c = clusters.load(run)
    truth = pd.read_parquet(world / "truth.parquet")
    rows = pd.read_parquet(clustered / "assignments").merge(truth, on="key")
    holder = rows.groupby("domain")["expert_id"].agg(lambda s: s.value_counts().idxmax())
    encoder = CaptionEncoder("minilm-offline")
    world_json = json.loads((world / "world.json").read_text())
    routed = {}
    for task in world_json["train_domains"]:
        folder = world / "eval" / task
        names = (folder / "classnames.txt").read_text().split("\n")
        templates = (folder / "zeroshot_classification_templates.txt").read_text().split("\n")
        e = class_embeddings(encoder, [n for n in names if n], [t for t in templates if t])
        w = routing_weights(e, c["fine_centroids"], c["fine_to_expert"], len(c["coarse_centroids"]))
        routed[task] = int(np.argmax(w))
    assert routed == {d: int(holder[d]) for d in routed}
    assert len(set(routed.values())) == len(routed)   # four tasks, four different experts


@pytest.mark.parametrize("block_rows", [4096, 300])
def test_the_same_embeddings_in_another_layout_get_the_same_assignments(ray_local, tmp_path, block_rows):
    """Balanced assignment gives a row the centre that still has room, so it depends on which rows
    share its block and on their order. Blocks are drawn by key hash and assigned in key order:
    the same rows in other files, in another order, get bit-identical assignments (a killed and
    rerun job writes its embeddings in another layout: docs/bad_input.md)."""
    import ray.data

    from pipeline.clustering.kmeans_ray import assign_dataset
    from pipeline.core.config import ClusterConfig

    rng = np.random.default_rng(0)
    keys = np.array([f"{i:09d}" for i in range(1000)], dtype=object)
    x = rng.normal(size=(1000, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    fine, to_expert = x[:10].copy(), np.arange(10) % 2
    c = ClusterConfig(fine_k=10, num_experts=2, block_rows=block_rows, capacity_slack=0.0)
    layouts = {"ordered": np.arange(1000), "shuffled": rng.permutation(1000)}
    got = {}
    for name, order in layouts.items():
        folder = tmp_path / name
        folder.mkdir()
        for i, part in enumerate(np.array_split(order, 3 if name == "ordered" else 7)):
            pq.write_table(embedding_table(keys[part], x[part]), folder / f"{i}.parquet")
        ds = ray.data.read_parquet(str(folder))
        got[name] = assign_dataset(ds, 1000, fine, to_expert, c).to_pandas() \
            .sort_values("key").reset_index(drop=True)
    pd.testing.assert_frame_equal(got["ordered"], got["shuffled"])
    counts = np.bincount(got["ordered"].fine_id, minlength=10)
    assert counts.max() <= 100 * (2 if block_rows < 1000 else 1)   # capacities held per block


def _import_table(rows: pd.DataFrame, dim: int | None = None) -> pa.Table:
    """Embeddings as another tool writes them: a variable-length list of float64 per key."""
    vectors = [None if v is None else [float(x) for x in v] for v in rows.embedding]
    return pa.table({"key": pa.array(rows.key.tolist(), pa.string()),
                     "embedding": pa.array(vectors, pa.list_(pa.float64()))})


def test_imported_embeddings_are_counted_normalised_and_clustered_end_to_end(ray_local, clustered, world, tmp_path):
    """jobs/embed.py --from: vectors made elsewhere (not unit length, float64, in a layout of
    their own) become the embeddings stage; a good sample without a usable vector is skipped
    under its reason, a key ingest did not keep is counted and left out, and the stages after
    it run on the import as on encoded vectors, down to training_data's counts."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(clustered, run_dir)
    own = pd.read_parquet(clustered / "embeddings").sort_values("key").reset_index(drop=True)
    rng = np.random.default_rng(0)
    rows = own.copy()
    rows["embedding"] = [np.asarray(v, np.float64) * s for v, s in
                         zip(rows.embedding, rng.uniform(0.5, 4, len(rows)), strict=True)]
    missing = set(rows.key[:5])
    nan, zero, short, null = rows.key[5:9]
    rows = rows.iloc[5:].reset_index(drop=True)
    rows.at[0, "embedding"] = np.full(384, np.nan)
    rows.at[1, "embedding"] = np.zeros(384)
    rows.at[2, "embedding"] = rows.embedding[2][:383]
    rows.at[3, "embedding"] = None
    strangers = pd.DataFrame({"key": [f"elsewhere-{i}" for i in range(4)],
                              "embedding": list(rng.normal(size=(4, 384)))})
    source = tmp_path / "bought"
    source.mkdir()
    table = _import_table(pd.concat([rows, strangers]).sample(frac=1, random_state=1))
    pq.write_table(table.slice(0, 1000), source / "a.parquet")
    pq.write_table(table.slice(1000), source / "b.parquet")

    common = ["--run-dir", str(run_dir), "--set", "cluster.fine_k=32", "--set", "cluster.restarts=2",
              "--set", "cluster.capacity_slack=0.003"]
    assert embed_job.main([*common, "--from", str(source)]) == 0
    m = manifest(run_dir, "embeddings")
    assert m["rows_in"] == len(own) and m["rows_out"] == len(own) - 9
    assert m["rows_skipped"] == {"no_embedding": 6, "embedding_not_finite": 1, "embedding_zero": 1,
                                 "embedding_wrong_dim": 1}
    assert m["stats"]["unknown_keys"] == 4 and m["stats"]["imported_from"] == str(source)
    imported = pd.read_parquet(run_dir / "embeddings").sort_values("key").reset_index(drop=True)
    assert not set(imported.key) & {*missing, nan, zero, short, null, *strangers.key}
    x = np.stack(imported.embedding.to_numpy())
    assert x.dtype == np.float32 and np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-6)
    mine = np.stack(own.set_index("key").loc[imported.key].embedding.to_numpy())
    assert np.abs(x - mine).max() < 1e-6      # the same directions, made unit length again

    # the stages after it take the import as they take encoded vectors
    assert cluster_job.main(common) == 0 and assign_job.main(common) == 0
    assert manifest(run_dir, "assignments")["rows_out"] == m["rows_out"]
    cfg = load_config(str(run_dir / "config.yaml"))
    td = stages.run_stage("training_data", cfg, RunDir(str(run_dir), StorageConfig()), log=lambda *_: None)
    ingested = manifest(run_dir, "ingest")
    assert td["rows_out"] == m["rows_out"] and td["rows_skipped"]["not_embedded"] == 9
    assert td["rows_in"] == ingested["rows_in"] == td["rows_out"] + sum(td["rows_skipped"].values())
    # the whole-pipeline job keeps the import: every stage up to assign is complete as it is
    from jobs import run_pipeline
    assert run_pipeline.main([*common, "--data", str(world / "train"), "--until", "assign"]) == 0
    assert manifest(run_dir, "embeddings") == m


def test_an_import_that_does_not_fit_is_refused_with_the_reason(ray_local, clustered, tmp_path):
    """Vectors of another dimension than embed.model's (routing embeds class names with it), a
    file without an `embedding` column, and a key given two vectors are refused, and the
    embeddings the run had stay complete."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(clustered, run_dir)
    own = pd.read_parquet(clustered / "embeddings")
    args = ["--run-dir", str(run_dir), "--from"]
    wide = own.assign(embedding=[np.ones(512)] * len(own))
    pq.write_table(_import_table(wide), tmp_path / "wide.parquet")
    with pytest.raises(ValueError, match=r"512-d, but embed.model .* gives 384-d"):
        embed_job.main([*args, str(tmp_path / "wide.parquet")])
    pq.write_table(pa.table({"key": own.key.tolist()}), tmp_path / "keys.parquet")
    with pytest.raises(ValueError, match=r"no column \['embedding'\]"):
        embed_job.main([*args, str(tmp_path / "keys.parquet")])
    assert manifest(run_dir, "embeddings")["stats"]["captions_encoded"] > 0   # untouched so far
    twice = pd.concat([own, own.iloc[:3]])
    pq.write_table(_import_table(twice), tmp_path / "twice.parquet")
    with pytest.raises(ValueError, match="3 rows repeat a key"):
        embed_job.main([*args, str(tmp_path / "twice.parquet")])
    assert not (run_dir / "embeddings" / "_manifest.json").exists()   # incomplete, not wrong
