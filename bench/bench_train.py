"""Training throughput of the Ray trainer against a bare open_clip loop.

Both sides train the same model (``mode-tiny``, seeded the same), with the same optimizer
(``make_optimizer``), schedule (``lr_at``), loss (open_clip's ``ClipLoss``), global batch, torch
thread count and data: generated demo pairs held in memory. Two measures:

- ``cached``: the demo preset's path. The Ray trainer gets encoded rows with
  ``cache_inputs``: the first epoch is decoded and tokenized in Ray Data ``map_batches`` and
  streamed through ``get_dataset_shard("train").iter_torch_batches``, later epochs permute the
  worker's cached tensors. The bare loop decodes everything once beforehand and permutes the
  tensors. Both are timed after the first epoch: the cost of the trainer itself.
- ``rows``: streamed every epoch (``cache_inputs`` off). The bare loop runs ``Preprocess``
  inline before each step in its one process; the Ray trainer runs it in Ray Data
  ``map_batches`` tasks next to the Train worker, as ``train`` does for large data.

The Ray side is ``pipeline.training.train.train`` itself with the demo preset's settings and one
worker of 0.5 CPU with a torch thread per core (local shuffle buffer), checkpointing only at the end. Both
sides time windows of LOG steps and skip the first window (start-up, first-batch latency); the
trainer's own window timing excludes checkpoint writes, so the only checkpoint (the final one) is
not counted. Ray Train's start-up (controller, worker process, imports) is shown separately as the
whole-call figure. Each side runs REPEATS times, alternating, and the fastest counts (other work
on the machine only ever slows a run down). Ray starts its workers at nice 15; both sides run at
nice 0 here. Prints a table with the 0.85 target and PASS/MISS; exits non-zero only on a crash.
Override with BENCH_TRAIN_ROWS, BENCH_TRAIN_SAMPLES, BENCH_TRAIN_REPEATS, BENCH_TRAIN_MODES.

On a GPU machine, ``BENCH_TRAIN_GPU=1 BENCH_TRAIN_MODEL=ViT-B-32 BENCH_TRAIN_BATCH=256`` runs
the same comparison on one GPU (both sides bf16 autocast, the trainer with ``use_gpu``; images
generated at BENCH_TRAIN_IMAGE pixels and resized by the model's transform) and adds the
model's training FLOPs per sample (counted by torch's FlopCounterMode on one step), the
achieved TFLOP/s and their share of the GPU's peak: the datasheet's dense bf16 figure and a
bf16 matrix product measured in the same process. Its targets: the Ray trainer at
0.95x the bare loop or more, cached at 30% of the datasheet peak or more, streamed at 0.8x
cached or more. It also times the input path both ways: PIL on the CPU against nvjpeg on the
GPU. ``BENCH_TRAIN_COMPILE=1`` turns ``train.compile`` on for both sides; the trainer's first
step, which carries the compilation, is printed apart and kept out of its samples/s.
``bench/gpu_bench.sh`` is the whole GPU run as one command (docs/training.md).

Both sides share the trainer's input path: uint8 images (decoded and resized on the CPU),
normalised on the device.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time

import numpy as np
import pyarrow as pa
import ray
import ray.data
from benchlib import print_table

from pipeline.core.config import StorageConfig, load_config
from pipeline.core.rundir import RunDir
from pipeline.data.demo_world import DOMAIN_SHARES, web_pairs

ROWS = int(os.environ.get("BENCH_TRAIN_ROWS", 4_096))
SAMPLES = int(os.environ.get("BENCH_TRAIN_SAMPLES", 25_600))
REPEATS = int(os.environ.get("BENCH_TRAIN_REPEATS", 2))
MODES = os.environ.get("BENCH_TRAIN_MODES", "cached,rows").split(",")
GPU = os.environ.get("BENCH_TRAIN_GPU", "0") == "1"
MODEL = os.environ.get("BENCH_TRAIN_MODEL")               # default: the demo preset's
BATCH = int(os.environ.get("BENCH_TRAIN_BATCH", 0))       # default: the demo preset's
IMAGE = int(os.environ.get("BENCH_TRAIN_IMAGE", 32))      # pixels of the generated images
COMPILE = os.environ.get("BENCH_TRAIN_COMPILE", "0") == "1"   # train.compile on both sides
PROFILE = os.environ.get("BENCH_TRAIN_PROFILE", "")   # GPU: write a torch profile of the bare
                                                     # cached loop there (a .txt and a trace)
# Dense bf16 tensor-core peak from NVIDIA's datasheets (SXM parts), TFLOP/s.
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}
LOG = 20                        # steps per timing window
ROWS_PER_BLOCK = 512
TARGET = 0.95 if GPU else 0.85          # Ray trainer / bare loop
GPU_SHARE_TARGET = 0.30                 # cached, of the datasheet bf16 peak
STREAMED_TARGET = 0.8                   # streamed / cached, on the GPU

def steady_rate(lines: list[dict], after_samples: int) -> float:
    """Samples/s over the windows that start after ``after_samples``, from (step, samples_seen,
    samples_per_s) log lines."""
    samples = seconds = 0.0
    for before, line in zip(lines, lines[1:], strict=False):
        if before["samples_seen"] < after_samples:
            continue
        n = line["samples_seen"] - before["samples_seen"]
        samples += n
        seconds += n / line["samples_per_s"]
    if not samples:
        raise RuntimeError(f"no timing window after {after_samples} samples: raise BENCH_TRAIN_SAMPLES")
    return samples / seconds


def bare_run(cfg, rows: dict[str, np.ndarray], tensors: dict[str, np.ndarray] | None) -> list[dict]:
    """The reference: one process, open_clip and torch only, the trainer's maths (its optimiser,
    schedule, loss and ``train_step``) and its input path (uint8 images normalised on the
    device; on a GPU the cached tensors live on it, and streamed batches are copied from pinned
    memory)."""
    import torch

    from pipeline.training.inputs import DeviceNormalize, Preprocess
    from pipeline.training.model import create
    from pipeline.training.schedule import lr_at
    from pipeline.training.train_loop import _autocast, clip_loss, make_optimizer, train_step

    torch.set_num_threads(cfg.threads_per_worker)
    torch.manual_seed(cfg.seed)
    device = torch.device("cuda" if cfg.use_gpu else "cpu")
    model, *_ = create(cfg.model)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = model.to(device)
    forward = torch.compile(model) if cfg.compile else model
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
    loss_fn = clip_loss(0, 1)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    preprocess = Preprocess(cfg.model, cfg.augment)
    normalize = DeviceNormalize(preprocess.mean, preprocess.std)
    rng = np.random.default_rng(cfg.seed)
    # Cached inputs as torch tensors, gathered by torch (as the trainer's cache is), on the
    # device when it has one.
    cache = None if tensors is None else {k: torch.from_numpy(v).to(device)
                                          for k, v in tensors.items() if k in ("image", "text")}
    lines, seen, step = [], 0, 0
    window = time.perf_counter()
    while seen < SAMPLES:
        order = rng.permutation(ROWS)
        for start in range(0, ROWS - cfg.batch_size + 1, cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            if cache is None:
                batch = {k: torch.from_numpy(v) for k, v in preprocess(
                    {"caption": rows["caption"][idx], "image": rows["image"][idx]}).items()}
                if device.type == "cuda":
                    batch = {k: v.pin_memory() for k, v in batch.items()}
            else:
                batch = {k: v[torch.from_numpy(idx).to(device)] for k, v in cache.items()}
            image = normalize(batch["image"].to(device, non_blocking=True))
            if cfg.channels_last:
                image = image.contiguous(memory_format=torch.channels_last)
            text = batch["text"].to(device, non_blocking=True)
            lr = lr_at(seen + cfg.batch_size, cfg.lr, cfg.warmup_samples, cfg.total_samples)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            loss = train_step(forward, loss_fn, image, text, scaler,
                              lambda: _autocast(cfg.precision, device), cfg.accum_steps)
            optimizer.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, np.log(100))
            step += 1
            seen += cfg.batch_size
            if step % LOG == 0 or seen >= SAMPLES:
                now = time.perf_counter()
                lines.append({"step": step, "samples_seen": seen, "loss": loss.item(),
                              "samples_per_s": (seen - (lines[-1]["samples_seen"] if lines else 0))
                              / (now - window)})
                window = now
            if seen >= SAMPLES:
                break
    return lines


def decode_rates(rows: dict[str, np.ndarray], cfg, n: int = 512) -> list[tuple[str, float]]:
    """Images/s of the CPU input path (``Preprocess``: PIL decode, resize, crop, to uint8, in
    one process) against the GPU's (torchvision's nvjpeg ``decode_jpeg`` and a bicubic resize
    on the device), on the bench's JPEGs."""
    import torch
    import torchvision.transforms.v2.functional as F
    from torchvision.io import decode_jpeg

    from pipeline.training.inputs import Preprocess

    preprocess = Preprocess(cfg.model, cfg.augment)
    batch = {"caption": rows["caption"][:n], "image": rows["image"][:n]}
    t = time.perf_counter()
    size = preprocess(batch)["image"].shape[-1]
    cpu = n / (time.perf_counter() - t)
    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in rows["image"][:n]]

    def gpu_pass():
        images = decode_jpeg(data, device="cuda")
        return [F.center_crop(F.resize(i, [size], antialias=True), [size]) for i in images]

    gpu_pass()                              # warm-up: nvjpeg's handles, kernels
    torch.cuda.synchronize()
    t = time.perf_counter()
    gpu_pass()
    torch.cuda.synchronize()
    return [("CPU: PIL decode + resize (1 process)", cpu),
            ("GPU: nvjpeg decode_jpeg + resize", n / (time.perf_counter() - t))]


