"""A job's driver killed (SIGKILL) in every data stage, then submitted again.

Each job is a separate driver process, `jobs/run_pipeline.py --until training_data`, joined to
the test run's local Ray. A test hook (`faults.KILL_BEFORE_MANIFEST_ENV`) makes it SIGKILL itself when
a stage's outputs are all written and its manifest is not, which is the worst moment: the outputs
look finished. Job k is killed in stage k. Because the unit before it was killed too, each job
first completes that stage, then dies in its own. A last job finishes. The outputs must equal
those of the uninterrupted `hostile_run` over the same shards (hostile ones among them) and config
(`pipeline.core.compare.differences`): the same rows and keys, no duplicates, embeddings within 1e-5,
clusters and assignments bit-identical.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.compare import DATA_STAGES as STAGES
from pipeline.core.compare import differences
from pipeline.core.faults import KILL_BEFORE_MANIFEST_ENV
from tests.tiny import TINY

REPO = Path(__file__).resolve().parents[1]


def _job(ray_address: str, run_dir: Path, data: Path, kill: str | None) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": ray_address, "PYTHONPATH": str(REPO)}
    env.pop(KILL_BEFORE_MANIFEST_ENV, None)
    if kill:
        env[KILL_BEFORE_MANIFEST_ENV] = kill
    return subprocess.run([sys.executable, "jobs/run_pipeline.py", "--run-dir", str(run_dir),
                           "--data", str(data), "--until", "training_data", *TINY],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
@pytest.mark.reliability
def test_a_job_killed_in_each_stage_reruns_to_the_outputs_of_an_uninterrupted_run(
        ray_local, hostile_run, hostile_world, tmp_path):
    address = ray_local.get_runtime_context().gcs_address
    run, data, seeded = tmp_path / "run", hostile_world[0], hostile_run
    for i, stage in enumerate(STAGES):
        job = _job(address, run, data, kill=stage)
        assert job.returncode == -9, (stage, job.stdout[-2000:], job.stderr[-3000:])
        assert any((run / stage).iterdir()), stage                   # outputs written ...
        assert not (run / stage / "_manifest.json").exists(), stage  # ... and no manifest
        for done in STAGES[:max(i - 1, 0)]:
            assert f"[{done}] complete for this config: skipped" in job.stdout, (stage, done)
        if i:   # the stage killed in the job before is redone, not taken as it was left
            assert f"[{STAGES[i - 1]}] complete for this config" not in job.stdout, stage
    last = _job(address, run, data, kill=None)
    assert last.returncode == 0, last.stderr[-3000:]
    for done in STAGES[:-1]:
        assert f"[{done}] complete for this config: skipped" in last.stdout, done

    assert differences(run, seeded) == []
    # the comparison can fail: a centre moved by 1e-6 is not bit-identical
    moved = tmp_path / "moved"
    shutil.copytree(run, moved)
    fine = np.load(moved / "clusters" / "fine_centroids.npy")
    fine[0, 0] += 1e-6
    np.save(moved / "clusters" / "fine_centroids.npy", fine)
    assert differences(moved, seeded, ("clusters",)) == \
        ["clusters/fine_centroids.npy: not bit-identical (the embeddings are)"]
