"""Zero-shot scoring and batch prediction on Ray Data: images stream through a pool of actors.

The driver never holds a task's images. It computes what depends only on class names (the
routing weights of every row, ``pipeline.evaluation.eval.task_mixes``) and hands them to the
actors; each actor loads the run's models once (a ``MoDEEnsemble`` of the run directory),
decodes a batch, computes every run's logits on it and returns per-class tallies of every mix
(``metrics.tally``): a few integers per method and class, whatever the batch size. The driver adds
them up, so its memory stays flat as tasks grow (bench/bench_eval_memory.py).

``score`` serves the eval stage (every split of every task in one pass, one actor pool);
``predict`` writes the top labels of a folder of images or of webdataset shards to parquet.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as pads
import ray
from ray.data import ActorPoolStrategy, SaveMode

from pipeline.core.config import StorageConfig
from pipeline.core.storage import filesystem, is_s3, pyarrow_filesystem
from pipeline.data.images import open_rgb
from pipeline.evaluation.ensemble import MoDEEnsemble
from pipeline.evaluation.metrics import IMAGE_EXTS, TALLY, Mix, label_probabilities, runs_of, tally
from pipeline.training.runs import run_name

# Images per actor call: one forward pass of every run (a few MB of pixels at 224 px).
BATCH_SIZE = 256
# Rows of the per-batch result that are not tallies of a mix: bad samples, counted per part.
BAD_LABEL, NO_IMAGE = -1, -2
RESULT = ("part", "mix", "cls", *TALLY)


@dataclasses.dataclass(frozen=True)
class Part:
    """One split of one task to score: its shards and the mixes to tally on it."""
    uri: str                    # the task folder, for messages
    split: str
    shards: tuple[str, ...]     # its .tar files, paths inside the task's filesystem
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    mixes: tuple[Mix, ...]

    @property
    def runs(self) -> list[str]:
        return runs_of(dict(enumerate(self.mixes)))


def pool_size(use_gpu: bool) -> int:
    """Scoring actors at most: one per GPU of the cluster, or one per CPU but one, which stays
    free for the read tasks (an actor pool that takes every CPU starves them)."""
    total = ray.cluster_resources()
    if use_gpu:
        return max(1, int(total.get("GPU", 0)))
    return max(1, int(total.get("CPU", 1)) - 1)


def _pool(use_gpu: bool, actors: int | None) -> dict[str, Any]:
    # On a cluster of fewer than 2 CPUs an actor that reserved one would leave the reads none
    # (their file listing asks a whole CPU): there the one actor reserves nothing.
    cpus = 1 if use_gpu or ray.cluster_resources().get("CPU", 0) >= 2 else 0
    return {"compute": ActorPoolStrategy(min_size=1, max_size=actors or pool_size(use_gpu)),
            "num_cpus": cpus, **({"num_gpus": 1} if use_gpu else {})}


def _member(batch: dict[str, np.ndarray], i: int, exts: Sequence[str]) -> bytes | None:
    """Sample ``i``'s first member among ``exts`` (a missing one comes as None or NaN)."""
    for ext in exts:
        column = batch.get(ext)
        if column is not None and isinstance(column[i], (bytes, bytearray)):
            return bytes(column[i])
    return None


def _decoded(data: bytes | None):
    """(image, None), or (None, why not)."""
    if data is None:
        return None, f"no image ({'/'.join(IMAGE_EXTS)})"
    try:
        return open_rgb(data), None
    except Exception as e:  # noqa: BLE001  Pillow raises many kinds for a broken file
        return None, f"unreadable image: {type(e).__name__}: {e}"


def _label(batch: dict[str, np.ndarray], i: int) -> int:
    """A sample's class index (its ``.cls`` member); -1 when it has none or not an integer."""
    column = batch.get("cls")
    try:
        return int(bytes(column[i]).decode().strip())
    except (TypeError, ValueError, UnicodeDecodeError):     # no column, None, not a number
        return -1


