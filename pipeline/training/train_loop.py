"""The Ray Train worker side of ``pipeline.training.train``: the training loop and its optimiser.

Only Ray Train workers import this module (``pipeline.training.train`` hands Ray Train a small wrapper
that imports it on the worker). It imports torch, open_clip and ``ray.train.torch``, about 8 s
of CPU in a fresh process; keeping them out of ``pipeline.training.train`` keeps them out of the
processes that only unpickle a run's functions: Ray Train's controller, Ray Data's split
coordinator and dataset manager, the launcher's tasks (docs/benchmarks.md, "Training runs on 2
cores").
The loop itself, its data and its checkpoints are described in ``pipeline.training.train``.

Rank 0 also writes the run's log lines as TensorBoard scalars (``train/loss``, ``train/lr``,
``train/samples_per_s``, ``train/data_wait``, against samples seen). They go to
the run's checkpoint folder (``<storage_path>/<name>/tensorboard/``), in the same storage, so
that one ``tensorboard --logdir <run dir>/checkpoints`` shows every run of a local or a cluster
run (S3 included) with no other place to configure or collect. Each worker group writes a file
of its own there (``Events``); TensorBoard merges the files of a folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
from open_clip.loss import ClipLoss
from ray.train import Checkpoint
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto.event_pb2 import Event
from tensorboardX.summary import scalar

from pipeline.core import console, faults
from pipeline.core.config import StorageConfig, TrainConfig
from pipeline.core.console import format_seconds
from pipeline.core.storage import filesystem
from pipeline.training.checkpoint_io import (
    DamagedCheckpoint,
    list_checkpoints,
    load_dir,
    read_checkpoint,
    step_dir_name,
    write_dir,
)
from pipeline.training.inputs import DeviceNormalize, preprocessor
from pipeline.training.model import create
from pipeline.training.schedule import lr_at

# CLIP (Radford et al. 2021) and open_clip's ViT recipe: beta2 0.98 and eps 1e-6 keep the
# contrastive loss stable at large batch.
ADAMW_BETAS = (0.9, 0.98)
ADAMW_EPS = 1e-6
# CLIP clamps its learned temperature so that logits stay below 100 (open_clip does the same).
MAX_LOGIT_SCALE = math.log(100)
# Batches of its first pass whose expert mix a run records: a stream that hands on one expert at
# a time shows in every one of them, and twenty numbers keep the registry entry small.
FIRST_BATCHES = 20


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices (linear, conv, embedding weights) only; gains, biases, the
    class embedding and the logit scale are not decayed (open_clip's rule)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


# PyTorch's fused AdamW: one kernel over all parameters instead of about ten small operations
# per tensor. Without it, the tiny demo model's optimiser step took 44 ms of its ~500 ms step
# on one CPU thread; fused, 8 ms. The same update (tests/test_train.py).
FUSED_DEVICES = ("cpu", "cuda")


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    fused = all(p.device.type in FUSED_DEVICES for p in model.parameters())
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=ADAMW_BETAS,
                             eps=ADAMW_EPS, fused=fused or None)


def _checkpoint_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                      scaler: torch.amp.GradScaler, step: int, samples_seen: int,
                      model_name: str) -> dict[str, Any]:
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(), "step": step, "samples_seen": samples_seen,
            "model_name": model_name}


# ----------------------------------------------------------------------------- the loop
def _streamed_batches(shard, cfg: TrainConfig, local_batch: int, device: torch.device,
                      step: int, seed: int):
    """One pass over this worker's Ray Data shard, through a local shuffle buffer seeded by the
    run's order ``seed`` and the step it starts at. The last partial batch comes too: the loop
    counts its keys and caches it (``cache_inputs``) but does not train on it. With
    ``decode_in_worker`` the shard holds raw rows, decoded here (``pipeline.training.inputs``)."""
    order = {"batch_size": local_batch, "drop_last": False,
             "local_shuffle_buffer_size": cfg.shuffle_buffer or None,
             "local_shuffle_seed": (seed * 1_000_003 + step) if cfg.shuffle_buffer else None}
    cuda = device.type == "cuda"
    if not cfg.decode_in_worker:
        # Ray Data gathers the next batches in a background thread (prefetch_batches) into
        # pinned memory and starts their non-blocking copy to the device there, so the step
        # never waits on the host side (docs/training.md).
        return iter(shard.iter_torch_batches(device=device, **order, pin_memory=cuda,
                                             prefetch_batches=cfg.prefetch_batches,
                                             dtypes={"image": torch.uint8, "text": torch.long,
                                                     "key_hash": torch.long, "expert_id": torch.long}))
    preprocess = preprocessor(cfg.model, cfg.augment)
    return ({k: torch.from_numpy(v).to(device, non_blocking=cuda) for k, v in preprocess(rows).items()}
            for rows in shard.iter_batches(batch_format="numpy", **order))


def _cached_batches(cache: dict[str, torch.Tensor], local_batch: int, device: torch.device,
                    seed: int, rank: int, epoch: int):
    """Full batches of a seeded permutation of the cached rows (one epoch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + rank * 10_007 + epoch)
    order = torch.randperm(len(cache["text"]), generator=g).to(cache["text"].device)
    for start in range(0, len(order) - local_batch + 1, local_batch):
        idx = order[start:start + local_batch]
        yield {k: v[idx].to(device, non_blocking=True) for k, v in cache.items()}


