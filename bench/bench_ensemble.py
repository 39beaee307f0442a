"""Ensemble inference throughput, every expert versus ``top_k=1``.

``MoDEEnsemble.zero_shot`` classifies the same images (batches of BATCH) for one task with the
routed weights of all experts, then with only the top expert (``mode="top_k", k=1``: the
others are never run), side by side in this process. The run directory is the demo's when it
exists (``demo_out/run`` after ``make demo``, or BENCH_ENSEMBLE_RUN), otherwise a synthetic one:
NUM_EXPERTS open_clip ``mode-tiny`` models with random weights saved as checkpoints, random fine
centres and the registry, which is all the ensemble reads (speed does not depend on the
weights). Text heads and class routing are built once per task (cached by the ensemble) and
timed separately. Each measure runs REPEATS times, alternating, and the fastest counts. Override
with BENCH_ENSEMBLE_IMAGES, BENCH_ENSEMBLE_BATCH, BENCH_ENSEMBLE_REPEATS, BENCH_ENSEMBLE_THREADS.
"""

from __future__ import annotations

import io
import os
import pathlib
import tempfile
import time

import numpy as np
from benchlib import print_table
from PIL import Image

from pipeline.core import registry
from pipeline.core.config import load_config
from pipeline.core.rundir import RunDir, StageOutput
from pipeline.data.demo_world import DOMAINS, render

ROOT = pathlib.Path(__file__).resolve().parents[1]
RUN = os.environ.get("BENCH_ENSEMBLE_RUN", str(ROOT / "demo_out" / "run"))
IMAGES = int(os.environ.get("BENCH_ENSEMBLE_IMAGES", 2_048))
BATCH = int(os.environ.get("BENCH_ENSEMBLE_BATCH", 256))
REPEATS = int(os.environ.get("BENCH_ENSEMBLE_REPEATS", 3))
THREADS = int(os.environ.get("BENCH_ENSEMBLE_THREADS", os.cpu_count() or 1))
NUM_EXPERTS = 4
TASK = "shapes"


def synthetic_run(root: str) -> str:
    """A run directory with random-weight experts: config, clusters, checkpoints, registry."""
    import torch

    from pipeline.training.checkpoint_io import CHECKPOINT_FILE
    from pipeline.training.model import create

    cfg = load_config("demo")
    run = RunDir(root, cfg.storage)
    run.write_config(cfg)
    rng = np.random.default_rng(0)
    k, d = cfg.cluster.fine_k, 384
    fine = rng.standard_normal((k, d)).astype(np.float32)
    fine /= np.linalg.norm(fine, axis=1, keepdims=True)
    clusters = pathlib.Path(run.stage_path("clusters"))
    clusters.mkdir(parents=True)
    np.save(clusters / "fine_centroids.npy", fine)
    np.save(clusters / "coarse_centroids.npy", fine[:NUM_EXPERTS])
    np.save(clusters / "fine_to_expert.npy", (np.arange(k) % NUM_EXPERTS).astype(np.int32))
    np.save(clusters / "fine_sizes.npy", np.ones(k, np.int64))
    run.write_manifest("clusters", config_hash="synthetic", fields={}, knobs={}, inputs={},
                       output=StageOutput(k, k), started_at="")
    for e in range(NUM_EXPERTS):
        torch.manual_seed(e)
        model, *_ = create(cfg.train.model)
        ckpt = pathlib.Path(root) / "checkpoints" / f"expert-{e}" / "step_00000001"
        ckpt.mkdir(parents=True)
        torch.save({"model": model.state_dict(), "model_name": cfg.train.model},
                   ckpt / CHECKPOINT_FILE)
        registry.put(run, {"name": f"expert-{e}", "kind": "expert", "expert_id": e,
                           "checkpoint": str(ckpt)})
    return root


def main() -> int:
    import torch

    from pipeline.evaluation.ensemble import MoDEEnsemble

    torch.set_num_threads(THREADS)
    wall = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        source = "demo run"
        if not (pathlib.Path(RUN) / "registry" / "expert-0.json").exists():
            source = "synthetic run (random weights; `make demo` first for the trained one)"
        run = RUN if source == "demo run" else synthetic_run(tmp)
        ens = MoDEEnsemble(run)
        domain = DOMAINS[TASK]
        classes, templates = list(domain.classes), list(domain.prompts)
        images = [Image.open(io.BytesIO(render(np.random.default_rng(i), TASK,
                                               classes[i % len(classes)], 32)[0]))
                  for i in range(IMAGES)]
        model_name = ens.registry["expert-0"].get("model") or "mode-tiny"
        print(f"bench_ensemble: {source} at {run}, {ens.num_experts} experts ({model_name}), "
              f"task {TASK} ({len(classes)} classes x {len(templates)} templates), {IMAGES} "
              f"images in batches of {BATCH}, {THREADS} torch threads, best of {REPEATS}",
              flush=True)
        # One-off per task: models, routing embeddings and text heads (cached afterwards).
        t = time.perf_counter()
        ens.zero_shot(images[:BATCH], classes, templates)
        setup = time.perf_counter() - t
        # The images as each expert's preprocess makes them, once: both sides then time the
        # models alone.
        _, preprocess, _ = ens.model("expert-0")
        batches = [torch.stack([preprocess(im) for im in images[s:s + BATCH]])
                   for s in range(0, IMAGES, BATCH)]
        rates: dict[str, list[float]] = {"all experts (routed)": [], "top_k=1": []}
        params = {"all experts (routed)": {}, "top_k=1": {"mode": "top_k", "k": 1}}
        run_counts = {}
        for _ in range(REPEATS):
            for label, p in params.items():
                t = time.perf_counter()
                for b in batches:
                    out = ens.zero_shot(b, classes, templates, **p)
                rates[label].append(IMAGES / (time.perf_counter() - t))
                run_counts[label] = len(out.expert_logits)
    best = {k: max(v) for k, v in rates.items()}
    header = ("ensemble", "experts run", "images/s", "ratio to all experts")
    rows = [(k, str(run_counts[k]), f"{best[k]:.0f}", f"{best[k] / best['all experts (routed)']:.2f}x")
            for k in rates]
    print_table(header, rows)
    print(f"\nfirst call of the task (models, class routing, text heads): {setup:.1f} s; all "
          f"runs: {', '.join(f'{k} ' + ' '.join(f'{r:.0f}' for r in v) for k, v in rates.items())}"
          f"; wall time {time.perf_counter() - wall:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