class _Scorer:
    """An actor: the run's models, and the tallies of every mix of a batch's parts."""

    def __init__(self, run_uri: str, cfg, device: str, parts: Sequence[Part]) -> None:
        self.ens = MoDEEnsemble(run_uri, cfg, device=device)
        self.parts = list(parts)
        self.where = {s: i for i, p in enumerate(self.parts) for s in p.shards}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list[np.ndarray]] = {c: [] for c in RESULT}

        def emit(part: int, mix: int, cls: np.ndarray, counts: np.ndarray) -> None:
            out["part"].append(np.full(len(cls), part, np.int64))
            out["mix"].append(np.full(len(cls), mix, np.int64))
            out["cls"].append(np.asarray(cls, np.int64))
            for j, c in enumerate(TALLY):
                out[c].append(np.asarray(counts[:, j], np.int64))

        part_of = np.array([self.where[str(p)] for p in batch["path"]])
        for i in np.unique(part_of):
            part, rows = self.parts[i], np.flatnonzero(part_of == i)
            n = len(part.classnames)
            labels = np.array([_label(batch, r) for r in rows], np.int64)
            images = [_decoded(_member(batch, r, IMAGE_EXTS))[0] for r in rows]
            bad = (labels < 0) | (labels >= n)
            missing = np.array([im is None for im in images])
            for code, mask in ((BAD_LABEL, bad), (NO_IMAGE, missing & ~bad)):
                if mask.any():
                    emit(i, code, [0], np.array([[int(mask.sum()), 0, 0]]))
            good = ~bad & ~missing
            if not good.any():
                continue
            images = [im for im, g in zip(images, good, strict=True) if g]
            logits = {r: self.ens.logits(r, images, part.classnames, part.templates) for r in part.runs}
            for j, mix in enumerate(part.mixes):
                t = tally(mix.logits(logits), labels[good], n)
                seen = np.flatnonzero(t[:, 0])
                emit(i, j, seen, t[seen])
        return {c: np.concatenate(v) if v else np.zeros(0, np.int64) for c, v in out.items()}


def _read(stores: list[tuple[Any, list[str]]]):
    """One dataset of every shard: Ray Data's webdataset reader per filesystem, in a union."""
    datasets = [ray.data.read_webdataset(paths, filesystem=fs, decoder=None, include_paths=True)
                for fs, paths in stores]
    return datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]


def score(run_uri: str, cfg, parts: Sequence[Part], storage: StorageConfig, *, use_gpu: bool = False,
          actors: int | None = None, batch_size: int = BATCH_SIZE) -> list[np.ndarray]:
    """Tallies of every part's mixes, each ``(len(part.mixes), classes, 3)`` int64 (``TALLY``).

    Every part's shards are read in one Ray Data pass and scored by one actor pool (at most
    ``actors``, ``pool_size`` by default; a GPU each with ``use_gpu``); only tallies come back.
    A sample without a class index in range, or without an image, is a ``ValueError`` naming
    its task and how many there were, as reading the task in memory refuses it."""
    by_store: dict[bool, tuple[Any, list[str]]] = {}    # local or S3: one reader each
    for p in parts:
        s3 = is_s3(p.uri)
        if s3 not in by_store:
            by_store[s3] = (pyarrow_filesystem(filesystem(p.uri, storage)[0]), [])
        by_store[s3][1].extend(p.shards)
    tallies = [np.zeros((len(p.mixes), len(p.classnames), len(TALLY)), np.int64) for p in parts]
    bad = np.zeros((len(parts), 2), np.int64)
    if not parts:
        return tallies
    scored = _read(list(by_store.values())).map_batches(
        _Scorer, fn_constructor_kwargs={"run_uri": run_uri, "cfg": cfg, "parts": list(parts),
                                        "device": "cuda" if use_gpu else "cpu"},
        batch_size=batch_size, **_pool(use_gpu, actors))
    for b in scored.iter_batches(batch_size=None, batch_format="numpy"):
        counts = np.stack([b[c] for c in TALLY], axis=1)
        for i in np.unique(b["part"]):
            rows = b["part"] == i
            ok = rows & (b["mix"] >= 0)
            np.add.at(tallies[i], (b["mix"][ok], b["cls"][ok]), counts[ok])
            for k, code in enumerate((BAD_LABEL, NO_IMAGE)):
                bad[i, k] += counts[rows & (b["mix"] == code), 0].sum()
    problems = []
    for p, (labels, images) in zip(parts, bad, strict=True):
        if labels:
            problems.append(f"{p.uri}/{p.split}: {labels} sample(s) without a class index in "
                            f"0..{len(p.classnames) - 1} (a .cls member)")
        if images:
            problems.append(f"{p.uri}/{p.split}: {images} sample(s) without a readable image "
                            f"({'/'.join(IMAGE_EXTS)})")
    if problems:
        raise ValueError("; ".join(problems))
    return tallies