def batch_mix(experts: torch.Tensor) -> tuple[float, int]:
    """The largest share of a batch that one expert's rows take, and that expert (the lowest
    id of a tie)."""
    ids, counts = torch.unique(experts.cpu(), return_counts=True)
    top = int(torch.argmax(counts))
    return counts[top].item() / len(experts), int(ids[top])


def _keep_cache(kept: list[dict[str, torch.Tensor]], device: torch.device) -> dict[str, torch.Tensor]:
    """The first epoch's batches as one tensor per column: on the training device when they
    take less than a quarter of its free memory (no copy per step), else in host memory."""
    cache = {k: torch.cat([b[k] for b in kept]) for k in ("image", "text")}
    if device.type == "cuda":
        size = sum(v.numel() * v.element_size() for v in cache.values())
        if size < torch.cuda.mem_get_info(device)[0] / 4:
            cache = {k: v.to(device) for k, v in cache.items()}
    return cache


def _autocast(precision: str, device: torch.device):
    if device.type != "cuda" or precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "amp_bf16" else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def clip_loss(rank: int, world: int) -> ClipLoss:
    """open_clip's contrastive loss for one of ``world`` data-parallel ranks: local_loss +
    gather_with_grad, open_clip's multi-GPU recommendation. Each rank scores its own rows
    against the whole global batch and gradients flow back through the gather, so the ranks'
    mean loss and DDP's mean gradient are those of one worker on the whole batch
    (tests/test_train.py runs two gloo workers against one)."""
    return ClipLoss(local_loss=world > 1, gather_with_grad=world > 1, cache_labels=True,
                    rank=rank, world_size=world)


def train_step(model: torch.nn.Module, loss_fn: ClipLoss, images: torch.Tensor,
               texts: torch.Tensor, scaler: torch.amp.GradScaler,
               autocast: Callable[[], contextlib.AbstractContextManager],
               accum_steps: int = 1,
               no_sync: Callable[[], contextlib.AbstractContextManager] | None = None
               ) -> torch.Tensor:
    """The gradients of one optimiser step on a batch: open_clip's contrastive loss over the
    whole batch, backpropagated (through ``scaler``). Returns the loss, detached.

    Args:
        model: the CLIP (DDP-wrapped or compiled is fine); ``images`` are normalised.
        autocast: a fresh autocast context per use (``_autocast``).
        accum_steps: split the batch into this many micro-batches, as open_clip's trainer does
            (its ``accum_freq``): first the features of every micro-batch without gradients,
            then each micro-batch again with gradients, its live features put in place of its
            cached ones. Every micro-batch's loss still has the whole batch as negatives, so
            the summed gradients are the whole batch's (tests/test_train.py), in one
            micro-batch's activation memory. The temperature's gradient is taken once, in the
            first micro-batch: every pass's loss depends on it the same way.
        no_sync: DDP's ``no_sync`` (gradients all-reduced once, after the last micro-batch).
    """
    if accum_steps == 1:
        with autocast():
            loss = loss_fn(*model(images, texts))
        scaler.scale(loss).backward()
        return loss.detach()
    image_parts, text_parts = images.chunk(accum_steps), texts.chunk(accum_steps)
    with torch.no_grad(), autocast():
        cached = [model(i, t)[:2] for i, t in zip(image_parts, text_parts, strict=True)]
    for j in range(accum_steps):
        last = j == accum_steps - 1
        with (contextlib.nullcontext() if last or no_sync is None else no_sync()), autocast():
            image_j, text_j, scale = model(image_parts[j], text_parts[j])
            image_all = torch.cat([c[0] for c in cached[:j]] + [image_j] + [c[0] for c in cached[j + 1:]])
            text_all = torch.cat([c[1] for c in cached[:j]] + [text_j] + [c[1] for c in cached[j + 1:]])
            loss = loss_fn(image_all, text_all, scale if j == 0 else scale.detach())
            scaler.scale(loss).backward()
    return loss.detach()


