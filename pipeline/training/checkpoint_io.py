"""Checkpoint files of a training run, and loading a trained model from one.

A run's checkpoints live in ``<run dir>/checkpoints/<run>/step_XXXXXXXX/`` (written by Ray
Train from the worker loop, ``pipeline/training/train_loop.py``)::

    checkpoint.pt   torch.save of a dict of tensors and plain numbers (loads with
                    weights_only=True): model, optimizer, scaler, step, samples_seen, model_name
    log.json        the run's log lines so far (step, samples_seen, loss, lr, samples_per_s,
                    data_wait)
    integrity.json  size and SHA-256 of checkpoint.pt, written beside it: a file cut short (a
                    crash during an upload) is found before it is loaded (``damage``), and a
                    resumed run falls back to its previous checkpoint (``pipeline.training.train_loop``)

Inference (``pipeline/evaluation/ensemble.py``) loads models through ``load_model`` without importing the
training code.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, BinaryIO

import fsspec

from pipeline.core.config import StorageConfig
from pipeline.core.storage import filesystem, strip_scheme

if TYPE_CHECKING:
    import torch

CHECKPOINT_FILE = "checkpoint.pt"
LOG_FILE = "log.json"
INTEGRITY_FILE = "integrity.json"
STEP_PREFIX = "step_"


def step_dir_name(step: int) -> str:
    """The folder name of the checkpoint taken after ``step`` optimiser steps."""
    return f"{STEP_PREFIX}{step:08d}"


def checkpoint_file_uri(uri: str) -> str:
    """``checkpoint.pt`` of a checkpoint directory (or the file itself)."""
    return uri if uri.endswith(".pt") else uri.rstrip("/") + "/" + CHECKPOINT_FILE


class UnsafeCheckpoint(ValueError):
    """A checkpoint file that holds more than tensors and plain values (refused unread)."""


def load_state(source: str | BinaryIO, where: str | None = None) -> dict[str, Any]:
    """``torch.load`` of a checkpoint file, weights only: tensors, numbers, strings, lists and
    dicts. A file that would run code or build other objects when unpickled (a planted
    ``__reduce__``, any class) is refused with ``UnsafeCheckpoint`` before anything runs. Every
    checkpoint this project reads goes through here (docs/cluster.md, "Security")."""
    import torch  # late import: keeps torch out of the light processes that import this module

    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UnsafeCheckpoint(f"{where or source}: refused, not a weights-only checkpoint "
                               f"({first}); load only checkpoints you trust, and never with "
                               "weights_only=False") from None


class DamagedCheckpoint(ValueError):
    """A checkpoint file whose size or SHA-256 is not what was recorded when it was written."""


def integrity(data: bytes) -> dict[str, Any]:
    """What ``integrity.json`` records of a checkpoint file's bytes."""
    return {"file": CHECKPOINT_FILE, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def damage(data: bytes, record: dict[str, Any] | None) -> str:
    """Why ``data`` is not the file ``record`` describes ("" if it is, or if there is no record:
    checkpoints written before the record existed are taken as they are)."""
    if record is None:
        return ""
    if len(data) != record["size"]:
        return f"{len(data):,} bytes where {record['size']:,} were written: cut short"
    if hashlib.sha256(data).hexdigest() != record["sha256"]:
        return "its SHA-256 is not the one recorded when it was written"
    return ""


def read_checkpoint(uri: str, storage: StorageConfig) -> dict[str, Any]:
    """Load ``checkpoint.pt`` from a checkpoint directory (or the file itself), local or S3,
    checked against the directory's ``integrity.json`` (``DamagedCheckpoint`` if it differs)."""
    fs, path = filesystem(checkpoint_file_uri(uri), storage)
    with fs.open(path, "rb") as f:
        data = f.read()
    record_path = path.rsplit("/", 1)[0] + "/" + INTEGRITY_FILE
    record = json.loads(fs.cat_file(record_path)) if fs.exists(record_path) else None
    problem = damage(data, record)
    if problem:
        raise DamagedCheckpoint(f"{checkpoint_file_uri(uri)}: {problem}")
    return load_state(io.BytesIO(data), checkpoint_file_uri(uri))


def load_model(uri: str, storage: StorageConfig) -> tuple[torch.nn.Module, Callable, Callable]:
    """A trained model in eval mode, with its validation transform and tokenizer."""
    from pipeline.training.model import create  # late import: open_clip and torch

    state = read_checkpoint(uri, storage)
    model, _, preprocess_val, tokenizer = create(state["model_name"])
    model.load_state_dict(state["model"])
    return model.eval(), preprocess_val, tokenizer


def write_dir(folder: str, state: dict[str, Any], history: list[dict]) -> None:
    """Write a checkpoint directory's three files into the local ``folder``."""
    import torch  # late import: keeps torch out of the light processes that import this module

    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    with open(f"{folder}/{CHECKPOINT_FILE}", "wb") as f:
        f.write(data)
    with open(f"{folder}/{INTEGRITY_FILE}", "w") as f:
        json.dump(integrity(data), f)
    with open(f"{folder}/{LOG_FILE}", "w") as f:
        json.dump(history, f)


def load_dir(fs: fsspec.AbstractFileSystem, path: str) -> tuple[dict[str, Any], list[dict]]:
    """The state and log lines of the checkpoint directory at ``path`` (a path of ``fs``).
    Raises ``DamagedCheckpoint`` for a file that is not what ``integrity.json`` recorded or
    that does not load, and ``UnsafeCheckpoint`` for one that is not weights only."""
    try:    # a directory whose upload stopped part way may lack any of its files
        data = fs.cat_file(f"{path}/{CHECKPOINT_FILE}")
        history = json.loads(fs.cat_file(f"{path}/{LOG_FILE}"))
    except FileNotFoundError as e:
        raise DamagedCheckpoint(f"{path}: incomplete, a file is missing ({e})"[:300]) from None
    record_path = f"{path}/{INTEGRITY_FILE}"
    record = json.loads(fs.cat_file(record_path)) if fs.exists(record_path) else None
    problem = damage(data, record)
    if problem:
        raise DamagedCheckpoint(f"{path}: {problem}")
    try:
        state = load_state(io.BytesIO(data), f"{path}/{CHECKPOINT_FILE}")
    except UnsafeCheckpoint:
        raise
    except Exception as e:  # torch raises RuntimeError, EOFError... for a broken zip
        raise DamagedCheckpoint(f"{path}: does not load ({type(e).__name__}: {e})"[:300]) from None
    return state, history


def sha256(fs: fsspec.AbstractFileSystem, checkpoint_uri: str) -> str:
    """SHA-256 of a checkpoint directory's ``checkpoint.pt``."""
    h = hashlib.sha256()
    with fs.open(strip_scheme(checkpoint_file_uri(checkpoint_uri)), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def list_checkpoints(fs: fsspec.AbstractFileSystem, run_path: str, scheme: str = "") -> list[str]:
    """URIs of the checkpoint directories a run has kept, oldest first."""
    fs.invalidate_cache(run_path)  # Ray Train wrote there through its own handle: no stale listing
    if not fs.exists(run_path):
        return []
    found = [p.rstrip("/") for p in fs.ls(run_path, detail=False)
             if p.rstrip("/").split("/")[-1].startswith(STEP_PREFIX)]
    return [scheme + p for p in sorted(found)]