# ----------------------------------------------------------------------------- prediction
def routed_probabilities(ens: MoDEEnsemble, images, labels: Sequence[str], templates: Sequence[str],
                         weights: np.ndarray) -> np.ndarray:
    """(N, labels) probabilities of images under routing ``weights``: the experts of nonzero
    weight run, their logits mixed as ``MoDEEnsemble.zero_shot`` mixes them, and the softmax
    taken at those experts' mean logit scale."""
    ran = [e for e in range(ens.num_experts) if weights[e] > 0]
    mixed = sum(weights[e] * ens.logits(run_name("expert", e), images, labels, templates) for e in ran)
    scale = np.mean([float(ens.model(run_name("expert", e))[0].logit_scale.detach().exp()) for e in ran])
    return label_probabilities(mixed, scale)


class _Predictor:
    """An actor: the routed experts of a run, and each image's top labels."""

    def __init__(self, run_uri: str, cfg, device: str, labels: Sequence[str],
                 templates: Sequence[str], weights: np.ndarray, show: int) -> None:
        self.ens = MoDEEnsemble(run_uri, cfg, device=device)
        self.labels, self.templates, self.weights = list(labels), list(templates), weights
        self.show = show

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        n = len(batch["path"])
        exts = ["bytes"] if "bytes" in batch else IMAGE_EXTS   # image files, or tar samples
        images, errors = zip(*(_decoded(_member(batch, i, exts)) for i in range(n)), strict=True)
        top: list[list[str]] = [[] for _ in range(n)]
        prob: list[list[float]] = [[] for _ in range(n)]
        good = [k for k, im in enumerate(images) if im is not None]
        if good:
            p = routed_probabilities(self.ens, [images[k] for k in good], self.labels,
                                     self.templates, self.weights)
            order = np.argsort(-p, axis=1, kind="stable")[:, :self.show]
            for j, k in enumerate(good):
                top[k] = [self.labels[c] for c in order[j]]
                prob[k] = p[j, order[j]].tolist()
        keys = batch["__key__"] if "__key__" in batch else batch["path"]
        return {"key": [str(k) for k in keys], "path": [str(p) for p in batch["path"]],
                "labels": top, "probs": prob, "weights": [self.weights.tolist()] * n,
                "error": list(errors)}


def predict(run_uri: str, cfg, images_uri: str, out_uri: str, labels: Sequence[str],
            templates: Sequence[str], weights: np.ndarray, storage: StorageConfig, *,
            show: int = 5, use_gpu: bool = False, actors: int | None = None,
            batch_size: int = BATCH_SIZE) -> dict[str, int]:
    """Write ``out_uri`` (parquet): per image its ``key`` (a tar sample's key, else the file's
    path), ``path`` (its file or tar), the ``show`` top ``labels`` with their ``probs``, and the
    routing ``weights`` (computed once, from the labels, by the caller); an image that does not
    decode gets empty lists and its ``error``. ``images_uri``: a folder of image files or of
    webdataset ``.tar`` shards. Returns ``{"images": rows written, "errors": of them}``."""

    fs, path = filesystem(images_uri, storage)
    if not fs.exists(path):
        raise FileNotFoundError(f"{images_uri}: no such file or folder")
    files = sorted(fs.find(path)) if fs.isdir(path) else [path]
    tars = [f for f in files if f.endswith(".tar")]
    pics = [f for f in files if f.rsplit(".", 1)[-1].lower() in IMAGE_EXTS]
    if not tars and not pics:
        raise FileNotFoundError(f"{images_uri}: no image files ({'/'.join(IMAGE_EXTS)}) and no "
                                ".tar shards")
    if tars and pics:
        raise ValueError(f"{images_uri} holds both .tar shards and image files: point at one kind")
    pa_fs = pyarrow_filesystem(fs)
    ds = (ray.data.read_webdataset(tars, filesystem=pa_fs, decoder=None, include_paths=True) if tars
          else ray.data.read_binary_files(pics, filesystem=pa_fs, include_paths=True))
    out_fs, out_path = filesystem(out_uri, storage)
    out_pa = pyarrow_filesystem(out_fs)
    ds.map_batches(_Predictor, fn_constructor_kwargs={
        "run_uri": run_uri, "cfg": cfg, "device": "cuda" if use_gpu else "cpu", "labels": list(labels),
        "templates": list(templates), "weights": np.asarray(weights, np.float64), "show": show},
        batch_size=batch_size, **_pool(use_gpu, actors)).write_parquet(
            out_path, filesystem=out_pa, mode=SaveMode.OVERWRITE)
    written = pads.dataset(out_path, filesystem=out_pa, format="parquet")
    return {"images": written.count_rows(),
            "errors": written.count_rows(filter=pc.field("error").is_valid())}