def _own_checkpoints(config: dict[str, Any]) -> bool:
    """Whether the run's folder holds checkpoints of its own (``run_uri``: absent for a loop
    called outside ``train.train``)."""
    if not config.get("run_uri"):
        return False
    fs, run_path = filesystem(config["run_uri"], StorageConfig(**config["storage"]))
    return bool(list_checkpoints(fs, run_path))


def _resume(checkpoint: Checkpoint | None, config: dict[str, Any],
            rank: int) -> tuple[dict, list, bool]:
    """The state and log lines of the run's newest intact checkpoint in its folder, and whether
    it is Ray Train's latest registered one (``checkpoint``; None when Ray Train has none: a run
    relaunched after its worker or controller died before the first report was taken in).

    Usually that is Ray Train's latest registered checkpoint. Two cases differ, both after a
    worker died (docs/bad_input.md, "Killed workers and damaged checkpoints"):

    - a newer one: the worker wrote it, then died (SIGKILL, OOM, a lost node) before Ray Train's
      controller took in its report. It is whole, and it is what the run's TensorBoard events
      were last copied with; resuming from the registered one would redo those steps and log
      them twice;
    - the registered one damaged: cut short by a crash during its upload, or not loadable. The
      next older intact one is used.

    Raises ``DamagedCheckpoint`` when no checkpoint in the folder is intact.
    """
    label = config.get("label", config["name"])
    fs, run_path = filesystem(config["run_uri"], StorageConfig(**config["storage"]))
    registered = checkpoint.path.rstrip("/").rsplit("/", 1)[-1] if checkpoint is not None else ""
    problems = []
    for path in reversed(list_checkpoints(fs, run_path)):
        name = path.rsplit("/", 1)[-1]
        try:
            found = load_dir(fs, path)
        except DamagedCheckpoint as e:
            problems.append(str(e))
            continue
        if rank == 0 and name != registered:
            if not registered:
                why = "Ray Train took in none of the run's checkpoints (its worker or its " \
                      "controller died before the first report was taken in)"
            elif name > registered:
                why = f"newer than Ray Train's latest registered one, {registered} (the worker " \
                      "died before its report was taken in)"
            else:
                why = f"the later ones are damaged: {'; '.join(problems)}"
            console.say(f"[{label}] resuming from {name}: {why}")
        return (*found, name == registered)
    raise DamagedCheckpoint(f"{config['name']}: no intact checkpoint to resume from in "
                            f"{config['run_uri']} ({'; '.join(problems) or 'none found'})")


