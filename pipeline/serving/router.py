"""The HTTP ingress: routes a request's labels to the experts, fans the image out to them, and
mixes their logits; it also deploys the experts the run's registry gains (docs/serving.md).

A request uses the ``Fleet`` it started with from start to end; a new fleet is swapped in only
once all its experts run, so no request fails while the fleet grows.
"""

import asyncio
import base64
import binascii
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from ray import serve

from pipeline.data.images import ImageTooLarge, open_rgb
from pipeline.evaluation.ensemble import class_embeddings
from pipeline.serving import fleet
from pipeline.serving.fleet import Fleet, Source
from pipeline.serving.mixing import probabilities, ranked
from pipeline.serving.options import ServeOptions

logger = logging.getLogger("ray.serve")


# The fields of a POST /classify body, and what each must be.
FIELDS = {"image": "a base64 string", "labels": "a list of strings", "top_k": "an integer or null"}


@dataclass(frozen=True)
class ClassifyRequest:
    image: str                  # base64 of an encoded image (any format Pillow reads)
    labels: list[str]           # class names
    top_k: int | None = None    # experts to run; None: the service's top_k


def parse_request(data: Any) -> ClassifyRequest:
    """A decoded JSON body as a request; ``ValueError`` names what is wrong with it."""
    if not isinstance(data, dict):
        raise ValueError(f"body must be a JSON object with the fields {', '.join(FIELDS)}")
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown fields {unknown}; fields: {', '.join(FIELDS)}")
    missing = [f for f in ("image", "labels") if f not in data]
    if missing:
        raise ValueError(f"missing fields {missing}")
    top_k = data.get("top_k")
    checks = {"image": isinstance(data["image"], str),
              "labels": isinstance(data["labels"], list) and all(isinstance(x, str) for x in data["labels"]),
              "top_k": top_k is None or (isinstance(top_k, int) and not isinstance(top_k, bool))}
    wrong = [f"{f} must be {FIELDS[f]}" for f, ok in checks.items() if not ok]
    if wrong:
        raise ValueError("; ".join(wrong))
    return ClassifyRequest(data["image"], data["labels"], top_k)


app = FastAPI(title="MoDE ensemble", description="Routed zero-shot classification (docs/serving.md)")