def profile_steps(cfg, tensors: dict[str, np.ndarray], path: str, steps: int = 12) -> None:
    """Where a cached step's time goes on the GPU: torch's profiler over ``steps`` steps of the
    bare loop's maths after two warm-ups; the operators by CUDA time to ``path``.txt and a
    Chrome trace to ``path``.json."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from pipeline.training.inputs import DeviceNormalize, Preprocess
    from pipeline.training.model import create
    from pipeline.training.train_loop import _autocast, clip_loss, make_optimizer, train_step

    device = torch.device("cuda")
    torch.manual_seed(cfg.seed)
    model = create(cfg.model)[0].to(device)
    forward = torch.compile(model) if cfg.compile else model
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
    preprocess = Preprocess(cfg.model, cfg.augment)
    normalize = DeviceNormalize(preprocess.mean, preprocess.std)
    images = torch.from_numpy(tensors["image"][:cfg.batch_size]).to(device)
    texts = torch.from_numpy(tensors["text"][:cfg.batch_size]).to(device)
    scaler = torch.amp.GradScaler("cuda", enabled=False)

    def step():
        optimizer.zero_grad(set_to_none=True)
        train_step(forward, clip_loss(0, 1), normalize(images), texts, scaler,
                   lambda: _autocast(cfg.precision, device), cfg.accum_steps)
        optimizer.step()

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    with open(f"{path}.txt", "w") as f:
        f.write(table)
    prof.export_chrome_trace(f"{path}.json")
    print(table)


def train_flops_per_sample(cfg) -> float:
    """Forward and backward FLOPs of one training step per sample, counted by torch's
    FlopCounterMode (matrix products, attention, convolutions) on a batch of 8."""
    import torch
    from open_clip.loss import ClipLoss
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.training.model import create

    model, _, _, tokenizer = create(cfg.model)
    model = model.cuda()
    size = model.visual.image_size
    size = size[0] if isinstance(size, tuple | list) else size
    image = torch.randn(8, 3, size, size, device="cuda")
    text = tokenizer(["a photo of a thing"] * 8).cuda()
    counter = FlopCounterMode(display=False)
    with counter, torch.autocast("cuda", dtype=torch.bfloat16):
        loss = ClipLoss()(*model(image, text))
        loss.backward()
    return counter.get_total_flops() / 8


def matmul_tflops() -> float:
    """A bf16 8192^3 matrix product's rate on this GPU, TFLOP/s (ten after three warm-ups)."""
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 10 * 2 * 8192**3 / (time.perf_counter() - t) / 1e12


