"""The run directory: one place that fixes where every artifact lives, and the stage manifests.

Layout (README, "Run directory"; local path or ``s3://bucket/prefix``)::

    config.yaml               the config of the latest job run here
    ingest/                   validated sample index (samples/, skipped/) + _manifest.json
    embeddings/               caption embeddings (parquet) + _manifest.json
    clusters/                 fine/coarse centroids + _manifest.json
    assignments/              key -> fine_id, expert_id (parquet by expert_id) + _manifest.json
    checkpoints/<name>/       Ray Train checkpoints of the seed, experts and baselines
    experts.json              registry of finished experts, appended atomically
    eval/                     reports and plots + _manifest.json

A stage writes ``<stage>/_manifest.json`` last, atomically: a stage without one is incomplete.
A stage whose manifest holds the current config hash is skipped on rerun.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import pathlib
import subprocess
from typing import Any

from pipeline.config import Config, StorageConfig
from pipeline.storage import filesystem, join, read_json, write_bytes_atomic, write_json_atomic

STAGES = ("ingest", "embeddings", "clusters", "assignments", "training_data", "checkpoints", "eval")
MANIFEST = "_manifest.json"


class CountMismatch(RuntimeError):
    """A stage's counts do not add up: rows_in != rows_out + sum(rows_skipped)."""


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


@functools.cache
def code_version() -> str:
    """Hash of the pipeline sources, plus the git commit when the code sits in a checkout.

    The source hash survives ``ray job submit`` (whose working dir carries no .git).
    """
    root = pathlib.Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix in (".py", ".json"):
            h.update(path.relative_to(root).as_posix().encode())
            h.update(path.read_bytes())
    version = f"src-{h.hexdigest()[:12]}"
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root,
                             capture_output=True, text=True, timeout=5)
        if sha.returncode == 0:
            version += f" git-{sha.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass
    return version


class RunDir:
    """Paths and manifests of one run directory."""

    def __init__(self, uri: str, storage: StorageConfig) -> None:
        self.uri = uri.rstrip("/")
        self.fs, self.path = filesystem(self.uri, storage)
        self._scheme = "s3://" if self.uri.startswith("s3://") else ""

    def __repr__(self) -> str:
        return f"RunDir({self.uri!r})"

    def stage_path(self, stage: str, *parts: str) -> str:
        """Path inside the filesystem (no scheme), for ``self.fs``."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; stages: {list(STAGES)}")
        return join(self.path, stage, *parts)

    def stage_uri(self, stage: str, *parts: str) -> str:
        """Full URI (with ``s3://`` where it applies), for Ray's readers and writers."""
        return self._scheme + self.stage_path(stage, *parts)

    @property
    def config_path(self) -> str:
        return join(self.path, "config.yaml")

    @property
    def experts_path(self) -> str:
        return join(self.path, "experts.json")

    def write_config(self, cfg: Config) -> None:
        write_bytes_atomic(self.fs, self.config_path, cfg.to_yaml().encode())

    def has_config(self) -> bool:
        return self.fs.exists(self.config_path)

    def manifest(self, stage: str) -> dict[str, Any] | None:
        path = self.stage_path(stage, MANIFEST)
        return read_json(self.fs, path) if self.fs.exists(path) else None

    def completed(self, stage: str, config_hash: str) -> dict[str, Any] | None:
        """The stage's manifest if it finished with this config hash, else None."""
        m = self.manifest(stage)
        return m if m is not None and m.get("config_hash") == config_hash else None

    def begin(self, stage: str) -> str:
        """Mark a stage incomplete (drop its manifest) before its outputs are rewritten."""
        path = self.stage_path(stage, MANIFEST)
        if self.fs.exists(path):
            self.fs.rm(path)
        return now()

    def finish(self, stage: str, *, config_hash: str, inputs: dict[str, Any], rows_in: int,
               rows_out: int, rows_skipped: dict[str, int], started_at: str,
               stats: dict[str, Any] | None = None) -> dict[str, Any]:
        """Check that counts add up, then write the manifest (the stage's last act)."""
        skipped = {k: int(v) for k, v in sorted(rows_skipped.items()) if v}
        if rows_in != rows_out + sum(skipped.values()):
            raise CountMismatch(f"{stage}: rows_in={rows_in} but rows_out={rows_out} + "
                                f"skipped={sum(skipped.values())} {skipped}")
        manifest = {
            "stage": stage,
            "config_hash": config_hash,
            "code_version": code_version(),
            "inputs": inputs,
            "rows_in": int(rows_in),
            "rows_out": int(rows_out),
            "rows_skipped": skipped,
            "started_at": started_at,
            "finished_at": now(),
            "stats": stats or {},
        }
        write_json_atomic(self.fs, self.stage_path(stage, MANIFEST), manifest)
        return manifest


def stage_hash(cfg: Config, sections: tuple[str, ...], inputs: dict[str, Any]) -> str:
    """Hash of what decides a stage's output: its config sections and its inputs."""
    blob = json.dumps({"config": cfg.hash(*sections), "inputs": inputs}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
