"""Start or join Ray: the one place that decides which cluster a job runs on."""

from __future__ import annotations

import logging
import os

import ray
from ray.autoscaler.v2.sdk import get_cluster_status

from pipeline.core import console
from pipeline.core.config import RayConfig, StorageConfig, parse_node_types
from pipeline.core.storage import is_remote

# Ray Data's parquet reader (datasource V2) starts a pool of 32 footer-reading actors for every
# read, a size meant for clusters. On a laptop each one is a fresh Python process: a demo expert
# run reads parquet 4 times, and three runs at once started and killed ~70 such processes on 2
# cores. A local Ray gets one per read unless the variable is set.
FOOTER_ACTORS_ENV = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"
LOCAL_FOOTER_ACTORS = "1"
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
# Ray's log monitor looks for new worker log files ten times a second while a node has fewer
# than 1,000 of them (six globs of the log folder each time), to forward worker output to
# drivers. A local Ray's jobs forward none unless verbose (``pipeline.core.console``), and each
# training run adds a dozen log files; there it looks every 2 s instead.
LOG_MONITOR_ENV = {"RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0", "LOG_NAME_UPDATE_INTERVAL_S": "2"}


def init_ray(cfg: RayConfig, num_cpus: int | None = None) -> str:
    """Join the configured cluster, the one ``ray job submit`` runs us on, or start a local one.

    Under ``ray job submit`` the driver gets ``RAY_ADDRESS``; with no address anywhere a
    private local Ray is started (``address="local"``, never attaching to a stranger's
    cluster on the same machine), sized to this machine unless ``num_cpus`` says otherwise.
    Worker output stays in Ray's log files unless the job is verbose (``pipeline.core.console``).
    Returns a short description of what it did.
    """
    if ray.is_initialized():
        return "ray already initialised"
    verbose = console.is_verbose()
    quiet = {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.ERROR}
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        context = ray.init(address=address, **quiet)
        what = f"joined ray cluster at {address}"
    else:
        def quiet_workers() -> None:
            # Without the dashboard there is no State API, and Ray Train's placement-group
            # cleaner then warns about it every second of every run; its job (removing a dead
            # controller's placement group) does not need the warning. A logger name, not an
            # import; nested, so Ray ships it by value and no worker imports our modules for it.
            logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner") \
                .setLevel(logging.ERROR)

        # Set before Ray starts: the local raylet, and every worker it starts, inherit them.
        os.environ.setdefault(FOOTER_ACTORS_ENV, LOCAL_FOOTER_ACTORS)
        # Ray Train's preemption watcher is one more actor process per worker-group start (2 s
        # of CPU on 2 cores) that polls for node drains, and one machine has no node to drain.
        os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")
        for name, value in LOG_MONITOR_ENV.items():
            os.environ.setdefault(name, value)
        context = ray.init(address="local", num_cpus=num_cpus or os.cpu_count(),
                           object_store_memory=cfg.object_store_memory, include_dashboard=False,
                           runtime_env={"worker_process_setup_hook": quiet_workers}, **quiet)
        what = f"started local ray with {ray.cluster_resources().get('CPU', 0):g} CPUs"
    console.quiet_ray_data()
    session = context.address_info.get("session_dir")
    if not session:
        return what
    console.attach_ray_logs(os.path.join(session, "logs"))
    return what + ("" if verbose else f"; Ray's logs: {session}/logs")


# ----------------------------------------------------------------------------- shared storage
def unshared_paths(uris, nodes: int, cpus: float, shared_mount: str | None) -> list[str]:
    """The URIs among ``uris`` that a cluster of ``nodes`` alive nodes (``cpus`` CPUs in all)
    cannot share: local paths outside ``shared_mount``, when the work may run on more than one
    machine. That is more than one node, or a head alone that runs no task (its work goes to
    worker nodes the autoscaler has not started yet). One node with CPUs: every path is fine
    (it is the same machine)."""
    if nodes <= 1 and cpus > 0:
        return []
    mount = os.path.abspath(shared_mount) if shared_mount else None
    return [u for u in uris if u and not is_remote(u)
            and not (mount and os.path.commonpath([mount, os.path.abspath(u)]) == mount)]


def require_shared_storage(uris, storage: StorageConfig) -> None:
    """Refuse (``SystemExit``, before any work) the local paths a multi-node Ray cluster would
    scatter: each node would read and write its own disk under the same name."""
    alive = [n for n in ray.nodes() if n.get("Alive")]
    cpus = float(ray.cluster_resources().get("CPU", 0))
    bad = unshared_paths(uris, len(alive), cpus, storage.shared_mount)
    if bad:
        where = (f"{len(alive)} nodes" if len(alive) > 1 else "a head node that runs no task "
                 "(its work goes to worker nodes)")
        raise SystemExit(f"local paths on a Ray cluster of {where}: {', '.join(bad)}. Every node "
                         "must reach the run directory and the data: use s3://bucket/prefix (or gs://, az://), or a "
                         "path mounted on every node, declared with --set storage.shared_mount=PATH")


# ----------------------------------------------------------------------------- resources
def _schedulable(resources: dict[str, float]) -> dict[str, float]:
    """What tasks and actors can ask for: CPU, GPU and custom resources (not memory, the object
    store or Ray's own ``node:<ip>`` and accelerator markers)."""
    return {k: float(v) for k, v in resources.items()
            if k not in ("memory", "object_store_memory") and not k.startswith(("node:", "accelerator_type:"))}


def node_resources() -> list[dict[str, float]]:
    """Total schedulable resources of each alive node."""
    return [_schedulable(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def autoscaler_nodes(node_types: str, limit: int) -> list[dict[str, float]]:
    """Nodes the autoscaler may add (``ray.node_types``), at most ``limit`` of each type."""
    return [{k: float(v) for k, v in resources.items()}
            for count, resources in parse_node_types("ray.node_types", node_types)
            for _ in range(min(count, limit))]


def pending() -> str:
    """What the cluster is waiting to schedule, in a line (for a stalled run's message)."""
    try:
        status = get_cluster_status(ray.get_runtime_context().gcs_address)
    except Exception as e:  # noqa: BLE001 - a diagnosis must not fail the job
        return f"(cluster status unavailable: {type(e).__name__})"
    demands = status.resource_demands

    def text(bundle: dict) -> str:
        return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(bundle.items())) + "}"

    parts = [f"{r.count} task(s)/actor(s) needing {text(r.bundle)}"
             for d in demands.ray_task_actor_demand for r in d.bundles_by_count]
    parts += [f"a placement group ({d.strategy}) needing " + " + ".join(
              f"{r.count} x {text(r.bundle)}" for r in d.bundles_by_count)
              for d in demands.placement_group_demand]
    free = [text(_schedulable(n.available_resources())) for n in status.active_nodes]
    return (("waiting: " + "; ".join(parts)) if parts else "nothing waits for resources") + \
        f"; free per node: {', '.join(free) or 'no node'}"
