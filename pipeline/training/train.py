"""Train one CLIP on Ray Train: the seed, each data expert and the baselines.

One loop for all of them (``pipeline.training.train_loop``, the part that runs on the Ray Train workers;
this module stays free of torch and open_clip at import). A run is named; its checkpoints live in
``<run dir>/checkpoints/<name>/`` (local or S3; files: ``pipeline.training.checkpoint_io``), and rerunning
the same name resumes from the latest one: resuming is rerunning. A new run may start from
another run's checkpoint (``init_checkpoint``: an expert starts from the seed's model and
optimizer), continuing its ``samples_seen`` and so the learning-rate schedule where the seed
stopped (``pipeline.training.schedule``: warmup, then a cosine to zero over ``schedule_total`` samples).

Data: rows ``{caption: str, image: encoded bytes}`` (ingest's row schema; an ``expert_id``
column, where the rows have one, comes along so that the run records how mixed its first batches
were; other columns are ignored) are decoded, transformed and tokenized with open_clip's own
image transform and tokenizer (``pipeline.training.inputs``), in Ray Data ``map_batches`` tasks or, with
``TrainConfig.decode_in_worker``, in the Ray Train worker as the rows arrive, and streamed to the
workers by ``get_dataset_shard("train")``, once per epoch, through a local shuffle buffer seeded
by the run's order seed. With ``TrainConfig.cache_inputs`` only the first epoch streams: each
worker keeps the tensors of its shard in memory and later epochs draw permutations of them
seeded the same way, which removes the per-epoch start of a Ray Data execution and every decode
after the first (for data that fits in the workers' memory, like the demo's). A resumed run
starts a fresh pass over the data; its step and samples_seen continue from the checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import ray.data
from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

from pipeline.core import console
from pipeline.core.config import StorageConfig, TrainConfig, parse_resources
from pipeline.core.faults import died
from pipeline.core.storage import filesystem, is_remote, pyarrow_filesystem, scheme
from pipeline.training.checkpoint_io import list_checkpoints
from pipeline.training.inputs import preprocess_batch

# No torch, open_clip or ray.train.torch at import: every process that unpickles this module's
# functions (Ray Train's controller, Ray Data's coordinator, each launcher task) would pay ~8 s
# of CPU for them. The worker loop is ``pipeline.training.train_loop``.


STARTS = "_starts"


# ----------------------------------------------------------------------------- data
def model_inputs(ds: ray.data.Dataset, model_name: str, augment: bool,
                 rows_per_batch: int = 256, cpus: float | None = None) -> ray.data.Dataset:
    """The model inputs of ``ds``'s rows, decoded and tokenized lazily in ``map_batches``
    (``cpus``: what each task reserves, Ray Data's 1 CPU when None)."""
    return ds.map_batches(preprocess_batch, batch_format="numpy", batch_size=rows_per_batch,
                          fn_kwargs={"model_name": model_name, "augment": augment},
                          **({} if cpus is None else {"num_cpus": cpus}))


def worker_resources(cfg: TrainConfig) -> dict[str, float]:
    """What each Ray Train worker of a run reserves: its CPUs, one GPU with ``use_gpu``, and
    ``worker_resources`` (custom resources that pin it to some node types)."""
    return {"CPU": cfg.cpus_per_worker, **({"GPU": 1.0} if cfg.use_gpu else {}),
            **parse_resources("train.worker_resources", cfg.worker_resources)}


# ----------------------------------------------------------------------------- entry point
def _train_worker(config: dict[str, Any]) -> dict[str, Any]:
    """What Ray Train runs on each worker: ``train_loop.train_loop_per_worker``, imported there
    (and only there) with torch and open_clip."""
    from pipeline.training.train_loop import train_loop_per_worker  # late import: torch, on workers only

    return train_loop_per_worker(config)


def _trainer_class(num_workers: int) -> type:
    """Ray Train's ``TorchTrainer`` for several workers: its backend (``TorchConfig``) sets up
    the process group that open_clip's ``ClipLoss`` gathers over. One worker has no group to set
    up, and the plain ``DataParallelTrainer`` (the class ``TorchTrainer`` extends) runs the same
    loop without it. That keeps torch out of two processes per run: ``TorchConfig`` pickled into
    the run's controller makes it import torch there (and this launcher, to build it), about 4 s of
    CPU each; measured on 2 cores, a one-worker run's processes took 50 s of CPU with it against
    58 s with ``TorchTrainer``. The worker's own torch code (device,
    ``prepare_model``) is the same either way."""
    if num_workers > 1:
        from ray.train.torch import TorchTrainer  # late import: it imports torch

        return TorchTrainer
    # late import: Ray Train, as above (without torch)
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    return DataParallelTrainer


@dataclasses.dataclass(frozen=True)
class TrainResult:
    name: str
    checkpoint: str            # URI of the final checkpoint directory (local path or s3://)
    step: int                  # optimiser steps the model has taken, including an init's
    samples_seen: int          # samples the model has trained on, including an init's
    start_step: int            # step this call began at (a resumed checkpoint's, an init's, 0)
    start_samples: int         # samples_seen this call began at
    steps_run: int             # optimiser steps this call executed
    history: list[dict]        # the run's log lines: step, samples_seen, loss (mean since the
                               # last line), lr, samples_per_s, data_wait (share of that time
                               # spent waiting for input)
    wall_s: float              # wall time of this call, Ray Train start-up included
    cached_rows: int = 0       # rows rank 0 held in memory for later epochs (cache_inputs)
    starts: tuple[dict, ...] = ()   # each start of the worker group in this call, oldest
                               # first: node_id, step, time, pipeline (where it was imported)
    fed: dict | None = None    # the last worker group's first pass over the data: rows,
                               # keys_digest (pipeline.core.keys.digest), complete
    first_step_s: float | None = None   # the last worker group's first step (torch.compile's
                               # compilation included with train.compile, and then kept out
                               # of samples/s)
    first_batches: dict | None = None   # the first batches (train_loop.FIRST_BATCHES) of
                               # rank 0's first pass in the last worker group: largest_share
                               # (the largest one expert's share of the batch) and expert
                               # (which one), a list each; None for rows without expert_id

    @property
    def restarts(self) -> int:
        """Worker-group restarts this call took (``train.max_failures`` allows them)."""
        return max(len(self.starts) - 1, 0)


def train(name: str, dataset: ray.data.Dataset, cfg: TrainConfig, storage_path: str,
          end_samples: int, *, schedule_total: int | None = None, threads: int | None = None,
          init_checkpoint: str | None = None, storage: StorageConfig | None = None,
          crash_at_step: int | None = None, label: str | None = None,
          order_seed: int | None = None) -> TrainResult:
    """Train (or resume) the run ``name`` until ``end_samples`` samples seen in total.

    Rerunning a name resumes from its latest checkpoint; a run already at ``end_samples``
    trains no further (Ray Train still starts, ~15 s). A run that fails because one of its
    processes died (its controller, a helper actor, its worker group past ``cfg.max_failures``:
    ``died``) is started again the same way, up to ``cfg.max_relaunches`` times. Without a
    checkpoint of its own, the run starts from ``init_checkpoint`` (a checkpoint directory URI,
    e.g. the seed's final one: model, optimizer, step and samples_seen carry over) or from a
    fresh model seeded by ``cfg.seed``.

    Args:
        name: the run's name: its checkpoints go to ``<storage_path>/<name>/``.
        dataset: rows with ``caption`` (str) and ``image`` (encoded bytes), e.g. training_data's
            rows; it is passed over repeatedly, one epoch after another, until ``end_samples``.
        cfg: the ``train`` config section (or a stage's view of it).
        storage_path: where Ray Train keeps runs: a local folder or a remote URI (``s3://``, ``gs://``).
        end_samples: absolute samples_seen at which the run stops (a multiple of the batch is
            reached exactly; otherwise the last step overshoots by less than a batch).
        schedule_total: samples over which the cosine runs (default ``cfg.total_samples``; the
            dense-matched baseline stretches it).
        threads: torch threads per worker (default ``cfg.threads_per_worker``).
        init_checkpoint: checkpoint to start from when the run has none of its own.
        storage: S3 endpoint and region for ``storage_path`` and ``init_checkpoint``.
        crash_at_step: tests only (``pipeline.core.faults.after_step``): rank 0 kills its own
            worker process (SIGKILL) after this step, in a worker group that did not resume from
            a checkpoint of the run's own, like a worker lost mid-run; with
            ``cfg.max_failures`` >= 1 Ray Train restarts the group, otherwise the run is
            relaunched (``cfg.max_relaunches``).
        label: what the run's log lines and heartbeats are prefixed with (default ``name``;
            runs of several replicas launched together need a longer one, e.g.
            "seed-2/dense-matched").
        order_seed: the seed of the data order: the local shuffle buffer's and the cached
            epochs' permutations (default ``cfg.seed``; ``pipeline.training.runs.Job.order_seed``).
    """
    schedule_total = schedule_total or cfg.total_samples
    if end_samples > schedule_total:
        raise ValueError(f"{name}: end_samples {end_samples:,} is past the schedule's end "
                         f"({schedule_total:,} samples)")
    # late import: ray.train, for the processes that only unpickle this module's functions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig

    trainer_class = _trainer_class(cfg.num_workers)

    started = time.perf_counter()
    storage = storage or StorageConfig()
    # decode_in_worker: the raw rows go to the worker, which decodes them (pipeline.training.inputs)
    inputs = dataset if cfg.decode_in_worker else model_inputs(dataset, cfg.model, cfg.augment,
                                                                cpus=cfg.data_cpus)
    loop_config = {
        "name": name, "label": label or name, "train": cfg, "end_samples": end_samples,
        "schedule_total": schedule_total,
        "threads": cfg.threads_per_worker if threads is None else threads,
        "init_checkpoint": init_checkpoint, "storage": dataclasses.asdict(storage),
        "crash_at_step": crash_at_step, "order_seed": cfg.seed if order_seed is None else order_seed,
    }
    remote = is_remote(storage_path)
    fs, path = filesystem(storage_path, storage)
    # Each start of the worker group leaves a file here (train_loop._record_start).
    starts_uri = f"{storage_path.rstrip('/')}/{name}/{STARTS}/{uuid.uuid4().hex[:12]}"
    loop_config["starts_uri"] = starts_uri
    # The run's own folder: a resume whose latest checkpoint is damaged looks here for an older one.
    loop_config["run_uri"] = f"{storage_path.rstrip('/')}/{name}"
    # Training curves, beside the checkpoints (train_loop's docstring says why there).
    loop_config["tensorboard_uri"] = f"{storage_path.rstrip('/')}/{name}/tensorboard"
    # A trainer per attempt (``_fit_relaunching``): the same RunConfig(name, storage_path)
    # resumes the run where the last attempt left its checkpoints.
    def build():
        return trainer_class(
            _train_worker,
            train_loop_config=loop_config,
            scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                         resources_per_worker=worker_resources(cfg)),
            run_config=RunConfig(
                name=name,
                storage_path=path if remote else storage_path,
                storage_filesystem=pyarrow_filesystem(fs) if remote else None,
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                failure_config=FailureConfig(max_failures=cfg.max_failures),
            ),
            datasets={"train": inputs},
            # One worker takes the whole dataset: Ray Data then runs it in the worker, as a plain
            # iterator, instead of starting a split coordinator actor for it (a Python process per
            # run: about 4 s of CPU, and seconds before the first batch).
            dataset_config=DataConfig(datasets_to_split="all" if cfg.num_workers > 1 else []),
        )

    result = _fit_relaunching(build, cfg.max_relaunches, label or name,
                              lambda: _newest(fs, f"{path.rstrip('/')}/{name}"),
                              lambda: _release(_starts(starts_uri, storage)))
    if result.checkpoint is None:
        raise RuntimeError(f"{name}: training ended without a checkpoint")
    _prune(fs, f"{path.rstrip('/')}/{name}", cfg.keep_checkpoints, result.checkpoint.path)
    done = result.return_value
    return TrainResult(
        name=name, checkpoint=scheme(storage_path) + result.checkpoint.path,
        step=int(result.metrics["step"]), samples_seen=int(result.metrics["samples_seen"]),
        start_step=done["start_step"], start_samples=done["start_samples"],
        steps_run=done["steps_run"], history=done["history"],
        wall_s=time.perf_counter() - started, cached_rows=done["cached_rows"], fed=done.get("fed"),
        first_step_s=done.get("first_step_s"), first_batches=done.get("first_batches"),
        starts=tuple(_starts(starts_uri, storage)))


