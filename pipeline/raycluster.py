"""Start or join Ray: the one place that decides which cluster a job runs on."""

from __future__ import annotations

import logging
import os

import ray

from pipeline import console
from pipeline.config import RayConfig

# Ray Data's parquet reader (datasource V2) starts a pool of 32 footer-reading actors for every
# read, a size meant for clusters. On a laptop each one is a fresh Python process: a demo expert
# run reads parquet 4 times, and three runs at once started and killed ~70 such processes on 2
# cores (README, "Demo timings"). A local Ray gets one per read unless the variable is set.
FOOTER_ACTORS_ENV = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"
LOCAL_FOOTER_ACTORS = "1"


def init_ray(cfg: RayConfig, num_cpus: int | None = None) -> str:
    """Join the configured cluster, the one ``ray job submit`` runs us on, or start a local one.

    Under ``ray job submit`` the driver gets ``RAY_ADDRESS``; with no address anywhere a
    private local Ray is started (``address="local"``, never attaching to a stranger's
    cluster on the same machine), sized to this machine unless ``num_cpus`` says otherwise.
    Worker output stays in Ray's session logs unless the job is verbose (``pipeline.console``).
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

        # Set before Ray starts: the local raylet, and every worker it starts, inherit it.
        os.environ.setdefault(FOOTER_ACTORS_ENV, LOCAL_FOOTER_ACTORS)
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
