"""The seed model's learning curve on the demo world: zero-shot accuracy at checkpoints along
its schedule, which is how the demo preset chooses how long the seed trains (docs/results.md,
"The demo's budget").

    python bench/bench_seed_curve.py              # BENCH_CURVE_OUT=bench_out/seed_curve

The demo's data stages run into BENCH_CURVE_OUT (skipped when complete), then a seed trains on
the demo preset's recipe over a schedule of BENCH_CURVE_TOTAL samples (default 89,600) to its
share BENCH_CURVE_FRACTION (default 0.75, so 67,200 samples), with a checkpoint every
BENCH_CURVE_EVERY steps (default 35: 4,480 samples) kept. Printed: each checkpoint's zero-shot
accuracy (%) on the four training domains' tasks and their mean. About 4 minutes on 2 cores.
"""

from __future__ import annotations

import os

import numpy as np
import open_clip
import torch
from benchlib import print_table

from pipeline.core import stages
from pipeline.core.config import StorageConfig, load_config
from pipeline.core.raycluster import init_ray
from pipeline.core.rundir import RunDir
from pipeline.data import demo_world
from pipeline.data.demo_world import TRAIN_DOMAINS
from pipeline.data.images import to_rgb
from pipeline.evaluation.ensemble import fill
from pipeline.evaluation.eval import read_task
from pipeline.training import checkpoints
from pipeline.training.checkpoint_io import list_checkpoints, load_model

OUT = os.environ.get("BENCH_CURVE_OUT", "bench_out/seed_curve")
TOTAL = int(os.environ.get("BENCH_CURVE_TOTAL", 89_600))
FRACTION = float(os.environ.get("BENCH_CURVE_FRACTION", 0.75))
EVERY = int(os.environ.get("BENCH_CURVE_EVERY", 35))


def accuracy(checkpoint: str, task, storage: StorageConfig) -> float:
    model, preprocess, tokenizer = load_model(checkpoint, storage)
    with torch.no_grad():
        head = open_clip.build_zero_shot_classifier(
            model, tokenizer, task.classnames, [lambda c, t=t: fill(t, c) for t in task.templates],
            num_classes_per_batch=None, device="cpu")
        images = torch.stack([preprocess(to_rgb(im)) for im in task.images])
        logits = model.encode_image(images, normalize=True) @ head
    return float((logits.argmax(1).numpy() == task.labels).mean())


def main() -> None:
    cfg = load_config("demo", [f"train.total_samples={TOTAL}", f"train.seed_fraction={FRACTION}",
                               f"train.checkpoint_every_steps={EVERY}", "train.keep_checkpoints=1000"])
    init_ray(cfg.ray)
    data = f"{OUT}/data"
    if not os.path.exists(f"{data}/world.json"):
        demo_world.generate(data, cfg.demo, cfg.storage)
    run = RunDir(f"{OUT}/run", cfg.storage)
    run.write_config(cfg)
    for stage, extra in (("ingest", {"data": f"{data}/train"}), ("embeddings", {}), ("clusters", {}),
                         ("assignments", {}), ("training_data", {})):
        stages.run_stage(stage, cfg, run, **extra)
    checkpoints.train_seed(cfg, run)
    storage = cfg.storage
    tasks = [read_task(f"{OUT}/data/eval/{name}", storage) for name in TRAIN_DOMAINS]
    batch = 128       # the demo preset's
    rows = []
    for checkpoint in list_checkpoints(run.fs, run.stage_path("checkpoints", "seed"), run.scheme):
        step = int(checkpoint.rstrip("/").rsplit("_", 1)[-1])
        acc = [100 * accuracy(checkpoint, task, storage) for task in tasks]
        rows.append([f"{step * batch:,}", *(f"{a:.1f}" for a in acc), f"{np.mean(acc):.1f}"])
    print(f"\nseed trained to {FRACTION:g} of a {TOTAL:,}-sample schedule; zero-shot accuracy (%):")
    print_table(["samples", *TRAIN_DOMAINS, "mean"], rows)


if __name__ == "__main__":
    main()
