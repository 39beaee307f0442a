"""The run directory: where every artifact lives, and the manifests that say a stage is complete.

Layout (docs/stages.md, "The run directory"; local path or ``s3://bucket/prefix``)::

    config.yaml               the config of the latest job run here
    ingest/                   validated sample index (samples/, skipped/) + _manifest.json
    embeddings/               caption embeddings (parquet) + _manifest.json
    clusters/                 fine/coarse centroids + _manifest.json
    assignments/              key -> fine_id, expert_id (parquet by expert_id) + _manifest.json
    training_data/            samples with images (parquet by expert_id) + _manifest.json
    checkpoints/<run>/        Ray Train checkpoints of one run + _manifest.json
    registry/<run>.json       one entry per finished run (pipeline/core/registry.py)
    eval/                     reports and plots + _manifest.json
    generations/<name>/       data added later and the experts trained on it
                              (jobs/add_experts.py, docs/growth.md): the same folders again
    generations/_levels/      the ids each generation's experts took (pipeline/grow/levels.py)
    experiment/               jobs/experiment.py's tables and plots, and one replica per
                              training seed (experiment/seed-<s>/: its own config.yaml,
                              checkpoints/, registry/ and eval/; the data stages are the run's)

A unit of work (a stage, or one training run ``checkpoints/<run>``) writes its
``_manifest.json`` last, atomically: a unit without one is incomplete. The stage graph and the
wrapper that reads and writes manifests are in ``pipeline/core/stages.py``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import hashlib
import pathlib
import re
import subprocess
from typing import Any

from pipeline.core.config import Config, StorageConfig
from pipeline.core.storage import filesystem, join, read_json, scheme, write_bytes_atomic, write_json_atomic

FOLDERS = ("ingest", "embeddings", "clusters", "assignments", "training_data", "checkpoints", "eval",
           "generations", "experiment", "onestep")
GENERATION_FOLDERS = ("ingest", "embeddings", "novelty", "clusters", "assignments", "training_data",
                      "checkpoints")
MANIFEST = "_manifest.json"
# A replica (jobs/experiment.py) trains its own runs on the data stages of its run directory:
# these folders resolve there. Its marker file names that directory.
SHARED_FOLDERS = ("ingest", "embeddings", "clusters", "assignments", "training_data", "onestep")
REPLICA_FOLDERS = (*SHARED_FOLDERS, "checkpoints", "eval")
REPLICA = "_replica.json"


def check_generation_name(name: str) -> None:
    """A generation's name is a folder name and a key prefix: letters, digits, ``-`` and ``_``."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", name or ""):
        raise ValueError(f"generation name {name!r}: use 1-64 letters, digits, '-' or '_', "
                         "starting with a letter or digit")


class CountMismatch(RuntimeError):
    """A stage's counts do not add up: rows_in != rows_out + sum(rows_skipped)."""


