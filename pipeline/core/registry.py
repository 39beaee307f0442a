"""The registry of trained runs: one small JSON file per finished run, ``registry/<run>.json``.

An entry holds ``name``, ``kind``, ``expert_id``, ``fine_clusters`` it owns, ``samples``,
``checkpoint`` URI and its ``sha256``, ``metrics``, times and ``unit`` (where its checkpoints and
manifest live; docs/stages.md, "Training"). The registry is the listing of that folder, oldest first.

Several jobs write it at once (``train_experts`` and ``add_experts`` on one cluster and run
directory, docs/growth.md): each writer only ever writes its own runs' files, each file in one
atomic write (a rename locally, one PUT on S3), so no writer can lose another's entry, and
nothing is locked, so a killed job leaves nothing behind that blocks the next. Rewriting the
same run (it is trained again) replaces its file; two jobs training the same run at once would
both write a complete entry, the last one wins.

A run directory may hold one ``experts.json`` instead (an older layout of the registry): it is
read (never written), and a run's own file takes precedence over its entry there.
"""

from __future__ import annotations

from typing import Any

from pipeline.core.rundir import RunDir
from pipeline.core.storage import join, read_json, write_json_atomic

FOLDER = "registry"
LEGACY = "experts.json"


def _path(run: RunDir, name: str) -> str:
    return join(run.path, FOLDER, f"{name}.json")


def entries(run: RunDir) -> list[dict[str, Any]]:
    """Every registered run, oldest first (empty when there is no registry yet)."""
    legacy = join(run.path, LEGACY)
    found = {e["name"]: e for e in (read_json(run.fs, legacy) if run.fs.exists(legacy) else [])}
    folder = join(run.path, FOLDER)
    run.fs.invalidate_cache(folder)     # s3fs caches listings: other jobs write here too
    if run.fs.exists(folder):
        for path in sorted(run.fs.ls(folder, detail=False)):
            if path.endswith(".json"):  # not a local writer's temporary "<name>.json.tmp-..."
                entry = read_json(run.fs, path)
                found[entry["name"]] = entry
    return sorted(found.values(), key=lambda e: (e.get("finished_at") or "", e["name"]))


def finished(run: RunDir) -> dict[str, dict[str, Any]]:
    """Registered runs by name."""
    return {entry["name"]: entry for entry in entries(run)}


def put(run: RunDir, entry: dict[str, Any]) -> None:
    """Register a finished run (replacing an earlier entry of the same name)."""
    write_json_atomic(run.fs, _path(run, entry["name"]), entry)


def drop(run: RunDir, name: str) -> None:
    """Unregister a run that is being trained again. A run listed only in a legacy
    ``experts.json`` is never rewritten there: its retraining writes its own file, which wins."""
    path = _path(run, name)
    if run.fs.exists(path):
        run.fs.rm(path)


def uri(run: RunDir) -> str:
    """Where the registry lives (for messages)."""
    return f"{run.uri}/{FOLDER}/"