def _record_start(uri: str, storage: dict[str, Any], step: int) -> None:
    """One small file per start of the worker group (``pipeline.training.train.train`` counts them):
    the node rank 0 started on, from which step, where it imported ``pipeline`` from (a job's
    working directory on a cluster, docs/cluster.md) and the worker group's placement group
    (released by the launcher when the run's controller died: ``train._release``)."""
    fs, path = filesystem(uri, StorageConfig(**storage))
    node = ray.get_runtime_context().get_node_id()
    group = ray.util.get_current_placement_group()   # the worker group's, for the launcher
    fs.makedirs(path, exist_ok=True)
    with fs.open(f"{path}/{time.time_ns()}-{node[:12]}.json", "w") as f:
        json.dump({"node_id": node, "step": step, "time": time.time(), "pid": os.getpid(),
                   "pipeline": os.path.dirname(console.__file__),
                   "placement_group": group.id.hex() if group is not None else None}, f)


class Events:
    """Rank 0's TensorBoard scalars: each log line's values against its samples seen.

    Written to a local temporary file (S3 cannot append) and copied to ``uri`` after each
    checkpoint, and only then: a worker group that fails later leaves no events past the step
    its successor resumes from, which TensorBoard would draw twice. The run's last step always
    saves, so the last copy holds every line. tensorboardX's synchronous writer, not its
    ``SummaryWriter``: that one's ``flush`` does not wait for the events still queued for its
    writer thread, so a copy taken after it could miss the last lines or end mid-record.
    """

    SCALARS = ("loss", "lr", "samples_per_s", "data_wait")

    def __init__(self, uri: str, storage: dict[str, Any]) -> None:
        self.uri, self.storage = uri, storage
        # An object, not mkdtemp: a failed worker's folder goes when the object does.
        self.tmp = tempfile.TemporaryDirectory(prefix="tensorboard-")
        # The file is named by the second and the host; the suffix keeps a worker group
        # restarted within that second on the same node from overwriting its predecessor's.
        self.writer = EventsWriter(os.path.join(self.tmp.name, "events"),
                                   filename_suffix=f".{uuid.uuid4().hex[:8]}")

    def add(self, line: dict[str, Any]) -> None:
        for key in self.SCALARS:
            self.writer.write_event(Event(summary=scalar(f"train/{key}", line[key]),
                                          step=line["samples_seen"], wall_time=time.time()))

    def upload(self) -> None:
        self.writer.flush()
        fs, path = filesystem(self.uri, StorageConfig(**self.storage))
        fs.makedirs(path, exist_ok=True)
        for f in os.listdir(self.tmp.name):
            fs.put_file(os.path.join(self.tmp.name, f), f"{path}/{f}")

    def close(self) -> None:
        self.writer.close()
        self.tmp.cleanup()


@dataclasses.dataclass
class Prepared:
    """A worker's model and optimiser, ready to train, and where its run stands."""
    forward: torch.nn.Module        # what a step calls: DDP-wrapped, compiled with train.compile
    core: torch.nn.Module           # the bare model, whose weights a checkpoint holds
    no_sync: Callable[[], contextlib.AbstractContextManager] | None   # DDP's, with accumulation
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    step: int
    samples_seen: int
    history: list[dict]             # the run's log lines so far (a resumed run's included)
    resumed: bool                   # from a checkpoint of the run's own
    registered: bool                # ... that Ray Train took in (``_resume``)


def _prepare(config: dict[str, Any], cfg: TrainConfig, device: torch.device, rank: int) -> Prepared:
    """The model and optimiser of a run: resumed from the run's newest intact checkpoint, else
    started from ``init_checkpoint`` (model, optimiser, step, samples seen: an expert from the
    seed), else fresh; with the step's layout switches applied and wrapped for data parallel."""
    name, cfg_model = config["name"], cfg.model
    model, *_ = create(cfg_model)
    state, history, registered = None, [], True
    checkpoint = ray.train.get_checkpoint()
    resumed = checkpoint is not None or _own_checkpoints(config)
    if resumed:
        try:
            state, history, registered = _resume(checkpoint, config, rank)
        except DamagedCheckpoint:
            if checkpoint is not None:
                raise
            resumed = False     # none whole and none registered: start as if there were none
    if not resumed and config["init_checkpoint"]:
        state = read_checkpoint(config["init_checkpoint"], StorageConfig(**config["storage"]))
    if state is not None:
        if state["model_name"] != cfg_model:
            raise ValueError(f"{name}: checkpoint holds a {state['model_name']!r} model but "
                             f"train.model is {cfg_model!r}")
        model.load_state_dict(state["model"])
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    core = model.module if hasattr(model, "module") else model
    optimizer = make_optimizer(core, cfg.lr, cfg.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and cfg.precision == "amp")
    step = samples_seen = 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        step, samples_seen = int(state["step"]), int(state["samples_seen"])
    if not resumed and samples_seen >= config["end_samples"]:
        raise ValueError(f"{name}: the init checkpoint has seen {samples_seen:,} samples already, "
                         f"not fewer than end_samples = {config['end_samples']:,}")
    # torch.compile wraps the DDP model (PyTorch's advice); the checkpoint keeps core's weights.
    return Prepared(forward=torch.compile(model) if cfg.compile else model, core=core,
                    no_sync=model.no_sync if hasattr(model, "no_sync") else None,
                    optimizer=optimizer, scaler=scaler, step=step, samples_seen=samples_seen,
                    history=history, resumed=resumed, registered=registered)