# ----------------------------------------------------------------------------- relaunching


def _fit_relaunching(build: Callable[[], Any], relaunches: int, label: str,
                     newest: Callable[[], str | None],
                     release: Callable[[], int] = lambda: 0) -> Any:
    """``build().fit()``, built and fitted again, up to ``relaunches`` times, after a process of
    the run died (``died``). The same ``RunConfig(name, storage_path)`` resumes the run from its
    newest whole checkpoint; an error of the run's own is raised at once. After a death the
    dead attempt's resources are released first (``release``: its placement groups)."""
    for attempt in range(relaunches + 1):
        try:
            return build().fit()
        except Exception as e:
            cause = died(e)
            if cause is not None:
                released = release()
                if released:
                    console.say(f"[{label}] released {released} placement group(s) of the "
                                "dead attempt")
            if cause is None or attempt == relaunches:
                if cause is not None:
                    console.say(f"[{label}] {cause}, after {relaunches} relaunch(es) "
                                "(train.max_relaunches): failed")
                raise
            where = newest()
            console.say(f"[{label}] relaunch {attempt + 1} of {relaunches} (train.max_relaunches): "
                        f"{cause}; resuming from "
                        f"{where.rsplit('/', 1)[-1] if where else 'its start (no checkpoint yet)'}")
    raise AssertionError("unreachable")


