"""Security basics (docs/cluster.md, "Security"): checkpoints are read weights-only everywhere, so a
planted pickle payload is refused before it runs; the cluster configs keep the dashboard off
the network where they can."""

import re
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.core.config import StorageConfig
from pipeline.data.encoders import CaptionEncoder
from pipeline.training.checkpoint_io import UnsafeCheckpoint, load_model, read_checkpoint

REPO = Path(__file__).resolve().parent.parent


class _Payload:
    """Unpickling this object calls ``open(marker, "w")``: a stand-in for any code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture
def planted(tmp_path):
    """A checkpoint directory whose checkpoint.pt holds real weights and a payload."""
    import open_clip

    from pipeline.training.model import register_configs

    register_configs()
    marker = tmp_path / "payload-ran"
    folder = tmp_path / "step_00000004"
    folder.mkdir()
    state = {"model": open_clip.create_model("mode-tiny").state_dict(), "model_name": "mode-tiny",
             "step": 4, "samples_seen": 128, "note": _Payload(marker)}
    torch.save(state, folder / "checkpoint.pt")
    return folder, marker


def test_a_planted_pickle_payload_is_refused_and_never_runs(planted):
    folder, marker = planted
    with pytest.raises(UnsafeCheckpoint, match="refused, not a weights-only checkpoint"):
        read_checkpoint(str(folder), StorageConfig())
    with pytest.raises(UnsafeCheckpoint, match="step_00000004/checkpoint.pt"):
        load_model(str(folder), StorageConfig())          # what evaluation and predict load
    with pytest.raises(UnsafeCheckpoint):                  # a text tower from a checkpoint file
        CaptionEncoder(f"open_clip:mode-tiny@{folder / 'checkpoint.pt'}")
    assert not marker.exists()
    # the payload is live: a full unpickle would have run it
    torch.load(folder / "checkpoint.pt", weights_only=False)
    assert marker.exists()


def test_every_checkpoint_load_in_the_code_goes_through_the_weights_only_loader():
    """The training loop's resume, the seed's init, inference and the encoders all read
    checkpoints with pipeline.training.checkpoint_io.load_state; no other torch.load exists."""
    found = {str(p.relative_to(REPO)): len(re.findall(r"torch\.load\(", p.read_text()))
             for folder in ("pipeline", "jobs", "bench") for p in (REPO / folder).rglob("*.py")}
    assert {p: n for p, n in found.items() if n} == {"pipeline/training/checkpoint_io.py": 1}
    source = (REPO / "pipeline" / "training" / "checkpoint_io.py").read_text()
    assert 'torch.load(source, map_location="cpu", weights_only=True)' in source


def test_the_cluster_launcher_config_keeps_the_dashboard_on_the_head_loopback():
    """cluster.yaml: the dashboard (and so the job API) listens on the head's 127.0.0.1 only;
    users reach it through `ray dashboard cluster.yaml` (an SSH tunnel), with token auth on."""
    cfg = yaml.safe_load((REPO / "cluster.yaml").read_text())
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    for commands in (cfg["head_start_ray_commands"], cfg["worker_start_ray_commands"]):
        assert all("RAY_AUTH_MODE=token" in c for c in commands if "ray start" in c)
