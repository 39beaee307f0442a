"""One data expert behind Ray Serve: its model loads once per replica, and concurrent requests
are encoded together (``@serve.batch``), each then scored against its own labels."""

from __future__ import annotations

import os
import resource
from collections import OrderedDict
from typing import Any

import numpy as np
import ray
from ray import serve

from pipeline.data.images import to_rgb
from pipeline.evaluation.ensemble import fill
from pipeline.evaluation.export import load_bundle
from pipeline.serving.options import ServeOptions
from pipeline.training.checkpoint_io import load_model


@serve.deployment(name="Expert")
class Expert:
    """One expert's model: ``classify`` answers an image's cosine similarities to its labels,
    with the model's ``exp(logit_scale)``.

    ``spec`` says where the model is: ``{"checkpoint": uri, "storage": StorageConfig}`` (the
    run's registry entry) or ``{"bundle": uri}`` (an exported bundle, copied to this node's
    cache first when remote)."""

    def __init__(self, name: str, spec: dict[str, Any], options: dict[str, Any]) -> None:
        import torch  # late import: only replicas need torch

        opts = ServeOptions.from_dict(options)
        self.name, self.source = name, spec.get("checkpoint") or spec["bundle"]
        self.device = torch.device("cuda" if opts.expert_num_gpus > 0 and torch.cuda.is_available()
                                   else "cpu")
        model, self.preprocess, self.tokenizer = load(name, spec)
        self.model = model.to(self.device)
        self.scale = float(self.model.logit_scale.detach().exp())
        self.heads: OrderedDict[tuple, Any] = OrderedDict()
        self.head_cache = opts.label_cache
        self.classify.set_max_batch_size(opts.max_batch_size)
        self.classify.set_batch_wait_timeout_s(opts.batch_wait_s)

    def head(self, labels: tuple[str, ...], templates: tuple[str, ...]):
        """(d, n) unit class-text embeddings: open_clip's zero-shot head, as the ensemble's."""
        import open_clip  # late import: torch and open_clip, in replicas only
        import torch  # late import: as above

        key = (labels, templates)
        if key in self.heads:
            self.heads.move_to_end(key)
        else:
            with torch.no_grad():
                self.heads[key] = open_clip.build_zero_shot_classifier(
                    self.model, self.tokenizer, list(labels),
                    [(lambda c, t=t: fill(t, c)) for t in templates],
                    num_classes_per_batch=None, device=self.device)
            while len(self.heads) > self.head_cache:
                self.heads.popitem(last=False)
        return self.heads[key]

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)   # the options' values: __init__
    async def classify(self, requests: list[tuple[Any, tuple[str, ...], tuple[str, ...]]]
                       ) -> list[tuple[np.ndarray, float]]:
        """Each request is (RGB image, labels, templates); the images go through the image
        tower together."""
        import torch  # late import: only replicas need torch

        pixels = torch.stack([self.preprocess(to_rgb(image)) for image, _, _ in requests])
        with torch.no_grad():
            feats = self.model.encode_image(pixels.to(self.device), normalize=True)
            return [((feats[i:i + 1] @ self.head(labels, templates)).float().cpu().numpy()[0],
                     self.scale) for i, (_, labels, templates) in enumerate(requests)]

    def info(self) -> dict[str, Any]:
        """Which model this replica serves, and the replica itself (its Ray actor and process)."""
        ctx = serve.get_replica_context()
        return {"name": self.name, "source": self.source, "pid": os.getpid(),
                "actor_id": ray.get_runtime_context().get_actor_id(),
                "replica": ctx.replica_id.unique_id, "app": ctx.app_name,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def load(name: str, spec: dict[str, Any]) -> tuple[Any, Any, Any]:
    """(model in eval mode, validation transform, tokenizer) of one expert."""
    if "bundle" in spec:
        return load_bundle(spec["bundle"]).model(name)
    return load_model(spec["checkpoint"], spec["storage"])
