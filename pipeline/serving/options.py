"""The serving options: one frozen dataclass, checked when it is built (docs/serving.md)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from pipeline.evaluation.metrics import DEFAULT_TEMPLATES

# The prompt templates of jobs/predict.py, so that the service and the job give the same answer.


@dataclass(frozen=True)
class ServeOptions:
    templates: tuple[str, ...] = DEFAULT_TEMPLATES  # prompt templates, each with {c} (or {})
    temperature: float | None = None    # routing temperature; None: the ensemble's (8, or a bundle's)
    top_k: int = 0                      # experts run per request; 0: all of them, as in the paper
    poll_s: float = 5.0                 # seconds between two looks at the run's registry
    deploy_timeout_s: float = 600.0     # longest wait for new experts to run
    max_labels: int = 1000              # most labels one request may carry
    max_label_chars: int = 200          # longest label
    max_body_bytes: int = 8 * 1024**2   # largest request body (the base64 image and the labels)
    max_image_pixels: int = 40_000_000  # largest decoded image, refused from its header
    label_cache: int = 256              # label sets whose embeddings, weights, heads stay cached
    max_batch_size: int = 16            # images one expert replica encodes at once (@serve.batch)
    batch_wait_s: float = 0.005         # how long a replica waits to fill a batch
    expert_num_cpus: float = 1.0        # CPUs of one expert replica
    expert_num_gpus: float = 0.0        # GPUs of one expert replica
    expert_min_replicas: int = 1        # 0 lets an idle expert scale to zero (a cold start later)
    expert_initial_replicas: int = 1    # replicas of a newly deployed expert
    expert_max_replicas: int = 4        # replicas one expert may scale up to
    expert_target_ongoing: float = 4.0  # requests per replica the autoscaler aims at
    downscale_delay_s: float = 600.0    # idle seconds before a replica is taken away
    router_num_cpus: float = 1.0        # CPUs of one router replica (the caption encoder runs there)
    router_min_replicas: int = 1        # the router answers /healthz: never zero
    router_max_replicas: int = 2        # router replicas under load

    def __post_init__(self) -> None:
        object.__setattr__(self, "templates", tuple(self.templates))   # a cache key: hashable
        if self.temperature is not None and not self.temperature > 0:
            raise ValueError(f"serving option temperature must be > 0, got {self.temperature!r}")
        positive = ("poll_s", "deploy_timeout_s", "max_labels", "max_label_chars", "max_body_bytes",
                    "max_image_pixels", "label_cache", "max_batch_size", "expert_max_replicas",
                    "expert_target_ongoing", "router_max_replicas", "router_num_cpus",
                    "expert_num_cpus")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"serving option {name} must be > 0, got {getattr(self, name)!r}")
        for name in ("top_k", "batch_wait_s", "expert_num_gpus", "expert_min_replicas",
                     "downscale_delay_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"serving option {name} must be >= 0, got {getattr(self, name)!r}")
        if not self.templates or any("{c}" not in t and "{}" not in t for t in self.templates):
            raise ValueError(f"serving option templates must be a non-empty list of strings with {{c}} or "
                             f"{{}}, got {list(self.templates)!r}")
        if not self.expert_min_replicas <= self.expert_initial_replicas <= self.expert_max_replicas:
            raise ValueError("serving options need expert_min_replicas <= expert_initial_replicas "
                             f"<= expert_max_replicas, got {self.expert_min_replicas}, "
                             f"{self.expert_initial_replicas}, {self.expert_max_replicas}")
        if not 1 <= self.router_min_replicas <= self.router_max_replicas:
            raise ValueError("serving options need 1 <= router_min_replicas <= router_max_replicas "
                             "(the router answers /healthz: never zero), got "
                             f"{self.router_min_replicas}, {self.router_max_replicas}")

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> ServeOptions:
        """Options from plain values (a Serve config file's ``args``, or the strings of
        ``serve run``'s ``name=value``); an unknown name is an error that lists the known ones."""
        values = dict(values or {})
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown serving options {unknown}; options: {sorted(known)}")
        if "templates" in values:
            t = values["templates"]
            values["templates"] = (t,) if isinstance(t, str) else tuple(t)
        for name, value in values.items():
            kind = known[name].type
            if kind == "float | None" and value is not None:
                kind = "float"
            if kind in ("int", "float") and isinstance(value, str):   # `serve run ... top_k=2`
                try:
                    value = float(value)
                except ValueError:
                    pass
            if kind in ("int", "float") and (isinstance(value, bool)
                                             or not isinstance(value, (int, float))
                                             or (kind == "int" and not float(value).is_integer())):
                raise ValueError(f"serving option {name} must be a number ({kind}), got {value!r}")
            if kind == "int":
                values[name] = int(value)
            elif kind == "float":
                values[name] = float(value)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (lists for tuples): what ``from_dict`` takes back."""
        d = dataclasses.asdict(self)
        d["templates"] = list(self.templates)
        return d

    def expert_deployment(self) -> dict[str, Any]:
        """``Deployment.options`` of one expert: its resources and autoscaling."""
        return {
            "ray_actor_options": {"num_cpus": self.expert_num_cpus, "num_gpus": self.expert_num_gpus},
            # a replica holds a batch being encoded and the next one filling
            "max_ongoing_requests": 2 * self.max_batch_size,
            "autoscaling_config": {
                "min_replicas": self.expert_min_replicas,
                "initial_replicas": self.expert_initial_replicas,
                "max_replicas": self.expert_max_replicas,
                "target_ongoing_requests": self.expert_target_ongoing,
                "downscale_delay_s": self.downscale_delay_s,
            },
        }

    def router_deployment(self) -> dict[str, Any]:
        """``Deployment.options`` of the router (the HTTP ingress)."""
        return {
            "ray_actor_options": {"num_cpus": self.router_num_cpus},
            "max_ongoing_requests": 64,
            "autoscaling_config": {
                "min_replicas": self.router_min_replicas,
                "max_replicas": self.router_max_replicas,
                "target_ongoing_requests": 16,
                "downscale_delay_s": self.downscale_delay_s,
            },
        }
