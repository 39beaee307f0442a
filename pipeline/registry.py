"""The registry of trained runs: ``experts.json`` in the run directory.

A list of entries, oldest first, one per finished run (seed, experts, baselines): ``name``,
``kind``, ``expert_id``, ``fine_clusters`` it owns, ``samples``, ``checkpoint`` URI and its
``sha256``, ``metrics``, times (README, "Training"). The launcher in the driver is its only
writer: each change is an atomic rewrite, so readers never see a partial file. A run is complete
when its manifest (``checkpoints/<run>/_manifest.json``) is written, after its entry here.
"""

from __future__ import annotations

from typing import Any

from pipeline.rundir import RunDir
from pipeline.storage import read_json, write_json_atomic


def entries(run: RunDir) -> list[dict[str, Any]]:
    """Every registered run, oldest first (empty when there is no registry yet)."""
    return read_json(run.fs, run.experts_path) if run.fs.exists(run.experts_path) else []


def finished(run: RunDir) -> dict[str, dict[str, Any]]:
    """Registered runs by name."""
    return {entry["name"]: entry for entry in entries(run)}


def put(run: RunDir, entry: dict[str, Any]) -> None:
    """Add a run's entry, replacing an older entry of the same name."""
    kept = [e for e in entries(run) if e["name"] != entry["name"]]
    write_json_atomic(run.fs, run.experts_path, [*kept, entry])


def drop(run: RunDir, name: str) -> None:
    """Remove a run's entry (it is being trained again)."""
    current = entries(run)
    kept = [e for e in current if e["name"] != name]
    if len(kept) != len(current):
        write_json_atomic(run.fs, run.experts_path, kept)
