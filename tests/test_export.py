"""The export bundle: open_clip alone loads an expert with the project's features, the bundle's
routed zero-shot is what the evaluation reported, the manifest's hashes hold and a damaged file
is refused by name."""

import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from jobs import export as export_job
from pipeline.core.config import StorageConfig
from pipeline.evaluation.export import WEIGHTS_FILE, DamagedBundle, load_bundle
from tests.tiny import BASELINES, EXPERTS, copy_run, registry_of

TASK = "shapes"
TEXTS = ["a circle.", "a drawing of a square.", "a star shape."]

# Loads one exported folder with open_clip and nothing else, in a fresh interpreter (no
# `pipeline` import, no architecture registered by the project), and saves what it computes.
OPEN_CLIP_ALONE = """
import json, sys
import numpy as np, open_clip, torch
from PIL import Image

folder, out, texts, *images = sys.argv[1:]
model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + folder)
tokenizer = open_clip.get_tokenizer("local-dir:" + folder)
with torch.no_grad():
    pixels = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in images])
    tokens = tokenizer(json.loads(texts))
    image = model.eval().encode_image(pixels, normalize=True)
    text = model.encode_text(tokens, normalize=True)
assert not [m for m in sys.modules if m.split(".")[0] in ("pipeline", "jobs", "tests")]
np.savez(out, pixels=pixels.numpy(), tokens=tokens.numpy(), image=image.numpy(), text=text.numpy())
"""


@pytest.fixture(scope="module")
def evaluated(trained, tiny_world, tmp_path_factory):
    """A copy of the trained run evaluated on one task, and its bundle (baselines included)."""
    from jobs import evaluate as evaluate_job

    root = tmp_path_factory.mktemp("export")
    run = copy_run(trained, root / "run")
    assert evaluate_job.main(["--run-dir", run.uri, "--tasks", str(tiny_world / "eval" / TASK)]) == 0
    assert export_job.main(["--run-dir", run.uri, "--out", str(root / "bundle"), "--baselines"]) == 0
    return Path(run.uri), root / "bundle"


def _task(tiny_world):
    from pipeline.evaluation.eval import read_task

    return read_task(str(tiny_world / "eval" / TASK), StorageConfig())


def test_open_clip_alone_loads_an_expert_with_the_projects_features(evaluated, tiny_world, tmp_path):
    import torch
    from PIL import Image

    from pipeline.training.checkpoint_io import load_model
    from pipeline.training.model import CONFIG_DIR

    run_dir, bundle = evaluated
    with tarfile.open(tiny_world / "eval" / TASK / "test" / "0.tar") as tar:
        jpgs = [m for m in tar.getmembers() if m.name.endswith(".jpg")][:6]
        images = []
        for m in jpgs:
            (tmp_path / m.name).write_bytes(tar.extractfile(m).read())
            images.append(str(tmp_path / m.name))
    name = "expert-1"
    subprocess.run([sys.executable, "-c", OPEN_CLIP_ALONE, str(bundle / "models" / name),
                    str(tmp_path / "alone.npz"), json.dumps(TEXTS), *images], cwd=tmp_path, check=True)
    alone = np.load(tmp_path / "alone.npz")

    model, preprocess, tokenizer = load_model(registry_of(run_dir)[name]["checkpoint"], StorageConfig())
    with torch.no_grad():
        pixels = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in images])
        tokens = tokenizer(TEXTS)
        image = model.encode_image(pixels, normalize=True).numpy()
        text = model.encode_text(tokens, normalize=True).numpy()
    # The same transform and tokenizer: identical inputs.
    np.testing.assert_array_equal(alone["pixels"], pixels.numpy())
    np.testing.assert_array_equal(alone["tokens"], tokens.numpy())
    # The same weights and maths in another process: only the order of float32 sums may differ
    # (thread splits), about 1e-7 per component of these unit vectors (0.0 measured here);
    # 1e-6 allows a few such roundings and is far below what a wrong weight
    # or transform gives (differences of order 0.1).
    np.testing.assert_allclose(alone["image"], image, rtol=0, atol=1e-6)
    np.testing.assert_allclose(alone["text"], text, rtol=0, atol=1e-6)
    # the whole architecture travels in the config: one open_clip does not ship
    config = json.loads((bundle / "models" / name / "open_clip_config.json").read_text())
    assert config["model_cfg"] == json.loads((CONFIG_DIR / "mode-tiny.json").read_text())


def test_the_bundle_classifies_as_the_evaluation_reported(evaluated, tiny_world):
    from pipeline.evaluation.ensemble import MoDEEnsemble
    from pipeline.evaluation.eval import DEFAULT_METHOD, METHODS, accuracy, zero_shot_task

    run_dir, bundle = evaluated
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    reported = report["zero_shot"][TASK]
    task = _task(tiny_world)
    ens = load_bundle(str(bundle))
    assert ens.num_experts == EXPERTS and ens.levels == [(8, EXPERTS)]
    out = ens.zero_shot(task.images, task.classnames, task.templates, **METHODS[DEFAULT_METHOD])
    assert accuracy(out.logits, task.labels) == reported["accuracy"][DEFAULT_METHOD]
    # the run's own ensemble, in this process: the very same logits
    own = MoDEEnsemble(str(run_dir)).zero_shot(task.images, task.classnames, task.templates,
                                               **METHODS[DEFAULT_METHOD])
    np.testing.assert_array_equal(out.logits, own.logits)
    assert out.weights.tolist() == pytest.approx(reported["weights"][DEFAULT_METHOD], abs=1e-12)
    # the routing chosen on validation travels with the bundle; every row of the report, the
    # baselines' too, comes out the same from the bundle alone
    assert ens.routing["validated"] == report["routing_selection"]["params"]
    assert zero_shot_task(ens, task, ens.routing["validated"])["accuracy"] == reported["accuracy"]
    manifest = ens.manifest
    assert manifest["evaluation"]["zero_shot"][TASK]["accuracy"] == reported["accuracy"]
    assert {e["name"]: e["eval"][TASK] for e in manifest["experts"]} == \
        {f"expert-{e}": reported["accuracy"][f"expert-{e}"] for e in range(EXPERTS)}


