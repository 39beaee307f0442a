"""Train one CLIP on Ray Train: the seed, each data expert and the dense baseline.

One loop for all of them. A run is named; its checkpoints live in
``<run dir>/checkpoints/<name>/`` (local or S3), and rerunning the same name resumes from the
latest one: resuming is rerunning. A new run may start from another run's checkpoint
(``init_checkpoint``: an expert starts from the seed's model and optimizer), continuing its
``samples_seen`` and so the learning-rate schedule where the seed stopped.

The schedule is measured in samples seen, not steps or epochs, over the whole MoDE budget
(``TrainConfig.total_samples``): linear warmup, then a cosine to zero. A run trains until its
``end_samples``: the seed stops at ``seed_fraction * total_samples`` and each expert continues
to ``total_samples`` on its own data (MODE.md, stage 6).

Checkpoint directory (one per saved step, ``step_XXXXXXXX``)::

    checkpoint.pt   torch.save of a dict of tensors and plain numbers (loads with
                    weights_only=True): model, optimizer, scaler, step, samples_seen, model_name
    log.json        the run's log lines so far (step, samples_seen, loss, lr, samples_per_s,
                    data_wait)

Data: rows ``{caption: str, image: encoded bytes}`` (ingest's row schema; other columns are
ignored) are decoded, transformed and tokenized in Ray Data ``map_batches`` tasks with
open_clip's own image transform and tokenizer, then streamed to the workers by
``get_dataset_shard("train").iter_torch_batches``, once per epoch. With
``TrainConfig.cache_inputs`` only the first epoch streams: each worker keeps the tensors of its
shard in memory and later epochs draw seeded permutations of them, which removes the per-epoch
start of a Ray Data execution and every decode after the first (for data that fits in the
workers' memory, like the demo's). A resumed run starts a fresh pass over the data; its step and
samples_seen continue from the checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import ray
import ray.train
import torch
from open_clip.loss import ClipLoss
from PIL import Image
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from pipeline.config import StorageConfig, TrainConfig
from pipeline.model import create, tools
from pipeline.rundir import RunDir
from pipeline.storage import filesystem, is_s3, join, pyarrow_filesystem

# CLIP (Radford et al. 2021) and open_clip's ViT recipe: beta2 0.98 and eps 1e-6 keep the
# contrastive loss stable at large batch.
ADAMW_BETAS = (0.9, 0.98)
ADAMW_EPS = 1e-6
# CLIP clamps its learned temperature so that logits stay below 100 (open_clip does the same).
MAX_LOGIT_SCALE = math.log(100)
CHECKPOINT_FILE = "checkpoint.pt"
LOG_FILE = "log.json"


# ----------------------------------------------------------------------------- pure helpers
def lr_at(samples_seen: int, peak_lr: float, warmup_samples: int, total_samples: int) -> float:
    """Learning rate of the step that brings the model to ``samples_seen`` samples.

    Linear warmup from 0 to ``peak_lr`` over ``warmup_samples``, then a cosine from ``peak_lr``
    to 0 at ``total_samples`` (and 0 beyond). It depends on nothing but the samples seen, so an
    expert started from the seed's checkpoint continues the seed's schedule exactly.
    """
    if samples_seen < warmup_samples:
        return peak_lr * samples_seen / warmup_samples
    if samples_seen >= total_samples:
        return 0.0
    progress = (samples_seen - warmup_samples) / (total_samples - warmup_samples)
    return 0.5 * peak_lr * (1.0 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices (linear, conv, embedding weights) only; gains, biases, the
    class embedding and the logit scale are not decayed (open_clip's rule)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=ADAMW_BETAS,
                             eps=ADAMW_EPS)


def format_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


# ----------------------------------------------------------------------------- data
class Preprocess:
    """Rows ``{caption, image bytes}`` to model inputs with open_clip's transform and tokenizer.

    Returns ``{"image": float32 (N, 3, H, W), "text": int64 (N, context_length)}``. A row whose
    image does not decode or whose caption is missing raises: training data must come from
    ingest's good rows.
    """

    def __init__(self, model_name: str, augment: bool = False) -> None:
        preprocess_train, preprocess_val, self.tokenizer = tools(model_name)
        self.transform = preprocess_train if augment else preprocess_val

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys = batch["key"] if "key" in batch else np.arange(len(batch["caption"]))
        for column in ("caption", "image"):
            missing = [i for i, v in enumerate(batch[column]) if v is None or len(v) == 0]
            if missing:
                raise ValueError(f"{len(missing)} rows without {column} (keys "
                                 f"{keys[missing[:5]].tolist()}): train on ingest's good rows")
        images = np.stack([self._image(b, k) for b, k in zip(batch["image"], keys.tolist(), strict=True)])
        return {"image": images, "text": self.tokenizer(list(batch["caption"])).numpy()}

    def _image(self, data: bytes, key: Any) -> np.ndarray:
        try:
            with Image.open(io.BytesIO(data)) as im:
                return self.transform(im.convert("RGB")).numpy()
        except OSError as e:  # PIL's UnidentifiedImageError and truncated files
            raise ValueError(f"image of key {key!r} does not decode ({e}): train on ingest's "
                             f"good rows") from e


@functools.cache
def _preprocessor(model_name: str, augment: bool) -> Preprocess:
    return Preprocess(model_name, augment)


def preprocess_batch(batch: dict[str, np.ndarray], model_name: str,
                     augment: bool) -> dict[str, np.ndarray]:
    """``Preprocess`` as a Ray Data task function: one ``Preprocess`` per worker process, built
    on first use. Tasks (not an actor pool) so the step fuses with the read and scales with
    whatever CPUs the Train workers leave free."""
    return _preprocessor(model_name, augment)(batch)


def training_data(ds: ray.data.Dataset, model_name: str, augment: bool,
                  rows_per_batch: int = 256) -> ray.data.Dataset:
    """The model inputs of ``ds``'s rows, decoded and tokenized lazily in ``map_batches``."""
    return ds.map_batches(preprocess_batch, batch_format="numpy", batch_size=rows_per_batch,
                          fn_kwargs={"model_name": model_name, "augment": augment})