def _release(starts: list[dict]) -> int:
    """Remove the placement groups of a run's worker groups that are still held; returns how many.

    A placement group outlives the Ray Train controller that made it (it belongs to the job).
    Ray Train's placement-group cleaner removes it when the controller dies, but it asks the
    state API whether the controller lives, which a Ray without its dashboard (a local Ray,
    ``init_ray``) does not answer, and it may be what died. Called when every attempt of the run
    has ended, so none of these groups is in use."""
    released = 0
    for start in starts:
        pg_id = start.get("placement_group")
        if not pg_id:
            continue
        group = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id)))
        if placement_group_table(group).get("state") in ("CREATED", "PENDING", "RESCHEDULING"):
            remove_placement_group(group)
            released += 1
    return released


def _newest(fs, run_path: str) -> str | None:
    found = list_checkpoints(fs, run_path)
    return found[-1] if found else None


def _prune(fs, run_path: str, keep: int, result: str) -> None:
    """Keep the newest ``keep`` checkpoints of a finished run. Ray Train deletes the ones it
    registered; a checkpoint written by a worker that died before its report was taken in was
    never registered, though a restart resumed from it (``train_loop._resume``). The run's
    result checkpoint, ``result``, is never deleted."""
    for old in list_checkpoints(fs, run_path)[:-keep]:
        if old.rstrip("/") != result.rstrip("/"):
            fs.rm(old, recursive=True)


def _starts(uri: str, storage: StorageConfig) -> list[dict]:
    fs, path = filesystem(uri, storage)
    fs.invalidate_cache(path)   # the workers wrote there through handles of their own
    if not fs.exists(path):
        return []
    return [json.loads(fs.cat_file(p)) for p in sorted(fs.ls(path, detail=False))]