def test_the_manifest_hashes_every_file_and_a_damaged_one_is_named(evaluated, tmp_path):
    run_dir, bundle = evaluated
    manifest = json.loads((bundle / "manifest.json").read_text())
    on_disk = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()}
    assert set(manifest["files"]) == on_disk - {"manifest.json"}
    for rel, record in manifest["files"].items():
        data = (bundle / rel).read_bytes()
        assert record == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, rel
    entries = registry_of(run_dir)
    assert [e["name"] for e in manifest["experts"]] == [f"expert-{e}" for e in range(EXPERTS)]
    assert {e["name"] for e in manifest["baselines"]} == {"seed", *BASELINES}
    for e in manifest["experts"]:
        assert e["architecture"] == "mode-tiny" and e["folder"] == f"models/{e['name']}"
        assert (e["samples"], e["metrics"]) == (entries[e["name"]]["samples"], entries[e["name"]]["metrics"])
        assert e["source"]["sha256"] == entries[e["name"]]["sha256"]

    damaged = tmp_path / "damaged"
    shutil.copytree(bundle, damaged)
    weights = damaged / "models" / "expert-2" / WEIGHTS_FILE
    good = weights.read_bytes()
    weights.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))      # one flipped bit
    with pytest.raises(DamagedBundle, match=f"models/expert-2/{WEIGHTS_FILE}: its SHA-256"):
        load_bundle(str(damaged))
    weights.write_bytes(good)
    (damaged / "routing" / "fine_centroids.npy").unlink()
    with pytest.raises(DamagedBundle, match="routing/fine_centroids.npy: missing"):
        load_bundle(str(damaged))


def test_export_refuses_a_run_without_experts_and_an_occupied_destination(seeded, evaluated, tmp_path,
                                                                          capsys):
    run_dir, bundle = evaluated
    with pytest.raises(SystemExit, match="no finished expert in its registry"):
        export_job.main(["--run-dir", str(seeded), "--out", str(tmp_path / "none")])
    assert not (tmp_path / "none").exists()
    with pytest.raises(SystemExit, match="exists and is not empty.*--force"):
        export_job.main(["--run-dir", str(run_dir), "--out", str(bundle)])
    # --force replaces a bundle: the baselines it no longer holds are gone
    again = tmp_path / "again"
    shutil.copytree(bundle, again)
    assert export_job.main(["--run-dir", str(run_dir), "--out", str(again), "--force"]) == 0
    assert sorted(p.name for p in (again / "models").iterdir()) == [f"expert-{e}" for e in range(EXPERTS)]
    assert json.loads((again / "manifest.json").read_text())["baselines"] == []
    # an export that stopped before its manifest is started again
    (again / "manifest.json").unlink()
    (again / "models" / "expert-9").mkdir()
    (again / "models" / "expert-9" / WEIGHTS_FILE).write_bytes(b"partial")
    assert export_job.main(["--run-dir", str(run_dir), "--out", str(again), "--force"]) == 0
    assert not (again / "models" / "expert-9").exists()
    load_bundle(str(again))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="holds no bundle"):
        export_job.main(["--run-dir", str(run_dir), "--out", str(tmp_path / "other"), "--force"])
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_a_remote_bundle_loads_from_a_local_copy(evaluated, tiny_world, tmp_path):
    import fsspec

    run_dir, bundle = evaluated
    # fsspec's in-memory store stands for any URL (s3://, gs://...): the same remote code path,
    # without moving the bundle through a local S3 server
    uri = "memory://bundles/tiny"
    assert export_job.main(["--run-dir", str(run_dir), "--out", uri]) == 0
    ens = load_bundle(uri, cache_dir=str(tmp_path / "cache"))
    assert Path(ens.folder).parent == tmp_path / "cache"
    local = load_bundle(str(bundle))
    # the same run exported twice: the same files, byte for byte (its experts' at least)
    assert {k: v for k, v in local.manifest["files"].items() if k in ens.manifest["files"]} == \
        ens.manifest["files"]
    task = _task(tiny_world)
    np.testing.assert_array_equal(ens.image_features("expert-0", task.images).numpy(),
                                  local.image_features("expert-0", task.images).numpy())
    # a file lost from the store: the cached copy still serves; a fresh cache names the file
    fsspec.filesystem("memory").rm("/bundles/tiny/routing/routing.json")
    assert load_bundle(uri, cache_dir=str(tmp_path / "cache")).num_experts == EXPERTS
    with pytest.raises(DamagedBundle, match="memory://bundles/tiny/routing/routing.json: missing"):
        load_bundle(uri, cache_dir=str(tmp_path / "fresh"))
    fsspec.filesystem("memory").rm("/bundles/tiny", recursive=True)