def print_gpu_share(cfg, rates: list[tuple[str, float, float]]) -> None:
    import torch

    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    flops = train_flops_per_sample(cfg)
    gemm = matmul_tflops()
    print(f"\n{name}: {cfg.model} training step {flops / 1e9:.1f} GFLOP per sample (FlopCounterMode); "
          f"bf16 8192^3 matmul {gemm:.0f} TFLOP/s; datasheet dense bf16 peak "
          f"{peak if peak else '?'} TFLOP/s")
    header = ("data", "side", "samples/s", "TFLOP/s", "of datasheet peak", "of measured matmul")
    table = []
    for mode, bare_rate, ray_rate in rates:
        for side, rate in (("bare", bare_rate), ("ray", ray_rate)):
            achieved = rate * flops / 1e12
            table.append((mode, side, f"{rate:.0f}", f"{achieved:.1f}",
                          f"{achieved / peak:.1%}" if peak else "?", f"{achieved / gemm:.1%}"))
    print_table(header, table)
    by_mode = {mode: ray_rate for mode, _, ray_rate in rates}
    if "cached" in by_mode and peak:
        share = by_mode["cached"] * flops / 1e12 / peak
        print(f"cached, Ray trainer: {share:.1%} of the datasheet peak (target >= "
              f"{GPU_SHARE_TARGET:.0%}): {'PASS' if share >= GPU_SHARE_TARGET else 'MISS'}")
    if "cached" in by_mode and "rows" in by_mode:
        ratio = by_mode["rows"] / by_mode["cached"]
        print(f"streamed / cached, Ray trainer: {ratio:.2f} (target >= {STREAMED_TARGET}): "
              f"{'PASS' if ratio >= STREAMED_TARGET else 'MISS'}")


