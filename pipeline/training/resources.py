"""Will concurrent training runs fit on the cluster's nodes, workers and data tasks together?

Pure arithmetic over resource dicts (no Ray here; ``pipeline.core.raycluster`` reads the nodes).

Ray schedules per node, so cluster totals mislead: two runs whose 0.5-CPU workers sit on two
1-CPU nodes leave 1 CPU free in total but no node with the whole CPU a Ray Data read task asks
for, and both runs wait for data forever. ``check`` places every worker of every concurrent run
(``train.num_workers`` bundles of ``pipeline.training.train.worker_resources`` each) on the nodes, the
way Ray may place them (packed onto as few nodes as possible, or spread over the emptiest), and
then asks whether a data task (``train.data_cpus`` CPUs) still fits on some node beside them,
in both placements. Ray Data's own listing of a read's files (the ``ListFiles`` operator of
Ray 2.60's parquet reader) always asks for one whole CPU, whatever the read's ``num_cpus``: so a
node must keep at least ``max(data_cpus, LISTING_CPUS)`` free. docs/cluster.md, "Resources per node".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

Resources = Mapping[str, float]
EPS = 1e-9
# What Ray Data's ListFiles tasks reserve (its default for map tasks; not configurable).
LISTING_CPUS = 1.0


def _fits(bundle: Resources, free: Resources) -> bool:
    return all(free.get(k, 0.0) + EPS >= v for k, v in bundle.items() if v > 0)


def _take(bundle: Resources, free: dict[str, float]) -> None:
    for k, v in bundle.items():
        free[k] = free.get(k, 0.0) - v


def place(bundles: Sequence[Resources], nodes: Sequence[Resources],
          spread: bool) -> list[dict[str, float]] | None:
    """What each node has left after placing ``bundles`` in order (None: one does not fit).

    ``spread`` False packs (first node that fits, as Ray's PACK placement groups and its
    scheduler below 50% use do); True puts each on the node with the most CPUs left."""
    free = [dict(n) for n in nodes]
    for bundle in bundles:
        fitting = [i for i, f in enumerate(free) if _fits(bundle, f)]
        if not fitting:
            return None
        i = max(fitting, key=lambda j: (free[j].get("CPU", 0.0), -j)) if spread else fitting[0]
        _take(bundle, free[i])
    return free


@dataclasses.dataclass(frozen=True)
class Plan:
    fits: bool
    reason: str         # one line: what fits, or what does not and what to change
    data_slots: int     # data tasks that fit beside the workers at once (worst placement)


def check(nodes: Sequence[Resources], worker: Resources, workers_per_run: int, runs: int,
          data_cpus: float, knobs: str = "train") -> Plan:
    """Can ``runs`` runs of ``workers_per_run`` workers (``worker`` resources each) train at
    once on ``nodes`` (each node's total resources), with room for a data task of
    ``data_cpus`` CPUs beside them? ``knobs`` prefixes the config names in the advice."""
    bundles = [worker] * (workers_per_run * runs)
    wanted = ", ".join(f"{k}={v:g}" for k, v in worker.items())
    if not nodes:
        return Plan(False, "the cluster has no node that runs tasks", 0)
    slots = []
    for spread in (False, True):
        free = place(bundles, nodes, spread)
        if free is None:
            return Plan(False, f"{runs} run(s) x {workers_per_run} worker(s) of {{{wanted}}} do not "
                        f"fit on the nodes ({_describe(nodes)}): lower {knobs}.max_concurrent or "
                        f"{knobs}.num_workers, or add nodes", 0)
        slots.append(sum(int((f.get("CPU", 0.0) + EPS) // data_cpus) for f in free))
        most = max(max(f.get("CPU", 0.0) for f in free), 0.0)
        how = "spread over the nodes" if spread else "packed"
        if slots[-1] == 0:
            return Plan(False, f"with {runs} run(s) x {workers_per_run} worker(s) of {{{wanted}}} "
                        f"{how}, no node keeps the {data_cpus:g} CPU a Ray Data task of "
                        f"{knobs}.data_cpus asks for (at most {most:g} free on one "
                        f"node): runs would wait for data forever. Lower {knobs}.data_cpus to "
                        f"{most:g} or less, or {knobs}.cpus_per_worker, or "
                        f"{knobs}.max_concurrent", 0)
        if most + EPS < LISTING_CPUS:
            return Plan(False, f"with {runs} run(s) x {workers_per_run} worker(s) of {{{wanted}}} "
                        f"{how}, no node keeps the whole CPU Ray Data's file listing asks for "
                        f"(at most {most:g} free on one node): runs would wait for data forever. "
                        f"Lower {knobs}.cpus_per_worker (0 reserves none, as Ray Train's GPU "
                        f"workers do) or {knobs}.max_concurrent", 0)
    return Plan(True, f"{runs} run(s) x {workers_per_run} worker(s) of {{{wanted}}} fit, with "
                f"room for {min(slots)} data task(s) of {data_cpus:g} CPU beside them", min(slots))


def _describe(nodes: Sequence[Resources]) -> str:
    kinds: dict[str, int] = {}
    for n in nodes:
        text = "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(n.items())) + "}"
        kinds[text] = kinds.get(text, 0) + 1
    return ", ".join(f"{c} x {t}" for t, c in kinds.items())
