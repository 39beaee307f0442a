"""jobs/run_pipeline.py: every stage in one driver, each skipped when complete. (The 3-node test
runs it for real from ingest to the seed, by `ray job submit`.)"""

import pytest

from jobs import run_pipeline
from tests.tiny import TINY, copy_run


def test_a_second_submission_skips_every_complete_part(seeded, tiny_world, tmp_path, capsys):
    run = copy_run(seeded, tmp_path / "run")
    assert run_pipeline.main(["--run-dir", run.uri, "--data", str(tiny_world / "train"),
                              "--until", "seed", *TINY]) == 0
    out = capsys.readouterr().out
    for unit in ("ingest", "embeddings", "clusters", "assignments", "training_data", "seed"):
        assert f"[{unit}] complete for this config: skipped" in out, unit
    assert "expert-0" not in out      # --until seed: no expert is planned


def test_nothing_to_evaluate_is_refused_before_any_work(seeded, tiny_world, tmp_path, capsys):
    run = copy_run(seeded, tmp_path / "run")     # no demo world next to it, no --tasks
    with pytest.raises(SystemExit):
        run_pipeline.main(["--run-dir", run.uri, "--data", str(tiny_world / "train"), *TINY])
    err = capsys.readouterr().err
    assert "nothing to evaluate" in err and "--until experts" in err
    assert not (tmp_path / "run" / "checkpoints" / "expert-0").exists()
