"""Routing a task to the data experts, and the MoDE ensemble (docs/routing.md).

``routing_weights`` is pure numpy: a task's class embeddings (built with the clustering encoder)
are matched to the fine centres, and each expert is weighted by the classes that land in its
fine clusters. ``MoDEEnsemble`` loads a run directory's experts and mixes their zero-shot logits
with those weights.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import yaml

from pipeline.clustering import clusters, onestep
from pipeline.core import registry
from pipeline.core.config import Config, StorageConfig, load_config
from pipeline.core.rundir import RunDir
from pipeline.data.encoders import CaptionEncoder
from pipeline.data.images import to_rgb
from pipeline.training.checkpoint_io import load_model
from pipeline.training.runs import run_name

if TYPE_CHECKING:
    import torch

Variant = Literal["code", "paper"]


def _check(class_embeddings: np.ndarray, fine_centroids: np.ndarray,
           fine_to_expert: np.ndarray, num_experts: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    e = np.asarray(class_embeddings, np.float64)
    c = np.asarray(fine_centroids, np.float64)
    f2e = np.asarray(fine_to_expert)
    if e.ndim != 2 or c.ndim != 2 or e.shape[1] != c.shape[1]:
        raise ValueError(f"class_embeddings {e.shape} and fine_centroids {c.shape} must be (n, d) "
                         "and (K, d) with the same d")
    if len(e) == 0:
        raise ValueError("a task needs at least one class")
    if f2e.shape != (len(c),):
        raise ValueError(f"fine_to_expert has shape {f2e.shape}, expected ({len(c)},)")
    if num_experts < 1 or f2e.min() < 0 or f2e.max() >= num_experts:
        raise ValueError(f"fine_to_expert values must be in 0..{num_experts - 1}")
    return e, c, f2e.astype(np.int64)


def nearest_fine(class_embeddings: np.ndarray, fine_centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each class's nearest fine centre and its plain L2 distance (float64, exact)."""
    e = np.asarray(class_embeddings, np.float64)
    c = np.asarray(fine_centroids, np.float64)
    sq = (e * e).sum(1)[:, None] - 2 * e @ c.T + (c * c).sum(1)[None, :]
    s = np.argmin(sq, axis=1)
    return s, np.sqrt(np.maximum(sq[np.arange(len(e)), s], 0.0))


def _softmax(u: np.ndarray) -> np.ndarray:
    z = np.exp(u - u.max())
    return z / z.sum()


def routing_weights(class_embeddings: np.ndarray, fine_centroids: np.ndarray,
                    fine_to_expert: np.ndarray, num_experts: int, *,
                    variant: Variant = "code", temperature: float = 8.0,
                    small_n: int = 10, a_offset: float = 0.5, beta_scale: float = 5.0,
                    beta_shift: float = 200.0, beta_floor: float = 10.0,
                    lam: float = 0.2, mode: Literal["routed", "uniform", "top_k"] = "routed",
                    k: int = 1) -> np.ndarray:
    """Expert weights for one task, float64 of shape ``(num_experts,)`` summing to 1.

    ``variant="code"`` (default) is the authors' code (docs/routing.md): each class l goes to
    the expert owning its nearest fine centre at plain L2 distance d_l;
    ``u_c = sum_{l -> c} exp(beta * (a - d_l))`` with ``a = exp(a_offset - sqrt(n))`` when
    ``n < small_n`` (else 0) and ``beta = beta_scale * log10(max(beta_floor, n - beta_shift))``;
    an expert with no class has ``u_c = 0``; weights ``softmax(u / temperature)``.

    ``variant="paper"`` is the paper's text: ``p(c|T)`` proportional to
    ``exp(sum_{l -> c} exp(-d_l**2 / lam))``, again only each class's nearest fine centre
    (``temperature`` divides the exponent as well; 1 is the paper).

    ``mode="uniform"`` ignores the classes (1/m each); ``mode="top_k"`` keeps the ``k`` largest
    routed weights, renormalised, and zeros the rest (those experts need not run at all).
    """
    e, c, f2e = _check(class_embeddings, fine_centroids, fine_to_expert, num_experts)
    if mode == "uniform":
        return np.full(num_experts, 1.0 / num_experts)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n = len(e)
    s, d = nearest_fine(e, c)
    expert = f2e[s]
    if variant == "code":
        a = math.exp(a_offset - math.sqrt(n)) if n < small_n else 0.0
        beta = beta_scale * math.log10(max(beta_floor, n - beta_shift))
        score = np.exp(beta * (a - d))
    elif variant == "paper":
        score = np.exp(-(d ** 2) / lam)
    else:
        raise ValueError(f"unknown variant {variant!r}; variants: 'code', 'paper'")
    u = np.bincount(expert, weights=score, minlength=num_experts).astype(np.float64)
    w = _softmax(u / temperature)
    if mode == "top_k":
        if not 1 <= k <= num_experts:
            raise ValueError(f"top_k needs 1 <= k <= {num_experts}, got {k}")
        keep = np.argsort(-w, kind="stable")[:k]
        out = np.zeros(num_experts)
        out[keep] = w[keep]
        return out / out.sum()
    if mode != "routed":
        raise ValueError(f"unknown mode {mode!r}; modes: 'routed', 'uniform', 'top_k'")
    return w