class Window:
    """A log line's numbers since the previous line: the mean loss, samples/s and the share of
    the time spent waiting for data. Checkpoint writes (and torch.compile's first step) are not
    training time and are kept out."""

    def __init__(self, device: torch.device) -> None:
        self.loss = torch.zeros((), device=device)      # summed on the device: no sync per step
        self.reset()

    def reset(self) -> None:
        self.loss.zero_()
        self.steps, self.samples, self.wait = 0, 0, 0.0
        self.start = time.perf_counter()

    def waited(self, seconds: float) -> None:
        self.wait += seconds

    def add(self, loss: torch.Tensor, samples: int) -> None:
        self.loss += loss
        self.steps += 1
        self.samples += samples

    def exclude(self, seconds: float, samples: int = 0) -> None:
        self.start += seconds
        self.samples -= samples

    def line(self, step: int, samples_seen: int, lr: float) -> dict[str, Any]:
        """The log line (``TrainResult.history``'s keys); starts the next window."""
        elapsed = time.perf_counter() - self.start
        rate = self.samples / elapsed if elapsed > 0 else float("nan")
        line = {"step": step, "samples_seen": samples_seen,
                "loss": float(self.loss.item() / self.steps), "lr": lr,
                "samples_per_s": rate, "data_wait": self.wait / elapsed}
        self.reset()
        return line