# ----------------------------------------------------------------------------- checkpoints
def read_checkpoint(uri: str, storage: StorageConfig) -> dict[str, Any]:
    """Load ``checkpoint.pt`` from a checkpoint directory (or the file itself), local or S3."""
    path_uri = uri if uri.endswith(".pt") else uri.rstrip("/") + "/" + CHECKPOINT_FILE
    fs, path = filesystem(path_uri, storage)
    with fs.open(path, "rb") as f:
        data = f.read()
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def load_model(uri: str, storage: StorageConfig) -> tuple[torch.nn.Module, Callable, Callable]:
    """A trained model in eval mode, with its validation transform and tokenizer."""
    state = read_checkpoint(uri, storage)
    model, _, preprocess_val, tokenizer = create(state["model_name"])
    model.load_state_dict(state["model"])
    return model.eval(), preprocess_val, tokenizer


def _checkpoint_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                      scaler: torch.amp.GradScaler, step: int, samples_seen: int,
                      model_name: str) -> dict[str, Any]:
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(), "step": step, "samples_seen": samples_seen,
            "model_name": model_name}


# ----------------------------------------------------------------------------- the loop
def _streamed_batches(shard, cfg: TrainConfig, local_batch: int, device: torch.device,
                      step: int):
    """One pass over this worker's Ray Data shard. With ``cache_inputs`` the last partial
    batch comes too (it is cached; the loop does not train on it)."""
    return iter(shard.iter_torch_batches(
        batch_size=local_batch, drop_last=not cfg.cache_inputs, device=device,
        dtypes={"image": torch.float32, "text": torch.long},
        local_shuffle_buffer_size=cfg.shuffle_buffer or None,
        local_shuffle_seed=(cfg.seed * 1_000_003 + step) if cfg.shuffle_buffer else None))


