"""What evaluation counts, and how a report row mixes its runs: pure numpy, shared by the
driver's report (``eval``) and the scoring actors (``scoring``)."""

from __future__ import annotations

import dataclasses

import numpy as np

# The members of a webdataset sample that hold its image, in the order they are looked for.
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# Prompt templates of labels given without their own (jobs/predict.py, the serving app).
DEFAULT_TEMPLATES = ("a photo of a {c}.", "a {c}.", "{c}")


# Columns of a tally: per true class, its images and how many of them the method put first and
# among its first five.
TALLY = ("images", "top1", "top5")


def tally(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes, 3) int64 counts per true class (``TALLY``) of a batch's (N, n) logits.

    A class's rank counts the classes scored above it and the equal ones of lower index, so
    rank 0 is exactly ``argmax`` (the first of equals). Tallies of a task's batches add up to
    the task's: every metric of the report follows from the sum (``tally_accuracy``,
    ``clip_metrics``), whatever the batches were."""
    logits, labels = np.asarray(logits), np.asarray(labels, np.int64)
    true = logits[np.arange(len(labels)), labels][:, None]
    lower = np.arange(logits.shape[1])[None, :] < labels[:, None]
    rank = (logits > true).sum(axis=1) + ((logits == true) & lower).sum(axis=1)
    return np.stack([np.bincount(labels, minlength=num_classes),
                     np.bincount(labels[rank == 0], minlength=num_classes),
                     np.bincount(labels[rank < 5], minlength=num_classes)], axis=1).astype(np.int64)


def tally_accuracy(t: np.ndarray) -> float:
    """Top-1 accuracy of a tally: the float ``accuracy`` gives (an exact count over N)."""
    return float(t[:, 1].sum() / t[:, 0].sum())


def clip_metrics(t: np.ndarray) -> dict[str, float]:
    """clip_benchmark's zero-shot classification metrics of a tally: ``acc1``, ``acc5`` (NaN
    below five classes, as clip_benchmark) and ``mean_per_class_recall`` (sklearn's
    ``balanced_accuracy_score``: the mean recall of the classes that have images)."""
    present = t[:, 0] > 0
    return {"acc1": tally_accuracy(t),
            "acc5": float(t[:, 2].sum() / t[:, 0].sum()) if len(t) >= 5 else float("nan"),
            "mean_per_class_recall": float(np.mean(t[present, 1] / t[present, 0]))}


@dataclasses.dataclass(frozen=True)
class Mix:
    """How one report row's logits come from its runs' logits: weighted and summed in order (a
    routed ensemble), or their mean when ``weights`` is None (a baseline, an expert alone)."""
    runs: tuple[str, ...]
    weights: tuple[float, ...] | None = None

    def logits(self, per_run: dict[str, np.ndarray]) -> np.ndarray:
        if self.weights is None:
            return np.mean([per_run[r] for r in self.runs], axis=0)
        # float64 weights times float32 logits, summed in expert order: float64 mixed logits
        return sum(np.float64(w) * per_run[r] for r, w in zip(self.runs, self.weights, strict=True))


def runs_of(mixes: dict[str, Mix]) -> list[str]:
    """The runs whose logits some mix reads, each once, in first-use order."""
    return list(dict.fromkeys(r for mix in mixes.values() for r in mix.runs))


def label_probabilities(mixed: np.ndarray, scale: float) -> np.ndarray:
    """Softmax over labels of mixed cosine logits (one row per image) times a logit scale."""
    z = scale * np.atleast_2d(mixed)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)