class FirstPass:
    """What this worker group was fed in its first pass over its data: the rows and their keys'
    digest (``pipeline.core.keys.digest``: which samples a run trained on, docs/bad_input.md),
    whether the pass ended before training did, and on rank 0 the expert mix of its first
    ``FIRST_BATCHES`` batches (``batch_mix``) where the rows carry ``expert_id``."""

    def __init__(self, rank: int) -> None:
        self.rank, self.rows, self.digest, self.complete = rank, 0, 0, False
        self.mix: list[tuple[float, int]] = []

    def see(self, hashes: torch.Tensor | None, experts: torch.Tensor | None) -> None:
        if self.rank == 0 and experts is not None and len(self.mix) < FIRST_BATCHES:
            self.mix.append(batch_mix(experts))
        if hashes is not None:
            self.rows += len(hashes)
            self.digest = (self.digest + int(np.sum(hashes.cpu().numpy().view(np.uint64),
                                                    dtype=np.uint64))) % 2**64

    def fed(self, world: int, device: torch.device) -> dict[str, Any]:
        return _fed_keys(self.rows, self.digest, self.complete, world, device)

    def first_batches(self) -> dict[str, list] | None:
        if not self.mix:
            return None
        return {"largest_share": [m[0] for m in self.mix], "expert": [m[1] for m in self.mix]}


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train worker function. ``config`` (built by ``pipeline.training.train.train``):
    ``name``, ``label`` (its log lines' prefix and heartbeat key; default ``name``), ``train``
    (the TrainConfig, or a stage's view of it), ``end_samples``, ``schedule_total``,
    ``threads``, ``init_checkpoint``, ``storage``, ``crash_at_step`` (tests:
    ``pipeline.core.faults``), ``order_seed`` (the data order's), and optionally ``starts_uri``
    and ``tensorboard_uri`` (rank 0 writes there, ``_record_start`` and ``Events``).

    Returns (rank 0; becomes ``Result.return_value``) what this attempt did: its start step and
    samples, the steps it ran, the run's log lines, and its first pass (``FirstPass``).
    """
    cfg: TrainConfig = config["train"]
    name, end_samples, total = config["name"], config["end_samples"], config["schedule_total"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if config["threads"]:
        torch.set_num_threads(config["threads"])
    torch.manual_seed(cfg.seed)
    device = ray.train.torch.get_device()
    run = _prepare(config, cfg, device, rank)
    start_step, start_samples = run.step, run.samples_seen
    preprocess = preprocessor(cfg.model, cfg.augment)
    normalize = DeviceNormalize(preprocess.mean, preprocess.std)
    loss_fn = clip_loss(rank, world)
    shard = ray.train.get_dataset_shard("train")
    local_batch = cfg.batch_size // world
    label = config.get("label", name)

    def say(text: str) -> None:
        if rank == 0:
            console.say(f"[{label}] {text}")

    beat = console.Heartbeat(label) if rank == 0 else (lambda _step: None)
    if rank == 0 and config.get("starts_uri"):
        _record_start(config["starts_uri"], config["storage"], run.step)
    events = Events(config["tensorboard_uri"], config["storage"]) \
        if rank == 0 and config.get("tensorboard_uri") else None

    def save() -> None:
        _save(run, cfg.model, rank, events)

    if run.resumed:
        origin = "resumed from its latest checkpoint"
    else:
        origin = f"initialised from {config['init_checkpoint']}" if config["init_checkpoint"] else "fresh"
    say(f"{origin}: step {run.step}, {run.samples_seen:,} samples seen; training to {end_samples:,} "
        f"on {world} worker(s), {local_batch} samples each per step, device {device}")
    window, first_pass = Window(device), FirstPass(rank)
    first_step_s: float | None = None   # this worker group's first step, compile included
    cache: dict[str, torch.Tensor] | None = None   # this worker's whole shard (cache_inputs)
    epoch = 0
    done = run.samples_seen >= end_samples
    if done and not run.registered:
        # Resumed at the end from a checkpoint Ray Train never took in (its worker died after
        # writing it): report it now, or the run's result would be the older registered one,
        # which the final prune may already have deleted.
        say(f"already at {run.samples_seen:,} samples: registering step {run.step}'s checkpoint")
        save()
    while run.samples_seen < end_samples:
        epoch_steps = 0
        if cache is None:
            batches = _streamed_batches(shard, cfg, local_batch, device, run.step, config["order_seed"])
        else:
            batches = _cached_batches(cache, local_batch, device, config["order_seed"], rank, epoch)
        kept: list[dict[str, torch.Tensor]] = []
        while True:
            waited = time.perf_counter()
            batch = next(batches, None)
            window.waited(time.perf_counter() - waited)
            if batch is None:
                first_pass.complete = first_pass.complete or epoch == 0
                break
            hashes, experts = batch.pop("key_hash", None), batch.pop("expert_id", None)
            if epoch == 0:
                first_pass.see(hashes, experts)
            if cfg.cache_inputs and cache is None:
                kept.append({k: v.cpu() for k, v in batch.items()})
            if len(batch["text"]) < local_batch:
                continue  # the stream's last, partial batch: cached, not trained on
            lr = lr_at(run.samples_seen + cfg.batch_size, cfg.lr, cfg.warmup_samples, total)
            first = run.step == start_step
            began = time.perf_counter()
            loss = _optimizer_step(run, cfg, batch, normalize, loss_fn, device, lr)
            if first:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                first_step_s = time.perf_counter() - began
                if cfg.compile:
                    # The first step carries torch.compile's compilation: logged apart, and
                    # kept out of samples/s like a checkpoint's time.
                    window.exclude(first_step_s, cfg.batch_size)
                    say(f"first step: {first_step_s:.1f} s (torch.compile included)")
            run.step += 1
            beat(run.step)
            epoch_steps += 1
            run.samples_seen += cfg.batch_size
            window.add(loss, cfg.batch_size)
            done = run.samples_seen >= end_samples
            if run.step % cfg.log_every_steps == 0 or done:
                line = window.line(run.step, run.samples_seen, lr)
                run.history.append(line)
                if events is not None:
                    events.add(line)
                rate = line["samples_per_s"]
                eta = max(0, end_samples - run.samples_seen) / rate if rate > 0 else float("inf")
                say(f"step {run.step} samples {run.samples_seen:,}/{end_samples:,} (epoch {epoch}) "
                    f"loss {line['loss']:.4f} lr {lr:.3g} {rate:,.0f} samples/s "
                    f"(waiting for data {line['data_wait']:.0%}) ETA {format_seconds(eta)}")
            if run.step % cfg.checkpoint_every_steps == 0 or done:
                saving = time.perf_counter()
                save()
                window.exclude(time.perf_counter() - saving)
            faults.after_step(run.step, config["crash_at_step"], run.resumed, rank, say)
            if done:
                break
        if epoch_steps == 0 and not done:
            raise RuntimeError(f"{name}: the dataset yields no full batch of {local_batch} rows "
                               f"per worker; it cannot train to {end_samples:,} samples")
        if cfg.cache_inputs and cache is None and not done:
            cache = _keep_cache(kept, device)
            where = "device" if cache["text"].device.type == "cuda" else "host"
            say(f"cached {len(cache['text']):,} rows of model inputs in {where} memory for later "
                f"epochs")
        epoch += 1
    if events is not None:
        events.close()
    return {"start_step": start_step, "start_samples": start_samples,
            "steps_run": run.step - start_step, "history": run.history,
            "cached_rows": len(cache["text"]) if cache is not None else 0,
            "fed": first_pass.fed(world, device), "first_step_s": first_step_s,
            "first_batches": first_pass.first_batches()}


def _optimizer_step(run: Prepared, cfg: TrainConfig, batch: dict[str, torch.Tensor],
                    normalize: DeviceNormalize, loss_fn: ClipLoss, device: torch.device,
                    lr: float) -> torch.Tensor:
    """One optimiser step on a batch at learning rate ``lr``: images normalised on the device,
    ``train_step``'s gradients, the update, the temperature clamped as CLIP clamps it."""
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    images = normalize(batch["image"])
    if cfg.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    run.optimizer.zero_grad(set_to_none=True)
    loss = train_step(run.forward, loss_fn, images, batch["text"], run.scaler,
                      lambda: _autocast(cfg.precision, device), cfg.accum_steps, run.no_sync)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    with torch.no_grad():
        run.core.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
    return loss.detach()


def _save(run: Prepared, model_name: str, rank: int, events: Events | None) -> None:
    """Ray Train's checkpoint pattern: rank 0 writes the checkpoint to a temporary folder,
    every rank reports (rank 0 with the checkpoint); then rank 0's TensorBoard events follow."""
    metrics = {"step": run.step, "samples_seen": run.samples_seen,
               "loss": run.history[-1]["loss"] if run.history else float("nan")}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if rank == 0:
            write_dir(tmp, _checkpoint_state(run.core, run.optimizer, run.scaler, run.step,
                                             run.samples_seen, model_name), run.history)
            ckpt = Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=step_dir_name(run.step))
    if events is not None:
        events.upload()


def _fed_keys(rows: int, digest: int, complete: bool, world: int,
              device: torch.device) -> dict[str, Any]:
    """This worker group's first pass over its data, summed over its ranks (their shards are
    disjoint): rows, key digest, and whether every rank finished the pass before training
    ended (a run shorter than an epoch sees part of its data)."""
    if world > 1 and torch.distributed.is_initialized():
        signed = digest - 2**64 if digest >= 2**63 else digest     # as int64; sums wrap alike
        t = torch.tensor([rows, signed, int(complete)], dtype=torch.int64, device=device)
        torch.distributed.all_reduce(t)
        rows, digest, complete = int(t[0]), int(t[1]) % 2**64, int(t[2]) == world
    return {"rows": int(rows), "keys_digest": f"{digest:016x}", "complete": bool(complete)}