# ----------------------------------------------------------------------------- the ensemble
def fill(template: str, classname: str) -> str:
    """A prompt template with its class: clip_benchmark's ``{c}`` or open_clip's ``{}``."""
    return template.replace("{c}", classname) if "{c}" in template else template.format(classname)


def class_embeddings(encoder, classnames: Sequence[str], templates: Sequence[str]) -> np.ndarray:
    """(n, d) float64 unit rows with the clustering encoder: every template filled with the
    class, each embedded and normalised, averaged per class, normalised again."""
    texts = [fill(t, c) for c in classnames for t in templates]
    e = np.asarray(encoder.encode(texts), np.float64)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    e = e.reshape(len(classnames), len(templates), -1).mean(axis=1)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


@dataclass(frozen=True)
class ZeroShot:
    logits: np.ndarray                   # (N, n) the weighted mix of the experts' logits
    expert_logits: dict[int, np.ndarray]  # expert id -> (N, n) cosine similarities (run ones)
    weights: np.ndarray                  # (m,) routing weights used (zeros: expert not run)


class MoDEEnsemble:
    """The data experts of a run directory, routed per task.

    Loads the run's registry (expert entries and their checkpoints), the fine centres and
    fine-to-expert map of ``clusters/`` with those of every generation whose experts are trained
    (docs/growth.md), and the clustering encoder (``embed.model`` of the run's config). Models
    load lazily and stay cached, so routing with ``top_k`` never loads or runs the experts it
    drops. Baseline runs of the registry (seed, full-i, random-split-e, dense-matched) load
    the same way through ``model(name)``.
    """

    def __init__(self, run_uri: str, cfg: Config | None = None, device: str = "cpu",
                 generations: Sequence[str] | None = None) -> None:
        import torch  # late import: routing_weights alone needs no torch

        if cfg is None:
            cfg = run_config(run_uri)
        self.cfg, self.device = cfg, torch.device(device)
        self.run = RunDir(run_uri, cfg.storage)
        self.registry = registry.finished(self.run)
        if generations is None:     # the generations whose experts have all finished training,
            generations = []        # up to the first that has not (the ids must follow each other)
            for g in clusters.grown(self.run):
                ids = np.unique(clusters.load_level(self.run.generation(g), "fine_to_expert"))
                if not all(run_name("expert", e) in self.registry for e in ids):
                    break
                generations.append(g)
        self.generations = list(generations)
        arrays = clusters.load(self.run, self.generations)
        self.fine_centroids = arrays["fine_centroids"]
        self.fine_to_expert = arrays["fine_to_expert"]
        self.coarse_centroids = arrays["coarse_centroids"]
        self.num_experts = int(len(arrays["coarse_centroids"]))
        # (fine centres, experts) of the ensemble before each generation: a prefix of the union.
        self.levels = [(len(clusters.load_level(self.run, "fine_to_expert")),
                        len(clusters.load_level(self.run, "coarse_centroids")))]
        for g in self.generations:
            part = self.run.generation(g)
            fine, coarse = (len(clusters.load_level(part, n)) for n in ("fine_to_expert", "coarse_centroids"))
            self.levels.append((self.levels[-1][0] + fine, self.levels[-1][1] + coarse))
        # The OneStep ablation's experts (jobs/experiment.py), routed by their own centres, when
        # every one of them is trained.
        self.onestep_runs: list[str] = []
        m_onestep = len(self.run.manifest("onestep")["stats"]["rows_per_expert"]) \
            if self.run.manifest("onestep") else 0
        if m_onestep and all(run_name("onestep", e) in self.registry for e in range(m_onestep)):
            self.onestep_runs = [run_name("onestep", e) for e in range(m_onestep)]
            self.onestep_centroids = onestep.centroids(self.run)
        missing = [e for e in range(self.num_experts) if run_name("expert", e) not in self.registry]
        if missing:
            raise ValueError(f"{run_uri}: experts {missing} are not registered yet (trained: "
                             f"{sorted(self.registry)}); run jobs/train_experts.py first")
        self._start_caches()

    def _start_caches(self) -> None:
        """The empty caches of models, heads and routes (an ensemble loaded another way, such
        as ``pipeline.evaluation.export.BundleEnsemble``, starts them the same)."""
        self._models: dict[str, tuple] = {}
        self._encoder = None
        self._heads: dict[tuple, Any] = {}        # (run, classes, templates) -> text head
        self._routes: dict[tuple, np.ndarray] = {}  # (classes, templates) -> class embeddings
        # The last image list preprocessed, with its architecture and the tensor: a task's
        # images go through every run, and runs of one architecture share open_clip's
        # transform, so each task is transformed once, not once per run (one entry: a
        # task's tensor at a time, as each run's features already need).
        self._pixels: tuple[Any, str, Any] | None = None

    @property
    def encoder(self):
        if self._encoder is None:
            self._encoder = CaptionEncoder(self.cfg.embed.model, batch_size=self.cfg.embed.batch_size)
        return self._encoder

    def model(self, name: str) -> tuple:
        """(model, preprocess, tokenizer) of a registry run, in eval mode on the device."""
        if name not in self._models:
            if name not in self.registry:
                raise KeyError(f"no run {name!r} in the registry; runs: {sorted(self.registry)}")
            model, preprocess, tokenizer = load_model(self.registry[name]["checkpoint"],
                                                      self.cfg.storage)
            self._models[name] = (model.to(self.device), preprocess, tokenizer)
        return self._models[name]

    def class_embeddings(self, classnames: Sequence[str], templates: Sequence[str]) -> np.ndarray:
        """The task's class embeddings with the clustering encoder (cached per task)."""
        key = (tuple(classnames), tuple(templates))
        if key not in self._routes:
            self._routes[key] = class_embeddings(self.encoder, classnames, templates)
        return self._routes[key]

    def weights(self, classnames: Sequence[str], templates: Sequence[str], level: int = -1,
                **params) -> np.ndarray:
        """``routing_weights`` of a task (``params``: temperature, mode, k, variant, ...;
        ``centres="coarse"`` routes by the coarse centres, see ``route``).

        ``level``: the ensemble as it was before generation ``level`` was added (an index into
        ``levels``; -1, the default, is every generation): its fine centres and experts are a
        prefix of the union's, so the result has that many weights."""
        return self.route(self.class_embeddings(classnames, templates), level, **params)

    def route(self, class_embeddings: np.ndarray, level: int = -1, centres: str = "fine",
              **params) -> np.ndarray:
        """``routing_weights`` of embedded classes (or captions). ``centres="fine"`` is MoDE:
        each class goes to the expert that owns its nearest fine centre. ``centres="coarse"``
        is the paper's CoarseCluster ablation: each class goes straight to its nearest coarse
        centre, that is to the expert itself, without the fine level. ``centres="onestep"``
        weights the OneStep ablation's experts by their own centres (``onestep_runs``)."""
        fine, m = self.levels[level]
        if centres == "fine":
            return routing_weights(class_embeddings, self.fine_centroids[:fine],
                                   self.fine_to_expert[:fine], m, **params)
        if centres == "coarse":
            return routing_weights(class_embeddings, self.coarse_centroids[:m], np.arange(m), m,
                                   **params)
        if centres == "onestep":
            m = len(self.onestep_runs)
            return routing_weights(class_embeddings, self.onestep_centroids, np.arange(m), m, **params)
        raise ValueError(f"unknown centres {centres!r}; centres: 'fine', 'coarse', 'onestep'")

    def classifier(self, name: str, classnames: Sequence[str], templates: Sequence[str]):
        """(d, n) unit class-text embeddings of one model: open_clip's zero-shot head (cached
        per model and task, so batches of one task build it once)."""
        import open_clip  # late import: open_clip and torch, not needed to route
        import torch

        key = (name, tuple(classnames), tuple(templates))
        if key not in self._heads:
            model, _, tokenizer = self.model(name)
            with torch.no_grad():
                self._heads[key] = open_clip.build_zero_shot_classifier(
                    model, tokenizer, list(classnames), [_formatter(t) for t in templates],
                    num_classes_per_batch=None, device=self.device)
        return self._heads[key]

    def image_features(self, name: str, images) -> torch.Tensor:
        """(N, d) unit image embeddings; ``images`` are PIL images or a preprocessed batch."""
        import torch  # late import: not needed to route

        model, preprocess, _ = self.model(name)
        if not isinstance(images, torch.Tensor):
            arch = self.registry[name].get("model") or name   # entries name their architecture
            if self._pixels is None or self._pixels[0] is not images or self._pixels[1] != arch:
                self._pixels = (images, arch, torch.stack([preprocess(to_rgb(im)) for im in images]))
            images = self._pixels[2]
        with torch.no_grad():
            return model.encode_image(images.to(self.device), normalize=True)

    def logits(self, name: str, images, classnames: Sequence[str],
               templates: Sequence[str]) -> np.ndarray:
        """(N, n) cosine similarities of one model's image and class-text embeddings."""
        feats = self.image_features(name, images)
        return (feats @ self.classifier(name, classnames, templates)).float().cpu().numpy()

    def zero_shot(self, images, classnames: Sequence[str], templates: Sequence[str],
                  **params) -> ZeroShot:
        """Routed zero-shot classification: the mixed logits, each run expert's logits and the
        weights. Experts with weight 0 (``mode="top_k"``) are not run."""
        w = self.weights(classnames, templates, **params)
        per = {e: self.logits(run_name("expert", e), images, classnames, templates)
               for e in range(self.num_experts) if w[e] > 0}
        mixed = sum(w[e] * lg for e, lg in per.items())
        return ZeroShot(np.asarray(mixed), per, w)


def _formatter(template: str):
    return lambda c: fill(template, c)


def run_config(run_uri: str, storage: StorageConfig | None = None) -> Config:
    """The config a run directory was made with (its ``config.yaml``)."""
    run = RunDir(run_uri, storage or StorageConfig())
    if not run.has_config():
        raise FileNotFoundError(f"{run_uri} has no config.yaml: is it a run directory?")
    saved = yaml.safe_load(run.fs.cat_file(run.config_path))
    if storage is not None:
        saved["storage"] = dataclasses.asdict(storage)
    return load_config(saved)
