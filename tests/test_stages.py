"""The stage graph (pipeline/core/stages.py): the table, exact rerun triggers, the config views, the
manifest contract, and a rerun that skips every stage a change does not concern."""

import importlib
import json
import warnings
from pathlib import Path

import pandas as pd
import pytest
import yaml

from jobs import ingest as ingest_job
from pipeline.core import stages
from pipeline.core.config import (
    REMOVED_FIELDS,
    Config,
    RemovedFieldWarning,
    UndeclaredField,
    field_names,
    load_config,
)
from pipeline.core.rundir import CountMismatch, RunDir, StageOutput
from pipeline.data import ingest
from tests.test_ingest import plant_bad_shards

EXTERNAL = {"ingest": {"data": "s3://bucket/shards"},
            "eval": {"tasks": ["s3://bucket/eval/a"], "retrieval": None, "truth": None}}


# ----------------------------------------------------------------------------- the table
def test_every_stage_has_its_module_folder_job_and_known_fields():
    """A stage's name is its run-directory folder and its module's name; its row holds its run
    function itself (the training runs' rows: the launcher, pipeline.training.checkpoints)."""
    names = set(field_names())
    for name, stage in stages.STAGES.items():
        folder = name.split("/", 1)[0]
        package, module_name = stage.module.rsplit(".", 1)
        assert module_name == folder and package.split(".")[1] in stages.PACKAGES, name
        module = importlib.import_module(stage.module)
        if "/" not in name:
            assert stage.run is module.run, name
        else:
            assert stage.run is None and stage.module == stages.LAUNCHER, name
        assert module.__file__.endswith(f"{stage.module.replace('.', '/')}.py")
        assert set(stage.fields) <= names and set(stage.knobs) <= names, name
        assert not set(stage.fields) & set(stage.knobs), name
        for read in stage.reads:
            assert read == stages.ALL_RUNS or read in stages.STAGES, (name, read)
        assert (Path(__file__).resolve().parents[1] / stage.job).is_file(), stage.job


def test_generation_stages_read_their_own_units_or_the_runs_and_have_code():
    names = set(field_names())
    for name, stage in stages.GENERATION_STAGES.items():
        if "/" not in name:
            shared = stages.STAGES.get(name)           # a data stage reused as it is, or growth's own
            expected = shared.module if shared and shared.run is stage.run else "pipeline.grow.growth"
            assert callable(stage.run) and stage.module == expected, name
        assert set(stage.fields) <= names and set(stage.knobs) <= names, name
        for read in stage.reads:
            local = read.removeprefix("{gen}")
            table = stages.GENERATION_STAGES if read.startswith("{gen}") else stages.STAGES
            assert local in table, (name, read)
    unit = stages.gen_unit("new", "novelty")
    assert stages.stage_of(unit) is stages.GENERATION_STAGES["novelty"]
    assert stages.reads(unit) == ("generations/new/embeddings", "clusters", "embeddings")
    assert stages.stage_of("generations/new/checkpoints/expert-4") is \
        stages.GENERATION_STAGES["checkpoints/expert"]
    assert stages.relative("clusters", "new") == "../clusters"
    assert stages.relative("generations/new/ingest", "new") == "ingest"


def test_removed_fields_are_gone_and_every_field_is_read_or_infrastructure():
    """A field no stage declares must be one that only jobs, or the stage engine around every
    stage (``ray.stage_retries``), read (where and how, not what)."""
    declared = {f for s in [*stages.STAGES.values(), *stages.GENERATION_STAGES.values()]
                for f in (*s.fields, *s.knobs)}
    jobs_only = {"data.train_uri", "train.max_concurrent", "ray.address", "ray.object_store_memory",
                 "ray.node_types", "ray.stage_retries"}
    unread = set(field_names()) - declared - jobs_only
    assert {f.split(".")[0] for f in unread} <= {"storage", "demo"}, sorted(unread)
    assert not set(REMOVED_FIELDS) & set(field_names())


def _changed(cfg: Config, path: str) -> Config:
    """The same config with one field set to another value of its type."""
    value = cfg.value(path)
    section, name = path.split(".")
    if isinstance(value, bool):
        new = not value
    elif isinstance(value, (int, float)):
        new = value + 1 if isinstance(value, int) else value + 0.125
    elif value is None:
        new = "x"
    elif path == "train.precision":
        new = "amp_bf16"
    elif path == "data.format":
        new = "parquet"
    else:
        new = value + "-x"
    assert new != value
    return cfg.replace(**{f"{section}__{name}": new})


def test_changing_a_field_reruns_exactly_the_stages_that_declare_it_and_their_downstream():
    """Item 2's rerun trigger, over every field of the config: a unit's hash changes iff it or
    a unit it reads (directly or not) declares the field."""
    base = load_config("demo")
    units = stages.planned_units(base)
    before = stages.planned_hashes(base, EXTERNAL)
    assert len(set(before.values())) == len(units)
    for path in field_names():
        after = stages.planned_hashes(_changed(base, path), EXTERNAL)
        rerun = {u for u in units if after[u] != before[u]}
        declaring = {u for u in units if path in stages.stage_of(u).fields}
        assert rerun == stages.downstream(declaring, units), path
    # the examples of the issue
    lr = stages.planned_hashes(_changed(base, "train.lr"), EXTERNAL)
    assert {u for u in units if lr[u] != before[u]} == {u for u in units if u.startswith("checkpoints/")} | {"eval"}
    rows = stages.planned_hashes(_changed(base, "embed.rows_per_file"), EXTERNAL)
    assert rows == before