def _cached_batches(cache: dict[str, torch.Tensor], local_batch: int, device: torch.device,
                    seed: int, rank: int, epoch: int):
    """Full batches of a seeded permutation of the cached rows (one epoch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + rank * 10_007 + epoch)
    order = torch.randperm(len(cache["text"]), generator=g)
    for start in range(0, len(order) - local_batch + 1, local_batch):
        idx = order[start:start + local_batch]
        yield {k: v[idx].to(device) for k, v in cache.items()}


def _autocast(precision: str, device: torch.device):
    if device.type != "cuda" or precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "amp_bf16" else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train worker function. ``config`` (built by ``train``): ``name``, ``train`` (the
    TrainConfig as a dict), ``end_samples``, ``init_checkpoint``, ``storage``, ``crash_at_step``.

    Returns (rank 0; becomes ``Result.return_value``) what this attempt did: its start step and
    samples, the steps it ran and the run's log lines.
    """
    cfg = TrainConfig(**config["train"])
    name, end_samples = config["name"], config["end_samples"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if cfg.threads_per_worker:
        torch.set_num_threads(cfg.threads_per_worker)
    torch.manual_seed(cfg.seed)
    device = ray.train.torch.get_device()

    model, *_ = create(cfg.model)
    state, history = None, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, CHECKPOINT_FILE), map_location="cpu",
                               weights_only=True)
            with open(os.path.join(d, LOG_FILE)) as f:
                history = json.load(f)
    elif config["init_checkpoint"]:
        state = read_checkpoint(config["init_checkpoint"], StorageConfig(**config["storage"]))
    if state is not None:
        if state["model_name"] != cfg.model:
            raise ValueError(f"{name}: checkpoint holds a {state['model_name']!r} model but "
                             f"train.model is {cfg.model!r}")
        model.load_state_dict(state["model"])
    model = ray.train.torch.prepare_model(model)
    core = model.module if hasattr(model, "module") else model
    optimizer = make_optimizer(core, cfg.lr, cfg.weight_decay)
    use_scaler = device.type == "cuda" and cfg.precision == "amp"
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    step = samples_seen = 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        step, samples_seen = int(state["step"]), int(state["samples_seen"])
        del state
    start_step, start_samples = step, samples_seen
    if checkpoint is None and samples_seen >= end_samples:
        raise ValueError(f"{name}: the init checkpoint has seen {samples_seen:,} samples already, "
                         f"not fewer than end_samples = {end_samples:,}")

    # local_loss + gather_with_grad: each rank scores its own rows against the whole global
    # batch and gradients flow through the gather (open_clip's multi-GPU recommendation).
    loss_fn = ClipLoss(local_loss=world > 1, gather_with_grad=world > 1, cache_labels=True,
                       rank=rank, world_size=world)
    shard = ray.train.get_dataset_shard("train")
    local_batch = cfg.batch_size // world

    def say(text: str) -> None:
        if rank == 0:
            print(f"[train {name}] {text}", flush=True)

    def save() -> None:
        metrics = {"step": step, "samples_seen": samples_seen,
                   "loss": history[-1]["loss"] if history else float("nan")}
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                torch.save(_checkpoint_state(core, optimizer, scaler, step, samples_seen, cfg.model),
                           os.path.join(tmp, CHECKPOINT_FILE))
                with open(os.path.join(tmp, LOG_FILE), "w") as f:
                    json.dump(history, f)
                ckpt = Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"step_{step:08d}")

    if checkpoint is not None:
        origin = "resumed from its latest checkpoint"
    else:
        origin = f"initialised from {config['init_checkpoint']}" if config["init_checkpoint"] else "fresh"
    say(f"{origin}: step {step}, {samples_seen:,} samples seen; training to {end_samples:,} "
        f"on {world} worker(s), {local_batch} samples each per step, device {device}")
    loss_sum = torch.zeros((), device=device)
    loss_steps, window_start, window_samples, epoch = 0, time.perf_counter(), 0, 0
    data_wait = 0.0  # seconds of the window spent waiting for the next batch
    cache: dict[str, torch.Tensor] | None = None   # this worker's whole shard (cache_inputs)
    done = samples_seen >= end_samples
    while samples_seen < end_samples:
        epoch_steps = 0
        if cache is None:
            batches = _streamed_batches(shard, cfg, local_batch, device, step)
        else:
            batches = _cached_batches(cache, local_batch, device, cfg.seed, rank, epoch)
        kept: list[dict[str, torch.Tensor]] = []
        while True:
            waited = time.perf_counter()
            batch = next(batches, None)
            data_wait += time.perf_counter() - waited
            if batch is None:
                break
            if cfg.cache_inputs and cache is None:
                kept.append({k: v.cpu() for k, v in batch.items()})
            if len(batch["text"]) < local_batch:
                continue  # the stream's last, partial batch: cached, not trained on
            lr = lr_at(samples_seen + cfg.batch_size, cfg.lr, cfg.warmup_samples,
                       cfg.total_samples)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with _autocast(cfg.precision, device):
                image_features, text_features, logit_scale = model(batch["image"], batch["text"])
                loss = loss_fn(image_features, text_features, logit_scale)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            with torch.no_grad():
                core.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
            step += 1
            epoch_steps += 1
            samples_seen += cfg.batch_size
            window_samples += cfg.batch_size
            loss_sum += loss.detach()
            loss_steps += 1
            done = samples_seen >= end_samples
            if step % cfg.log_every_steps == 0 or done:
                elapsed = time.perf_counter() - window_start
                rate = window_samples / elapsed if elapsed > 0 else float("nan")
                line = {"step": step, "samples_seen": samples_seen,
                        "loss": float(loss_sum.item() / loss_steps), "lr": lr,
                        "samples_per_s": rate, "data_wait": data_wait / elapsed}
                history.append(line)
                eta = max(0, end_samples - samples_seen) / rate if rate > 0 else float("inf")
                say(f"step {step} samples {samples_seen:,}/{end_samples:,} (epoch {epoch}) "
                    f"loss {line['loss']:.4f} lr {lr:.3g} {rate:,.0f} samples/s "
                    f"(waiting for data {line['data_wait']:.0%}) ETA {format_seconds(eta)}")
                loss_sum.zero_()
                loss_steps, window_start, window_samples, data_wait = 0, time.perf_counter(), 0, 0.0
            if step % cfg.checkpoint_every_steps == 0 or done:
                saving = time.perf_counter()
                save()
                # Checkpoint time is not training time: keep it out of samples/s.
                window_start += time.perf_counter() - saving
            if step == config["crash_at_step"]:
                raise RuntimeError(f"{name}: crash_at_step={step} (simulated failure)")
            if done:
                break
        if epoch_steps == 0 and not done:
            raise RuntimeError(f"{name}: the dataset yields no full batch of {local_batch} rows "
                               f"per worker; it cannot train to {end_samples:,} samples")
        if cfg.cache_inputs and cache is None and not done:
            cache = {k: torch.cat([b[k] for b in kept]) for k in ("image", "text")}
            say(f"cached {len(cache['text']):,} rows of model inputs in memory for later epochs")
        epoch += 1
    return {"start_step": start_step, "start_samples": start_samples,
            "steps_run": step - start_step, "history": history,
            "cached_rows": len(cache["text"]) if cache is not None else 0}