def ray_run(cfg, dataset: ray.data.Dataset, run_root: str, name: str):
    from pipeline.training.train import train

    run = RunDir(run_root, StorageConfig())
    return train(name, dataset, cfg, run.stage_uri("checkpoints"), SAMPLES)


def main() -> int:
    import torch

    from pipeline.training.inputs import Preprocess

    wall = time.perf_counter()
    load_before = os.getloadavg()
    base = load_config("demo").train
    # One run on the whole machine (as the seed trains): every core's torch thread, and a
    # worker reservation that leaves Ray Data a CPU for decoding.
    cfg = dataclasses.replace(base, total_samples=max(SAMPLES, base.total_samples),
                              checkpoint_every_steps=10**9, log_every_steps=LOG,
                              threads_per_worker=os.cpu_count() or 1, cpus_per_worker=0.5)
    if MODEL or BATCH:
        cfg = dataclasses.replace(cfg, model=MODEL or cfg.model, batch_size=BATCH or cfg.batch_size)
    if GPU:
        cfg = dataclasses.replace(cfg, use_gpu=True, precision="amp_bf16", lr=5e-4)
    if COMPILE:
        cfg = dataclasses.replace(cfg, compile=True)
    pairs = web_pairs(0, "bench", ROWS, IMAGE, DOMAIN_SHARES, shard_size=ROWS)
    rows = {"key": np.array([p.key for p in pairs], dtype=object),
            "caption": np.array([p.txt if p.txt.strip() else "image" for p in pairs], dtype=object),
            "image": np.array([p.jpg for p in pairs], dtype=object)}
    tensors = Preprocess(cfg.model, cfg.augment)(rows)
    print(f"bench_train: model {cfg.model}, batch {cfg.batch_size}, {ROWS:,} rows, {SAMPLES:,} "
          f"samples per run, torch threads {cfg.threads_per_worker}, Ray worker "
          f"{cfg.cpus_per_worker} CPU, best of {REPEATS}, {os.cpu_count()} CPUs, torch "
          f"{torch.__version__}", flush=True)

    os.environ["RAY_worker_niceness"] = "0"
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             object_store_memory=(8 * 1024**3) if GPU else 300 * 1024**2)
    ray.data.DataContext.get_current().enable_progress_bars = False
    blocks = range(0, ROWS, ROWS_PER_BLOCK)
    rows_ds = ray.data.from_arrow([pa.table({
        "key": rows["key"][s:s + ROWS_PER_BLOCK].tolist(),
        "caption": rows["caption"][s:s + ROWS_PER_BLOCK].tolist(),
        "image": pa.array(rows["image"][s:s + ROWS_PER_BLOCK].tolist(), pa.binary()),
    }) for s in blocks])
    # Timed after the first epoch in "cached" mode (the Ray side decodes it while training),
    # after the first window in "rows" mode.
    skip = {"cached": ROWS, "rows": LOG * cfg.batch_size}
    results = []
    try:
        with tempfile.TemporaryDirectory() as root:
            for mode in MODES:
                bare, trained = [], []
                for i in range(REPEATS):
                    cached = mode == "cached"
                    bare.append(steady_rate(bare_run(cfg, rows, tensors if cached else None),
                                            skip[mode]))
                    r = ray_run(dataclasses.replace(cfg, cache_inputs=cached), rows_ds, root,
                                f"{mode}-{i}")
                    if r.samples_seen < SAMPLES or r.steps_run != SAMPLES // cfg.batch_size:
                        raise RuntimeError(f"Ray run {mode}-{i} trained {r.steps_run} steps to "
                                           f"{r.samples_seen} samples, not to {SAMPLES}")
                    trained.append((steady_rate(r.history, skip[mode]), SAMPLES / r.wall_s, r.history[-1]["loss"]))
                    print(f"  {mode} #{i}: bare {bare[-1]:.0f} samples/s; ray {trained[-1][0]:.0f} "
                          f"samples/s steady, {trained[-1][1]:.0f} over the whole call "
                          f"({r.wall_s:.0f} s); the trainer's first step {r.first_step_s:.1f} s"
                          + (" (torch.compile included)" if cfg.compile else ""), flush=True)
                results.append((mode, max(bare), max(trained)))
    finally:
        ray.shutdown()

    header = ("data", "measure", "bare samples/s", "ray samples/s", "ratio", "target", "")
    table = []
    for mode, bare_rate, (ray_rate, whole_rate, _) in results:
        ratio = ray_rate / bare_rate
        steady = "steady (after epoch 1)" if mode == "cached" else "steady (after the 1st window)"
        table.append((mode, steady, f"{bare_rate:.0f}", f"{ray_rate:.0f}",
                      f"{ratio:.3f}", f">= {TARGET}", "PASS" if ratio >= TARGET else "MISS"))
        table.append((mode, "whole call, Ray Train start-up included", f"{bare_rate:.0f}",
                      f"{whole_rate:.0f}", f"{whole_rate / bare_rate:.3f}", "(info)", ""))
    print_table(header, table)
    if GPU:
        print_gpu_share(cfg, [(mode, b, r[0]) for mode, b, r in results])
        print_table(("input path", "images/s"),
                    [(what, f"{rate:.0f}") for what, rate in decode_rates(rows, cfg)])
        if PROFILE:
            profile_steps(cfg, tensors, PROFILE)
    print()
    print(f"load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores: "
          f"above ~{os.cpu_count()} means other work shared the CPUs); wall time {time.perf_counter() - wall:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
