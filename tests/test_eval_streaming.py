"""Streaming evaluation and batch prediction (pipeline/evaluation/scoring.py): the actors' tallies
give the numbers an in-memory reference gives, and batch prediction the one-image form's."""

import json

import numpy as np
import pandas as pd
import pytest

from pipeline.core.config import load_config
from tests.tiny import EXPERTS, copy_run

TASKS = ("shapes", "digits")


def _reference(ens, task, logits, runs, weights=None):
    """(acc1, acc5, mean per-class recall) of one row computed in memory from whole-task logits."""
    mixed = (np.mean([logits[r] for r in runs], axis=0) if weights is None
             else sum(w * logits[r] for r, w in zip(runs, weights, strict=True)))
    order = np.argsort(-mixed, axis=1, kind="stable")
    top1 = order[:, 0] == task.labels
    top5 = (order[:, :5] == task.labels[:, None]).any(axis=1)
    recall = [top1[task.labels == c].mean() for c in np.unique(task.labels)]
    return float(top1.mean()), float(top5.mean()), float(np.mean(recall))


def test_streamed_evaluation_equals_the_in_memory_reference(trained, tiny_world, tmp_path):
    from jobs import evaluate as evaluate_job
    from pipeline.evaluation import eval as evaluation
    from pipeline.evaluation.ensemble import MoDEEnsemble

    run = copy_run(trained, tmp_path / "run")
    uris = [str(tiny_world / "eval" / t) for t in TASKS]
    assert evaluate_job.main(["--run-dir", run.uri, "--tasks", uris[0], "--tasks", uris[1]]) == 0
    out = tmp_path / "run" / "eval"
    report = json.loads((out / "report.json").read_text())

    cfg = load_config("demo")
    ens = MoDEEnsemble(run.uri, cfg)
    experts = [f"expert-{e}" for e in range(EXPERTS)]
    # validation: every grid point's accuracy, from the val images held in memory
    for uri in uris:
        val = evaluation.read_task(uri, cfg.storage, "val")
        assert report["routing_selection"]["tasks"][val.name] == evaluation.grid_accuracy(ens, val)
    chosen = evaluation.ROUTING_GRID[report["routing_selection"]["chosen"]]
    for uri in uris:
        task = evaluation.read_task(uri, cfg.storage)
        logits = {r: ens.logits(r, task.images, task.classnames, task.templates) for r in ens.registry}
        rows = {e: ([e], None) for e in experts}
        for label, params in {**evaluation.METHODS, evaluation.VALIDATED: chosen}.items():
            rows[label] = (experts, ens.weights(task.classnames, task.templates, **params))
        rows.update({label: (runs, None) for label, runs in evaluation.baseline_rows(ens).items()})
        acc = report["zero_shot"][task.name]["accuracy"]
        assert set(acc) == {*rows, "oracle"} and report["zero_shot"][task.name]["images"] == len(task.labels)
        for label, (runs, weights) in rows.items():
            acc1, acc5, recall = _reference(ens, task, logits, runs, weights)
            assert acc[label] == acc1, label            # exactly: counts over the same images
            # clip_benchmark's result file of the same row
            name = evaluation.clip_benchmark_name(task.name, label)
            result = json.loads((out / "clip_benchmark" / name).read_text())
            assert {k: result[k] for k in ("dataset", "model", "task", "language")} == {
                "dataset": task.name, "model": label, "task": "zeroshot_classification", "language": "en"}
            assert result["metrics"] == pytest.approx(
                {"acc1": acc1, "acc5": acc5, "mean_per_class_recall": recall}, abs=1e-12)
    assert len(list((out / "clip_benchmark").glob("*.json"))) == len(TASKS) * (len(acc) - 1)  # not oracle


def test_batch_prediction_writes_what_the_one_image_form_prints(trained, tmp_path, capsys):
    from jobs import predict as predict_job
    from pipeline.data.demo_world import render

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i, label in enumerate(("star", "square")):
        (folder / f"{i}-{label}.jpg").write_bytes(render(rng, "shapes", label, 32)[0])
    (folder / "notes.txt").write_text("not an image: not read")
    labels = ["circle", "star", "square", "triangle"]
    common = ["--run-dir", str(trained), "--labels", ",".join(labels), "--top-k", "2"]
    assert predict_job.main([*common, "--images", str(folder), "--out", str(tmp_path / "out"),
                             "--show", "3"]) == 0
    table = pd.read_parquet(tmp_path / "out").sort_values("key")
    assert list(table["key"]) == [str(f) for f in sorted(folder.glob("*.jpg"))]
    assert table["error"].isna().all()
    capsys.readouterr()
    for _, row in table.iterrows():
        assert len(row["labels"]) == 3 and list(row["probs"]) == sorted(row["probs"], reverse=True)
        assert predict_job.main([*common, "--image", row["key"], "--show", "4"]) == 0
        _, *lines = capsys.readouterr().out.strip().splitlines()
        printed = [(line.split()[-1], float(line.split("%")[0]) / 100) for line in lines[:4]]
        assert printed[0][0] == row["labels"][0]
        assert dict(printed)[row["labels"][1]] == pytest.approx(row["probs"][1], abs=5e-4)
        assert printed[0][1] == pytest.approx(row["probs"][0], abs=5e-4)
        weights = [float(x.split()[-1]) for x in lines[-1].removeprefix("expert weights: ").split(",")]
        assert weights == pytest.approx(list(row["weights"]), abs=5e-4)
        assert sum(w > 0 for w in row["weights"]) == 2          # --top-k 2
    with pytest.raises(SystemExit):     # a folder with no image in it: a usage error
        predict_job.main([*common, "--images", str(tmp_path / "out"), "--out", str(tmp_path / "x")])
