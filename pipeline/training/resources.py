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

A refusal offers only changes it has checked against the same nodes: a lower
``max_concurrent``, ``num_workers``, ``cpus_per_worker`` or ``data_cpus``. Zero CPUs per worker
is offered only to a worker that reserves something else (a GPU, a custom resource): Ray refuses
a bundle of only zeros. ``pipeline.core.plan`` checks every stage of a config this way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

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
    remedies: tuple[str, ...] = ()   # "section.field=value" changes, each checked to fit
    problem: str = ""   # what does not fit, without the advice


def reserves_nothing(bundle: Resources) -> bool:
    """Ray refuses a placement group bundle of zeros ("Bundles cannot be an empty dictionary or
    resources with only 0 values"): a worker must reserve something."""
    return not any(v > 0 for v in bundle.values())


def check(nodes: Sequence[Resources], worker: Resources, workers_per_run: int, runs: int,
          data_cpus: float, knobs: str = "train",
          valid_workers: Callable[[int], bool] | None = None) -> Plan:
    """Can ``runs`` runs of ``workers_per_run`` workers (``worker`` resources each) train at
    once on ``nodes`` (each node's total resources), with room for a data task of
    ``data_cpus`` CPUs beside them? ``knobs`` prefixes the config names in the advice.

    A refusal names the changes that make it fit (``Plan.remedies``): each is checked here
    before it is offered. A worker count is offered only where ``valid_workers`` accepts it
    (the batch must divide among the workers); without it, none is."""
    plan = _check(nodes, worker, workers_per_run, runs, data_cpus, knobs)
    if plan.fits:
        return plan
    remedies = _remedies(nodes, worker, workers_per_run, runs, data_cpus, knobs, valid_workers)
    advice = (f": set {' or '.join(remedies)}, or add nodes" if remedies else
              ": no change of one of max_concurrent, num_workers, cpus_per_worker or data_cpus "
              "makes it fit; add nodes")
    return dataclasses.replace(plan, reason=plan.reason + advice, remedies=tuple(remedies),
                               problem=plan.reason)


def _remedies(nodes: Sequence[Resources], worker: Resources, workers_per_run: int, runs: int,
              data_cpus: float, knobs: str, valid_workers: Callable[[int], bool] | None) -> list[str]:
    """The largest value below the current one of each knob that fits, the others unchanged."""
    def fits(w: Resources = worker, n: int = workers_per_run, r: int = runs, d: float = data_cpus) -> bool:
        return _check(nodes, w, n, r, d, knobs).fits

    found = []
    if (r := next((r for r in range(runs - 1, 0, -1) if fits(r=r)), None)) is not None:
        found.append(f"{knobs}.max_concurrent={r}")
    if valid_workers is not None and (n := next((n for n in range(workers_per_run - 1, 0, -1)
                                                 if valid_workers(n) and fits(n=n)), None)) is not None:
        found.append(f"{knobs}.num_workers={n}")
    cpus = worker.get("CPU", 0.0)
    if reserves_nothing(worker):     # the one change upwards: the least CPU that fits
        most = max((n.get("CPU", 0.0) for n in nodes), default=0.0)
        c = next((q / 4 for q in range(1, int(most * 4) + 1) if fits(w={**worker, "CPU": q / 4})), None)
        return found + ([f"{knobs}.cpus_per_worker={c:g}"] if c is not None else [])
    for c in _quarters_below(cpus, zero=True):
        lighter = {**worker, "CPU": c}
        if not reserves_nothing(lighter) and fits(w=lighter):
            found.append(f"{knobs}.cpus_per_worker={c:g}")
            break
    if (d := next((d for d in _quarters_below(data_cpus, zero=False) if fits(d=d)), None)) is not None:
        found.append(f"{knobs}.data_cpus={d:g}")
    return found


def _quarters_below(value: float, zero: bool) -> list[float]:
    """Multiples of 0.25 below ``value``, largest first (0 included if ``zero``)."""
    steps = int((value - EPS) // 0.25)
    return [q / 4 for q in range(steps, -1 if zero else 0, -1)]


def _check(nodes: Sequence[Resources], worker: Resources, workers_per_run: int, runs: int,
           data_cpus: float, knobs: str) -> Plan:
    bundles = [worker] * (workers_per_run * runs)
    wanted = ", ".join(f"{k}={v:g}" for k, v in worker.items())
    if reserves_nothing(worker):
        return Plan(False, f"a worker of {{{wanted}}} reserves nothing, and Ray refuses a bundle of "
                    f"only zeros (give it CPUs, a GPU with {knobs}.use_gpu or {knobs}.worker_resources)", 0)
    if not nodes:
        return Plan(False, "the cluster has no node that runs tasks", 0)
    slots = []
    for spread in (False, True):
        free = place(bundles, nodes, spread)
        if free is None:
            return Plan(False, f"{runs} run(s) x {workers_per_run} worker(s) of {{{wanted}}} do not "
                        f"fit on the nodes ({_describe(nodes)})", 0)
        slots.append(sum(int((f.get("CPU", 0.0) + EPS) // data_cpus) for f in free))
        most = max(max(f.get("CPU", 0.0) for f in free), 0.0)
        how = "spread over the nodes" if spread else "packed"
        if slots[-1] == 0:
            return Plan(False, f"with {runs} run(s) x {workers_per_run} worker(s) of {{{wanted}}} "
                        f"{how}, no node keeps the {data_cpus:g} CPU a Ray Data task of "
                        f"{knobs}.data_cpus asks for (at most {most:g} free on one "
                        f"node): runs would wait for data forever", 0)
        if most + EPS < LISTING_CPUS:
            return Plan(False, f"with {runs} run(s) x {workers_per_run} worker(s) of {{{wanted}}} "
                        f"{how}, no node keeps the whole CPU Ray Data's file listing asks for "
                        f"(at most {most:g} free on one node): runs would wait for data forever", 0)
    return Plan(True, f"{runs} run(s) x {workers_per_run} worker(s) of {{{wanted}}} fit, with "
                f"room for {min(slots)} data task(s) of {data_cpus:g} CPU beside them", min(slots))


def _describe(nodes: Sequence[Resources]) -> str:
    kinds: dict[str, int] = {}
    for n in nodes:
        text = "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(n.items())) + "}"
        kinds[text] = kinds.get(text, 0) + 1
    return ", ".join(f"{c} x {t}" for t, c in kinds.items())
