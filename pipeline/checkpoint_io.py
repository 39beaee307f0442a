"""Checkpoint files of a training run, and loading a trained model from one.

A run's checkpoints live in ``<run dir>/checkpoints/<run>/step_XXXXXXXX/`` (written by Ray
Train from the worker loop, ``pipeline/train_loop.py``)::

    checkpoint.pt   torch.save of a dict of tensors and plain numbers (loads with
                    weights_only=True): model, optimizer, scaler, step, samples_seen, model_name
    log.json        the run's log lines so far (step, samples_seen, loss, lr, samples_per_s,
                    data_wait)

Inference (``pipeline/ensemble.py``) loads models through ``load_model`` without importing the
training code.
"""

from __future__ import annotations

import hashlib
import io
import pickle
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, BinaryIO

import fsspec

from pipeline.config import StorageConfig
from pipeline.storage import filesystem, strip_scheme

if TYPE_CHECKING:
    import torch

CHECKPOINT_FILE = "checkpoint.pt"
LOG_FILE = "log.json"
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
    checkpoint this project reads goes through here (README, "Security")."""
    import torch  # late import: keeps torch out of the light processes that import this module

    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UnsafeCheckpoint(f"{where or source}: refused, not a weights-only checkpoint "
                               f"({first}); load only checkpoints you trust, and never with "
                               "weights_only=False") from None


def read_checkpoint(uri: str, storage: StorageConfig) -> dict[str, Any]:
    """Load ``checkpoint.pt`` from a checkpoint directory (or the file itself), local or S3."""
    fs, path = filesystem(checkpoint_file_uri(uri), storage)
    with fs.open(path, "rb") as f:
        data = f.read()
    return load_state(io.BytesIO(data), checkpoint_file_uri(uri))


def load_model(uri: str, storage: StorageConfig) -> tuple[torch.nn.Module, Callable, Callable]:
    """A trained model in eval mode, with its validation transform and tokenizer."""
    from pipeline.model import create  # late import: open_clip and torch

    state = read_checkpoint(uri, storage)
    model, _, preprocess_val, tokenizer = create(state["model_name"])
    model.load_state_dict(state["model"])
    return model.eval(), preprocess_val, tokenizer


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