@serve.deployment(name="Router")
@serve.ingress(app)
class Router:
    """Routes, fans out and mixes; with a run directory, polls its registry every ``poll_s``
    and grows the fleet."""

    def __init__(self, source: Source, options: dict[str, Any]) -> None:
        self.opts = ServeOptions.from_dict(options)
        self.source = source
        self.app_name = serve.get_replica_context().app_name
        self.seen = source.experts()
        ens = source.ensemble()
        if self._deployer():   # the experts start while this replica loads its caption encoder
            fleet.deploy(self.app_name, source, ens, self.opts)
        self.encoder = ens.encoder     # one run, one caption encoder: kept across fleets
        self.encode_lock = threading.Lock()
        self.embeddings: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self.weights: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self.fleet = fleet.wait(self.app_name, ens, 0, self.opts.deploy_timeout_s)
        self.stop = threading.Event()
        if self.seen is not None:
            threading.Thread(target=self._watch, name="registry-watch", daemon=True).start()

    def __del__(self) -> None:
        if hasattr(self, "stop"):
            self.stop.set()

    # ------------------------------------------------------------------ the fleet
    def _deployer(self) -> bool:
        """One router replica deploys experts (rank 0); the others wait for them to run."""
        rank = serve.get_replica_context().rank
        return rank is None or rank.rank == 0

    def _watch(self) -> None:
        """Every ``poll_s``: when the registry's experts changed, deploy the new ones and swap
        the new fleet in. A failure is logged and tried again at the next look."""
        while not self.stop.wait(self.opts.poll_s):
            try:
                names = self.source.experts()
                if names == self.seen:
                    continue
                ens = self.source.ensemble()
                if self._deployer():
                    fleet.deploy(self.app_name, self.source, ens, self.opts)
                new = fleet.wait(self.app_name, ens, self.fleet.version + 1, self.opts.deploy_timeout_s)
                logger.info("serving %d experts (was %d)", new.num_experts, self.fleet.num_experts)
                self.fleet, self.seen = new, names
            except Exception:
                logger.exception("registry watch of %s failed; trying again in %.0f s",
                                 self.source.uri, self.opts.poll_s)

    # ------------------------------------------------------------------ routing
    def _embed(self, labels: tuple[str, ...]) -> np.ndarray:
        key = (labels, self.opts.templates)
        with self.encode_lock:
            if key in self.embeddings:
                self.embeddings.move_to_end(key)
            else:
                self.embeddings[key] = class_embeddings(self.encoder, labels, self.opts.templates)
                while len(self.embeddings) > self.opts.label_cache:
                    self.embeddings.popitem(last=False)
            return self.embeddings[key]

    async def _weights(self, experts: Fleet, labels: tuple[str, ...], top_k: int) -> np.ndarray:
        k = min(top_k, experts.num_experts)
        key = (experts.version, labels, k)
        if key not in self.weights:
            emb = await asyncio.to_thread(self._embed, labels)
            params: dict[str, Any] = {}
            if self.opts.temperature is not None:
                params["temperature"] = self.opts.temperature
            if k:
                params.update(mode="top_k", k=k)
            self.weights[key] = experts.ensemble.route(emb, **params)
            while len(self.weights) > self.opts.label_cache:
                self.weights.popitem(last=False)
        return self.weights[key]

    # ------------------------------------------------------------------ HTTP
    async def _body(self, request: Request) -> ClassifyRequest:
        kind = request.headers.get("content-type", "")
        if kind.split(";")[0].strip().lower() != "application/json":
            raise HTTPException(415, f"content type must be application/json, got {kind or 'none'!r}")
        cap = self.opts.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > cap:
            raise HTTPException(413, f"body of {int(declared):,} bytes is over the limit of {cap:,}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > cap:
                raise HTTPException(413, f"body is over the limit of {cap:,} bytes")
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise HTTPException(400, f"body is not valid JSON: {e}") from None
        try:
            return parse_request(data)
        except ValueError as e:
            raise HTTPException(422, str(e)) from None

    def _labels(self, labels: Sequence[str]) -> tuple[str, ...]:
        out = tuple(label.strip() for label in labels)
        if len(out) < 2:
            raise HTTPException(422, f"labels needs at least two class names, got {len(out)}")
        if len(out) > self.opts.max_labels:
            raise HTTPException(422, f"{len(out):,} labels is over the limit of {self.opts.max_labels:,}")
        if not all(out):
            raise HTTPException(422, "labels must not be empty strings")
        long = [label[:40] for label in out if len(label) > self.opts.max_label_chars]
        if long:
            raise HTTPException(422, f"labels longer than {self.opts.max_label_chars} characters: {long[:3]}")
        if len(set(out)) < len(out):
            raise HTTPException(422, "labels must be distinct")
        return out

    def _image(self, text: str):
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as e:
            raise HTTPException(400, f"image is not valid base64: {e}") from None
        if not data:
            raise HTTPException(400, "image is empty")
        try:
            return open_rgb(data, self.opts.max_image_pixels)
        except ImageTooLarge as e:
            raise HTTPException(413, f"image is too large: {e}") from None
        except Exception as e:   # Pillow raises many kinds for corrupt or foreign bytes
            raise HTTPException(400, f"image cannot be decoded: {type(e).__name__}: {e}") from None

    @app.post("/classify")
    async def classify(self, request: Request) -> dict[str, Any]:
        """``{"image": <base64>, "labels": [...], "top_k": optional}`` -> labels and their
        probabilities, most probable first, and every expert's routing weight."""
        req = await self._body(request)
        labels = self._labels(req.labels)
        top_k = self.opts.top_k if req.top_k is None else req.top_k
        if top_k < 0:
            raise HTTPException(422, f"top_k must be >= 0 (0: every expert), got {top_k}")
        image = await asyncio.to_thread(self._image, req.image)
        experts = self.fleet                 # this request's experts, whatever happens meanwhile
        w = await self._weights(experts, labels, top_k)
        run = [e for e in range(experts.num_experts) if w[e] > 0]
        out = await asyncio.gather(*(experts.handles[e].classify.remote((image, labels, self.opts.templates))
                                     for e in run))
        probs = probabilities(w, {e: lg for e, (lg, _) in zip(run, out, strict=True)},
                              {e: s for e, (_, s) in zip(run, out, strict=True)})
        names, p = ranked(labels, probs)
        return {"labels": names, "probs": p,
                "weights": {n: float(w[e]) for e, n in enumerate(experts.names)}}

    @app.get("/experts")
    def experts(self) -> dict[str, Any]:
        """The experts served, with their application and registry facts."""
        experts = self.fleet
        reg = experts.ensemble.registry
        return {"source": {"kind": self.source.kind, "uri": self.source.uri},
                "experts": [{"name": n, "app": fleet.expert_app(self.app_name, n),
                             "generation": reg[n].get("generation")} for n in experts.names],
                "generations": experts.ensemble.generations, "version": experts.version}

    @app.get("/healthz")
    def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "experts": self.fleet.num_experts}