def test_external_inputs_rerun_their_stage_and_downstream():
    base = load_config("demo")
    units = stages.planned_units(base)
    before = stages.planned_hashes(base, EXTERNAL)
    other = stages.planned_hashes(base, {**EXTERNAL, "ingest": {"data": "s3://bucket/other"}})
    assert {u for u in units if other[u] != before[u]} == set(units)
    tasks = stages.planned_hashes(base, {**EXTERNAL, "eval": {**EXTERNAL["eval"], "tasks": []}})
    assert {u for u in units if tasks[u] != before[u]} == {"eval"}


def test_a_stage_reads_only_what_it_declares():
    view = stages.view(load_config("demo"), "assignments")
    assert view.cluster.block_rows == 262_144 and view.cluster.rows_per_file > 0
    assert view.storage.s3_endpoint_url is None           # where data lives: always readable
    with pytest.raises(UndeclaredField, match=r"assignments reads cluster\.fine_k.*pipeline/core/stages\.py"):
        _ = view.cluster.fine_k
    with pytest.raises(UndeclaredField, match=r"train\.lr"):
        _ = view.train.lr
    assert "cluster.rows_per_file" not in view.values()   # a knob: readable, not hashed
    expert = stages.view(load_config("demo"), "checkpoints/expert-3")
    assert expert.train.ooc_ratio == 0.02
    with pytest.raises(UndeclaredField):
        _ = stages.view(load_config("demo"), "checkpoints/seed").train.ooc_ratio


def test_old_config_with_a_removed_field_loads_with_a_warning(tmp_path):
    saved = load_config("demo").to_dict()
    saved["data"]["seed"] = 5
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(saved))
    with pytest.warns(RemovedFieldWarning, match=r"data\.seed was removed"):
        cfg = load_config(str(path))
    assert cfg == load_config("demo")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config("demo")


# ----------------------------------------------------------------------------- manifests
def test_ingest_stage_counts_add_up_and_outputs_every_row(ray_local, tmp_path):
    (tmp_path / "data").mkdir()
    expected, good = plant_bad_shards(tmp_path / "data")
    run = RunDir(str(tmp_path / "run"), load_config("demo").storage)
    m = stages.run_stage("ingest", load_config("demo"), run, data=str(tmp_path / "data"),
                         log=lambda *_: None)
    assert m["rows_skipped"] == expected
    assert m["rows_in"] == m["rows_out"] + sum(m["rows_skipped"].values())
    samples = pd.read_parquet(tmp_path / "run" / "ingest" / "samples")
    skipped = pd.read_parquet(tmp_path / "run" / "ingest" / "skipped")
    assert set(samples.key) == good and len(samples) == m["rows_out"]
    assert skipped.skip_reason.value_counts().to_dict() == expected
    on_disk = json.loads((tmp_path / "run" / "ingest" / "_manifest.json").read_text())
    assert on_disk == m and m["stage"] == "ingest" and m["code_version"].startswith("src-")
    assert m["fields"] == {f: load_config("demo").value(f) for f in stages.DATA_FIELDS}
    assert m["inputs"] == {"upstream": {}, "external": {"data": str(tmp_path / "data")}}


def test_rerun_skips_a_complete_stage_and_reruns_on_a_declared_change(ray_local, tiny_world, tmp_path,
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
    assert ingest_job.main([*argv, "--set", "train.lr=0.1", "--set", "embed.rows_per_file=7"]) == 0
    again = json.loads((tmp_path / "run" / "ingest" / "_manifest.json").read_text())
    assert again == first
    with pytest.raises(AssertionError, match="run again"):
        ingest_job.main([*argv, "--set", "data.caption_column=text"])   # declared: reruns
    assert not (tmp_path / "run" / "ingest" / "_manifest.json").exists()  # incomplete now


def test_manifest_refuses_counts_that_do_not_add_up(tmp_path):
    run = RunDir(str(tmp_path), load_config("demo").storage)
    with pytest.raises(CountMismatch, match="rows_in=10"):
        run.write_manifest("ingest", config_hash="x", fields={}, knobs={}, inputs={},
                           output=StageOutput(10, 8, {"empty_caption": 1}), started_at="t")
    assert run.manifest("ingest") is None


def test_missing_and_stale_inputs_are_clear_errors(ray_local, tiny_world, tmp_path):
    cfg = load_config("demo")
    run = RunDir(str(tmp_path / "run"), cfg.storage)
    with pytest.raises(stages.MissingUpstream, match=r"embeddings reads .*ingest.*run jobs/ingest\.py first"):
        stages.run_stage("embeddings", cfg, run, log=lambda *_: None)
    stages.run_stage("ingest", cfg, run, data=str(tiny_world / "train"), log=lambda *_: None)
    other = load_config("demo", ["data.key_column=id"])
    with pytest.raises(stages.StaleUpstream, match=r"made with data\.key_column='key' \(the config "
                                                   r"now has 'id'\): rerun jobs/ingest\.py"):
        stages.StageRun("embeddings", other, run)
    assert stages.StageRun("embeddings", cfg, run).upstream["ingest"]["rows_in"] == 600


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
