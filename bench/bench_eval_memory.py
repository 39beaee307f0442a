"""Driver memory of the eval stage's scoring: a demo-size task against one SCALE times larger.

The demo task is the demo world's ``shapes`` task at its default size (``DemoConfig``:
``eval_per_class`` images per class at ``image_size`` pixels, in test/ and val/). The large
one holds every image of it SCALE times, each copy changed (flipped, rotated, brightened: other
bytes, other pixels), in one shard per copy. Each task is scored in a fresh process
(``pipeline.evaluation.eval.score_tasks``: the val split's routing grid and the test split's
every row, through Ray Data's actor pool), which prints its peak resident memory
(``ru_maxrss``: the driver alone; Ray's workers are other processes). The goal: the large
task's peak within 1.20x the demo task's. With BENCH_EVAL_IN_MEMORY=1 the same tasks are also
scored the way a task held in memory is (``read_task`` + ``zero_shot_task``), for contrast.

The run is BENCH_EVAL_RUN, else the demo's (``demo_out/run`` after ``make demo``), else a
synthetic one (bench_ensemble.py's random-weight experts: memory does not depend on weights).
Override the scale with BENCH_EVAL_SCALE.

    python bench/bench_eval_memory.py
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
from benchlib import print_table
from PIL import Image, ImageEnhance, ImageOps

ROOT = pathlib.Path(__file__).resolve().parents[1]
RUN = os.environ.get("BENCH_EVAL_RUN", str(ROOT / "demo_out" / "run"))
SCALE = int(os.environ.get("BENCH_EVAL_SCALE", 10))
IN_MEMORY = os.environ.get("BENCH_EVAL_IN_MEMORY", "0") == "1"
TASK = "shapes"
GOAL = 1.20


def _tar(path: pathlib.Path, samples) -> None:
    from pipeline.data.demo_world import tar_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tar_bytes(m for key, jpg, c in samples
                               for m in ((f"{key}.jpg", jpg), (f"{key}.cls", str(c).encode()))))


def demo_task(out: pathlib.Path) -> dict[str, list]:
    """The demo's task at its default size; returns its samples by split."""
    from pipeline.core.config import DemoConfig
    from pipeline.data.demo_world import DOMAINS, render

    cfg, d = DemoConfig(), DOMAINS[TASK]
    (out / "classnames.txt").parent.mkdir(parents=True, exist_ok=True)
    (out / "classnames.txt").write_text("\n".join(d.classes) + "\n")
    (out / "zeroshot_classification_templates.txt").write_text("\n".join(d.prompts) + "\n")
    splits = {}
    for s, split in enumerate(("test", "val")):
        rng = np.random.default_rng([cfg.seed, s])
        splits[split] = [(f"{c * cfg.eval_per_class + i:06d}", render(rng, TASK, label, cfg.image_size)[0], c)
                         for c, label in enumerate(d.classes) for i in range(cfg.eval_per_class)]
        _tar(out / split / "0.tar", splits[split])
    return splits


def _changed(jpg: bytes, copy: int) -> bytes:
    im = Image.open(io.BytesIO(jpg)).convert("RGB")
    if copy & 1:
        im = ImageOps.mirror(im)
    im = im.rotate(90 * ((copy >> 1) % 4))
    im = ImageEnhance.Brightness(im).enhance(1 + 0.03 * copy)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def large_task(demo: pathlib.Path, samples: dict[str, list], out: pathlib.Path) -> None:
    """SCALE changed copies of every image of the demo task, one shard per copy."""
    for f in ("classnames.txt", "zeroshot_classification_templates.txt"):
        (out / f).parent.mkdir(parents=True, exist_ok=True)
        (out / f).write_bytes((demo / f).read_bytes())
    for split, rows in samples.items():
        for copy in range(SCALE):
            _tar(out / split / f"{copy:04d}.tar",
                 [(f"{copy:04d}{key}", _changed(jpg, copy), c) for key, jpg, c in rows])


def child(run_uri: str, task: str, mode: str) -> None:
    """Score one task in this process; print its peak RSS and what it scored as JSON."""
    import ray
    from ray.data import DataContext

    from pipeline.evaluation import eval as evaluation
    from pipeline.evaluation.ensemble import MoDEEnsemble, run_config

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    DataContext.get_current().enable_progress_bars = False
    cfg = run_config(run_uri)
    ens = MoDEEnsemble(run_uri, cfg)
    t0 = time.perf_counter()
    if mode == "stream":
        scored = evaluation.score_tasks(ens, [task], cfg.storage)[0]
        acc = evaluation.zero_shot_result(scored.tallies, scored.mixes, ens.num_experts)["accuracy"]
        images = int(next(iter(scored.tallies.values()))[:, 0].sum()) + scored.val_images
    else:
        val = evaluation.read_task(task, cfg.storage, evaluation.VAL_SPLIT)
        evaluation.grid_accuracy(ens, val)
        test = evaluation.read_task(task, cfg.storage)
        acc = evaluation.zero_shot_task(ens, test)["accuracy"]
        images = len(val.labels) + len(test.labels)
    seconds = time.perf_counter() - t0
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_rss_mb": peak_kb / 1024, "seconds": seconds, "images": images,
                      "routed": acc[evaluation.DEFAULT_METHOD]}))
    ray.shutdown()


def measure(run_uri: str, task: pathlib.Path, mode: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", run_uri, str(task), mode],
                         capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
    if out.returncode:
        raise RuntimeError(f"{mode} {task.name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="bench-eval-memory-") as tmp:
        run_uri = RUN
        if not pathlib.Path(RUN, "registry").exists():
            from bench_ensemble import synthetic_run

            run_uri = synthetic_run(str(pathlib.Path(tmp) / "run"))
        demo, large = pathlib.Path(tmp) / "demo" / TASK, pathlib.Path(tmp) / "large" / TASK
        large_task(demo, demo_task(demo), large)
        rows = []
        for mode in ("stream", *(("in memory",) if IN_MEMORY else ())):
            small, big = measure(run_uri, demo, mode), measure(run_uri, large, mode)
            ratio = big["peak_rss_mb"] / small["peak_rss_mb"]
            for name, m in (("demo", small), (f"{SCALE}x", big)):
                rows.append([mode, name, m["images"], f"{m['peak_rss_mb']:.0f}", f"{m['seconds']:.1f}",
                             f"{m['routed']:.3f}", f"{ratio:.3f}" if name != "demo" else ""])
        print(f"run: {run_uri}")
        print_table(["scoring", "task", "images (val + test)", "driver peak RSS (MB)", "seconds",
                     "routed (T=8) acc", f"ratio (goal <= {GOAL:.2f})"], rows)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:5])
        sys.exit(0)
    sys.exit(main())
