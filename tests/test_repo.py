import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_cluster_image_matches_pinned_ray():
    pinned = re.search(r"^ray\[[^\]]*\]==([\d.]+)", (REPO / "requirements.txt").read_text(), re.M)
    cluster = yaml.safe_load((REPO / "cluster.yaml").read_text())
    assert cluster["docker"]["image"].startswith(f"rayproject/ray:{pinned.group(1)}-")
    assert cluster["head_node_type"] in cluster["available_node_types"]


def test_every_job_has_a_readme_entry_and_help():
    readme = (REPO / "README.md").read_text()
    for job in sorted((REPO / "jobs").glob("*.py")):
        assert f"jobs/{job.name}" in readme, f"{job.name} is not documented in README.md"


def test_every_job_answers_help(capsys):
    import importlib.util

    import pytest

    for job in sorted((REPO / "jobs").glob("*.py")):
        spec = importlib.util.spec_from_file_location(f"job_{job.stem}", job)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        with pytest.raises(SystemExit) as exit_info:
            module.main(["--help"])
        assert exit_info.value.code == 0
        assert "--set" in capsys.readouterr().out, job.name