# ----------------------------------------------------------------------------- entry point
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


def checkpoint_root(run: RunDir) -> str:
    """Where Ray Train keeps every run's checkpoints: ``<run dir>/checkpoints``."""
    return run.stage_path("checkpoints")


def train(name: str, dataset: ray.data.Dataset, cfg: TrainConfig, run: RunDir, end_samples: int,
          init_checkpoint: str | None = None, storage: StorageConfig | None = None,
          crash_at_step: int | None = None) -> TrainResult:
    """Train (or resume) the run ``name`` until ``end_samples`` samples seen in total.

    Rerunning a name resumes from its latest checkpoint; a run already at ``end_samples``
    trains no further (Ray Train still starts, ~15 s). Without a checkpoint of its own, the run
    starts from ``init_checkpoint`` (a checkpoint directory URI, e.g. the seed's final one:
    model, optimizer, step and samples_seen carry over) or from a fresh model seeded by
    ``cfg.seed``.

    Args:
        name: the run's name: its checkpoints go to ``<run dir>/checkpoints/<name>/``.
        dataset: rows with ``caption`` (str) and ``image`` (encoded bytes), e.g. ingest's good
            rows; it is passed over repeatedly, one epoch after another, until ``end_samples``.
        cfg: the ``train`` config section.
        run: the run directory (local or S3).
        end_samples: absolute samples_seen at which the run stops (a multiple of the batch is
            reached exactly; otherwise the last step overshoots by less than a batch).
        init_checkpoint: checkpoint to start from when the run has none of its own.
        storage: S3 endpoint and region for ``init_checkpoint``; defaults to none.
        crash_at_step: tests only: raise after this step, like a node lost mid-run.
    """
    if end_samples > cfg.total_samples:
        raise ValueError(f"{name}: end_samples {end_samples:,} is past the schedule's end "
                         f"(train.total_samples = {cfg.total_samples:,})")
    started = time.perf_counter()
    storage = storage or StorageConfig()
    inputs = training_data(dataset, cfg.model, cfg.augment)
    loop_config = {
        "name": name, "train": dataclasses.asdict(cfg), "end_samples": end_samples,
        "init_checkpoint": init_checkpoint, "storage": dataclasses.asdict(storage),
        "crash_at_step": crash_at_step,
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(
            name=name,
            storage_path=checkpoint_root(run),
            storage_filesystem=pyarrow_filesystem(run.fs) if is_s3(run.uri) else None,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
        ),
        datasets={"train": inputs},
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"{name}: training ended without a checkpoint")
    done = result.return_value
    scheme = "s3://" if is_s3(run.uri) else ""
    return TrainResult(
        name=name, checkpoint=scheme + result.checkpoint.path,
        step=int(result.metrics["step"]), samples_seen=int(result.metrics["samples_seen"]),
        start_step=done["start_step"], start_samples=done["start_samples"],
        steps_run=done["steps_run"], history=done["history"],
        wall_s=time.perf_counter() - started, cached_rows=done["cached_rows"])


def run_checkpoints(run: RunDir, name: str) -> list[str]:
    """URIs of the checkpoint directories a run has kept, oldest first."""
    root = join(checkpoint_root(run), name)
    run.fs.invalidate_cache(root)  # Ray Train wrote there through its own handle: no stale listing
    if not run.fs.exists(root):
        return []
    scheme = "s3://" if is_s3(run.uri) else ""
    found = [p for p in run.fs.ls(root, detail=False) if p.rstrip("/").split("/")[-1].startswith("step_")]
    return [scheme + p.rstrip("/") for p in sorted(found)]