@dataclasses.dataclass(frozen=True)
class StageOutput:
    """What a stage reports about its work; the wrapper checks it and writes it as the manifest."""
    rows_in: int
    rows_out: int
    rows_skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)


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
        if path.is_file() and path.suffix in (".py", ".json", ".yaml"):
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

    def __init__(self, uri: str, storage: StorageConfig, generation: str | None = None) -> None:
        self.uri = uri.rstrip("/")
        self.fs, self.path = filesystem(self.uri, storage)
        self.scheme = scheme(self.uri)
        self.storage = storage
        self.generation_name = generation
        self.root = self        # a generation's: the run directory it belongs to
        # a replica's: the run directory whose data stages it reads (None for any other)
        self.shared: RunDir | None = None
        marker = join(self.path, REPLICA)
        if generation is None and self.fs.exists(marker):
            self.shared = RunDir(read_json(self.fs, marker)["root"], storage)

    def replica(self, name: str) -> RunDir:
        """The replica ``experiment/<name>/`` of this run directory (made on first use): a run
        directory of its own for training runs and their evaluation, whose data stages
        (``SHARED_FOLDERS``) are this one's. Runs of other training seeds live there."""
        check_generation_name(name)
        uri = f"{self.uri}/experiment/{name}"
        marker = join(self.path, "experiment", name, REPLICA)
        if not self.fs.exists(marker):
            write_json_atomic(self.fs, marker, {"root": self.uri})
        return RunDir(uri, self.storage)

    def generation(self, name: str) -> RunDir:
        """The run directory of generation ``name`` (``generations/<name>/``): the stage code
        that writes ``ingest/`` or ``training_data/`` here writes them there."""
        check_generation_name(name)
        child = RunDir(f"{self.uri}/generations/{name}", self.storage, generation=name)
        child.root = self
        return child

    def __repr__(self) -> str:
        return f"RunDir({self.uri!r})"

    def generation_names(self) -> list[str]:
        """The names of the generations below ``generations/`` (sorted; none when empty)."""
        folder = join(self.path, "generations")
        self.fs.invalidate_cache(folder)    # s3fs caches listings; another job may add one
        if not self.fs.exists(folder):
            return []
        names = (p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(folder, detail=False))
        return sorted(n for n in names if not n.startswith("_"))  # _levels: pipeline/grow/levels.py

    def stage_path(self, unit: str, *parts: str) -> str:
        """Path inside the filesystem (no scheme), for ``self.fs``. ``unit`` is a folder of the
        layout (``"assignments"``) or below one (``"checkpoints/expert-0"``)."""
        folder = unit.split("/", 1)[0]
        allowed = GENERATION_FOLDERS if self.generation_name else (
            REPLICA_FOLDERS if self.shared else FOLDERS)
        if folder not in allowed:
            raise ValueError(f"unknown stage folder {folder!r}; folders: {list(allowed)}")
        if self.shared is not None and folder in SHARED_FOLDERS:
            return self.shared.stage_path(unit, *parts)
        return join(self.path, unit, *parts)

    def stage_uri(self, unit: str, *parts: str) -> str:
        """Full URI (with ``s3://`` where it applies), for Ray's readers and writers."""
        return self.scheme + self.stage_path(unit, *parts)

    @property
    def config_path(self) -> str:
        return join(self.path, "config.yaml")

    def write_config(self, cfg: Config) -> None:
        write_bytes_atomic(self.fs, self.config_path, cfg.to_yaml().encode())

    def has_config(self) -> bool:
        return self.fs.exists(self.config_path)

    def manifest(self, unit: str) -> dict[str, Any] | None:
        path = self.stage_path(unit, MANIFEST)
        return read_json(self.fs, path) if self.fs.exists(path) else None

    def drop_manifest(self, unit: str) -> None:
        """Mark a unit incomplete before its outputs are rewritten."""
        path = self.stage_path(unit, MANIFEST)
        if self.fs.exists(path):
            self.fs.rm(path)

    def write_manifest(self, unit: str, *, config_hash: str, fields: dict[str, Any],
                       knobs: dict[str, Any], inputs: dict[str, Any], output: StageOutput,
                       started_at: str) -> dict[str, Any]:
        """Check that the counts add up, then write the manifest (the unit's last act)."""
        skipped = {k: int(v) for k, v in sorted(output.rows_skipped.items()) if v}
        if output.rows_in != output.rows_out + sum(skipped.values()):
            raise CountMismatch(f"{unit}: rows_in={output.rows_in} but rows_out={output.rows_out} + "
                                f"skipped={sum(skipped.values())} {skipped}")
        manifest = {
            "stage": unit,
            "config_hash": config_hash,
            "code_version": code_version(),
            "fields": fields,
            "knobs": knobs,
            "inputs": inputs,
            "rows_in": int(output.rows_in),
            "rows_out": int(output.rows_out),
            "rows_skipped": skipped,
            "started_at": started_at,
            "finished_at": now(),
            "stats": output.stats,
        }
        write_json_atomic(self.fs, self.stage_path(unit, MANIFEST), manifest)
        return manifest
