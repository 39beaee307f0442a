"""The experts a router serves: where they come from (a run directory, whose registry may grow,
or an exported bundle, which does not), and one Serve application per expert.

Every expert is an application of its own, ``<router app>-expert-<e>``: deploying a new one
leaves the others' replicas as they are, and each scales on its own. A ``Fleet`` is one
consistent view (routing arrays and a handle per expert); the router swaps it for a new one
once every new expert runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

from ray import serve

from pipeline.core import registry
from pipeline.core.rundir import RunDir
from pipeline.evaluation.ensemble import MoDEEnsemble, run_config
from pipeline.evaluation.export import load_bundle
from pipeline.serving.expert import Expert
from pipeline.serving.options import ServeOptions
from pipeline.training.runs import run_name


@dataclass(frozen=True)
class Source:
    """Where the experts come from: ``run`` (a run directory, watched for new experts) or
    ``bundle`` (pipeline/evaluation/export.py's bundle, fixed)."""
    kind: Literal["run", "bundle"]
    uri: str

    def __post_init__(self) -> None:
        if self.kind not in ("run", "bundle"):
            raise ValueError(f"unknown source kind {self.kind!r}; kinds: 'run', 'bundle'")

    def ensemble(self) -> MoDEEnsemble:
        """The routed ensemble as the source is now (models stay unloaded)."""
        if self.kind == "bundle":
            return load_bundle(self.uri)
        return MoDEEnsemble(self.uri, run_config(self.uri))

    def experts(self) -> frozenset[str] | None:
        """The finished experts of a run's registry (cheap: one listing); None for a bundle."""
        if self.kind == "bundle":
            return None
        run = RunDir(self.uri, run_config(self.uri).storage)
        return frozenset(n for n in registry.finished(run) if n.startswith("expert-"))

    def model_spec(self, ens: MoDEEnsemble, name: str) -> dict[str, Any]:
        """What an expert replica needs to load ``name`` on any node."""
        if self.kind == "bundle":
            return {"bundle": self.uri}
        return {"checkpoint": ens.registry[name]["checkpoint"], "storage": ens.cfg.storage}


@dataclass(frozen=True)
class Fleet:
    """The experts one request uses, from start to end."""
    version: int
    ensemble: MoDEEnsemble
    names: tuple[str, ...]                       # expert-0 .. expert-(m-1)
    handles: dict[int, Any] = field(repr=False)  # expert id -> DeploymentHandle

    @property
    def num_experts(self) -> int:
        return len(self.names)


def expert_app(router_app: str, name: str) -> str:
    """The Serve application of one expert."""
    return f"{router_app}-{name}"


def deploy(router_app: str, source: Source, ens: MoDEEnsemble, opts: ServeOptions) -> list[str]:
    """Deploy every expert of ``ens`` that has no application yet, without waiting for it; an
    existing application is left as it is, replicas and all. Returns the ones deployed."""
    apps = serve.status().applications
    names = [run_name("expert", e) for e in range(ens.num_experts)]
    missing = [n for n in names if expert_app(router_app, n) not in apps]
    if missing:
        expert = Expert.options(**opts.expert_deployment())
        serve.run_many([serve.RunTarget(expert.bind(n, source.model_spec(ens, n), opts.to_dict()),
                                        name=expert_app(router_app, n), route_prefix=None)
                        for n in missing], wait_for_applications_running=False)
    return missing


def wait(router_app: str, ens: MoDEEnsemble, version: int, timeout_s: float) -> Fleet:
    """The fleet of ``ens`` once every expert's application runs (an application that failed
    to deploy raises, with Serve's message)."""
    names = tuple(run_name("expert", e) for e in range(ens.num_experts))
    apps = [expert_app(router_app, n) for n in names]
    deadline = time.monotonic() + timeout_s
    while True:
        status = serve.status().applications
        states = {a: status[a].status if a in status else "NOT_STARTED" for a in apps}
        failed = {a: status[a].message for a, s in states.items() if s in ("DEPLOY_FAILED", "UNHEALTHY")}
        if failed:
            raise RuntimeError(f"expert applications failed: {failed}")
        if all(s == "RUNNING" for s in states.values()):
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"expert applications not running after {timeout_s:.0f} s: {states}")
        time.sleep(0.25)
    return Fleet(version, ens, names, {e: serve.get_app_handle(a) for e, a in enumerate(apps)})
