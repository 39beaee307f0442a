import json
import sys
from pathlib import Path

import pandas as pd
import pytest

from pipeline import ingest
from pipeline.config import load_config
from pipeline.rundir import CountMismatch, RunDir
from tests.test_ingest import plant_bad_shards

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
import ingest as ingest_job  # noqa: E402  (jobs/ingest.py)


def test_ingest_stage_counts_add_up_and_outputs_every_row(ray_local, tmp_path):
    (tmp_path / "data").mkdir()
    expected, good = plant_bad_shards(tmp_path / "data")
    run = RunDir(str(tmp_path / "run"), load_config("demo").storage)
    m = ingest.run_stage(load_config("demo"), run, str(tmp_path / "data"), log=lambda *_: None)
    assert m["rows_skipped"] == expected
    assert m["rows_in"] == m["rows_out"] + sum(m["rows_skipped"].values())
    samples = pd.read_parquet(tmp_path / "run" / "ingest" / "samples")
    skipped = pd.read_parquet(tmp_path / "run" / "ingest" / "skipped")
    assert set(samples.key) == good and len(samples) == m["rows_out"]
    assert skipped.skip_reason.value_counts().to_dict() == expected
    on_disk = json.loads((tmp_path / "run" / "ingest" / "_manifest.json").read_text())
    assert on_disk == m and m["stage"] == "ingest" and m["code_version"].startswith("src-")


def test_rerun_skips_a_complete_stage_and_reruns_on_config_change(ray_local, tiny_world, tmp_path,
                                                                  monkeypatch):
    run_dir = str(tmp_path / "run")
    argv = ["--run-dir", run_dir, "--data", str(tiny_world / "train")]
    assert ingest_job.main(argv) == 0
    first = json.loads((tmp_path / "run" / "ingest" / "_manifest.json").read_text())
    assert first["rows_in"] == 600

    def must_not_read(*args, **kwargs):
        raise AssertionError("a complete stage was run again")

    monkeypatch.setattr(ingest, "read_samples", must_not_read)
    assert ingest_job.main(argv) == 0          # same config: skipped, manifest untouched
    again = json.loads((tmp_path / "run" / "ingest" / "_manifest.json").read_text())
    assert again == first
    with pytest.raises(AssertionError, match="run again"):
        ingest_job.main([*argv, "--set", "data.seed=5"])   # changed config: the stage reruns
    assert not (tmp_path / "run" / "ingest" / "_manifest.json").exists()  # incomplete now


def test_manifest_refuses_counts_that_do_not_add_up(tmp_path):
    run = RunDir(str(tmp_path), load_config("demo").storage)
    with pytest.raises(CountMismatch, match="rows_in=10"):
        run.finish("ingest", config_hash="x", inputs={}, rows_in=10, rows_out=8,
                   rows_skipped={"empty_caption": 1}, started_at="t")
    assert run.manifest("ingest") is None


def test_run_directory_on_s3(ray_local, tiny_world, s3_endpoint):
    argv = ["--run-dir", "s3://mode/runs/a", "--data", str(tiny_world / "train"),
            "--set", f"storage.s3_endpoint_url={s3_endpoint}"]
    assert ingest_job.main(argv) == 0
    run = RunDir("s3://mode/runs/a", load_config("demo", argv[-1:]).storage)
    m = run.manifest("ingest")
    assert m["rows_in"] == 600 and run.has_config()
    assert run.fs.glob(run.stage_path("ingest", "samples", "*.parquet"))


def test_job_reports_config_errors_by_name(tmp_path):
    with pytest.raises(SystemExit, match=r"unknown field cluster\.bogus"):
        ingest_job.main(["--run-dir", str(tmp_path), "--data", "x", "--set", "cluster.bogus=1"])
