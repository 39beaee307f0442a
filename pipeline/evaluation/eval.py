"""Stage ``eval``: zero-shot classification and retrieval for MoDE and every baseline.

Writes ``eval/`` in the run directory::

    eval/report.json        every number: per task and method, routing weights, retrieval
    eval/report.md          the same as tables, for people
    eval/accuracy.png       per-task accuracy bars of every method
    eval/routing.png        routing weights per task and routed method (heat maps)
    eval/sizes.png          fine-cluster and expert sizes (from the assignments manifest)
    eval/curves.png         every run's training loss against samples seen (pipeline/training/curves.py)

Zero-shot tasks are clip_benchmark-format webdataset folders (``classnames.txt``,
``zeroshot_classification_templates.txt``, ``test/*.tar`` with an image and a ``.cls`` per
sample), local or ``s3://``; a task may also hold a ``val/`` split (other images, same classes).
Methods, for every task (docs/routing.md; the paper's comparison: docs/algorithm.md):

- ``METHODS``: the experts mixed by routing weights, each method a label and the
  ``routing_weights`` parameters it uses (the same data labels the row and computes it): the
  authors' code (``routed (T=8)``, the default), the paper's own formula, sharper and top-1
  variants, uniform weights, and the paper's CoarseCluster ablation (routing by the coarse
  centres instead of the fine ones);
- ``routed (validated)``: the point of ``ROUTING_GRID`` (temperature, top-k, the paper's formula)
  with the best mean accuracy over the tasks' ``val/`` splits, applied to their test splits;
  chosen without reading a test label (``choose_routing``), and absent when no task has a
  ``val/`` split;
- ``expert-e``: each data expert alone; ``oracle``: the best single expert on this task;
- the baselines (``baseline_rows``), each the average of its runs' logits: ``dense (full-0)``,
  the paper's dense baseline (the seed continued on all data for one expert's budget);
  ``Full-n``, the paper's equal-cost control (n such runs averaged); ``random-split``, experts
  of a random partition averaged (ensembling without clustering); ``dense-matched``, the seed
  continued on all data for MoDE's whole budget (a harder question than the paper asks); and
  ``seed``;
- ``OneStep-m``, where the run holds the OneStep ablation (``jobs/experiment.py``): its experts
  routed like ``routed (T=8)`` by their own centres (zero-shot only).

Every row comes with its training cost (``method_samples``): the samples its models trained
on, the seed's included, and that as a multiple of the paper's dense baseline (the seed plus
one expert's continuation, ``train.total_samples``).

Retrieval on held-out pairs (``.jpg`` + ``.txt``): image-to-text routes once with the whole
caption set as the task's text; text-to-image routes every query caption by itself.
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import ray
from PIL import Image

from pipeline.clustering import assignments
from pipeline.core.config import ConfigView, StorageConfig
from pipeline.core.rundir import RunDir, StageOutput
from pipeline.core.storage import filesystem, join, pyarrow_filesystem, write_bytes_atomic
from pipeline.data.images import open_rgb
from pipeline.evaluation.ensemble import MoDEEnsemble
from pipeline.training import curves
from pipeline.training.runs import parse_name, run_name

STAGE = "eval"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# Ways to mix the experts, by report label: the parameters of ``routing_weights`` each one uses.
# The authors' temperature 8 is nearly uniform with a few classes; 1 is the sharper routing that
# calibration favoured at this scale (docs/routing.md, "Temperature").
PAPER_FORMULA = "routed (paper's formula)"
COARSE = "routed by coarse centres (T=8)"
METHODS: dict[str, dict[str, Any]] = {
    "routed (T=8)": {"temperature": 8.0},
    PAPER_FORMULA: {"variant": "paper", "temperature": 1.0},
    "routed (T=1)": {"temperature": 1.0},
    "routed top-1": {"temperature": 8.0, "mode": "top_k", "k": 1},
    "uniform": {"mode": "uniform"},
    COARSE: {"temperature": 8.0, "centres": "coarse"},
}
DEFAULT_METHOD = "routed (T=8)"
PAPER_DENSE = "dense (full-0)"
RANDOM_SPLIT = "random-split"
DENSE_MATCHED = "dense-matched"
# The routing knobs the report tunes, on validation only (docs/routing.md, "Choosing on
# validation"). The authors' T=8 comes first: a tie keeps it.
ROUTING_GRID: dict[str, dict[str, Any]] = {
    "T=8": {"temperature": 8.0},
    **{f"T={t:g}": {"temperature": t} for t in (0.25, 0.5, 1.0, 2.0, 4.0, 16.0)},
    **{f"top-{k}": {"temperature": 8.0, "mode": "top_k", "k": k} for k in (1, 2)},
    "paper": {"variant": "paper", "temperature": 1.0},
}


def full_label(n: int) -> str:
    """The paper's name for n full runs averaged: ``Full-n``."""
    return f"Full-{n}"
VALIDATED = "routed (validated)"
VAL_SPLIT = "val"


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    classnames: list[str]
    templates: list[str]
    images: list[Image.Image]
    labels: np.ndarray          # (N,) int class index


@dataclasses.dataclass(frozen=True)
class Pairs:
    images: list[Image.Image]
    captions: list[str]


def _lines(fs, path: str) -> list[str]:
    return [line.strip() for line in fs.cat_file(path).decode().splitlines() if line.strip()]


def _rows(uri: str, storage: StorageConfig, split: str = "test") -> list[dict[str, Any]]:
    """Every sample of a webdataset folder's ``<split>/`` tars (Ray Data's webdataset reader)."""
    fs, path = filesystem(uri, storage)
    folder = join(path, split)
    if not fs.exists(folder):
        raise FileNotFoundError(f"{uri}: no {split}/ folder of .tar shards (clip_benchmark's layout)")
    tars = sorted(p for p in fs.ls(folder, detail=False) if p.endswith(".tar"))
    if not tars:
        raise FileNotFoundError(f"{uri}/{split} has no .tar shards")
    ds = ray.data.read_webdataset(tars, filesystem=pyarrow_filesystem(fs), decoder=None)
    return ds.take_all()


def _image(row: dict[str, Any], uri: str) -> Image.Image:
    for ext in IMAGE_EXTS:
        if row.get(ext) is not None:
            return open_rgb(row[ext])     # any mode, 16-bit scaled; Pillow's size limit
    raise ValueError(f"{uri}: sample {row.get('__key__')!r} has no image ({'/'.join(IMAGE_EXTS)})")


def has_split(uri: str, storage: StorageConfig, split: str) -> bool:
    fs, path = filesystem(uri, storage)
    return fs.exists(join(path, split))


def read_task(uri: str, storage: StorageConfig, split: str = "test") -> Task:
    """A zero-shot classification task in clip_benchmark's webdataset layout (its ``split``)."""
    fs, path = filesystem(uri, storage)
    for f in ("classnames.txt", "zeroshot_classification_templates.txt"):
        if not fs.exists(join(path, f)):
            raise FileNotFoundError(f"{uri}: no {f} (clip_benchmark's webdataset layout)")
    classnames = _lines(fs, join(path, "classnames.txt"))
    templates = _lines(fs, join(path, "zeroshot_classification_templates.txt"))
    rows = sorted(_rows(uri, storage, split), key=lambda r: r["__key__"])
    labels = np.array([int(bytes(r["cls"]).decode().strip()) for r in rows])
    if len(labels) and (labels.min() < 0 or labels.max() >= len(classnames)):
        raise ValueError(f"{uri}: class indices must be in 0..{len(classnames) - 1}")
    name = path.rstrip("/").split("/")[-1]
    return Task(name, classnames, templates, [_image(r, uri) for r in rows], labels)


def read_pairs(uri: str, storage: StorageConfig) -> Pairs:
    """Held-out image-caption pairs (``.jpg`` + ``.txt``) for retrieval."""
    rows = sorted(_rows(uri, storage), key=lambda r: r["__key__"])
    return Pairs([_image(r, uri) for r in rows], [bytes(r["txt"]).decode().strip() for r in rows])


# ----------------------------------------------------------------------------- metrics
def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((np.argmax(logits, axis=1) == labels).mean())


def recall_at(similarity: np.ndarray, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Recall@k of a square (queries x candidates) similarity whose true match is the diagonal."""
    true = similarity[np.arange(len(similarity)), np.arange(len(similarity))][:, None]
    rank = (similarity > true).sum(axis=1)          # candidates scored above the true one
    return {k: float((rank < k).mean()) for k in ks}


# ----------------------------------------------------------------------------- evaluation
def baseline_rows(ens: MoDEEnsemble) -> dict[str, list[str]]:
    """The report's baseline rows that the registry holds, each with the runs whose logits it
    averages."""
    names = sorted(ens.registry)
    full = sorted((n for n in names if parse_name(n)[0] == "full"), key=lambda n: parse_name(n)[1])
    parts = sorted(n for n in names if parse_name(n)[0] == "random-split")
    rows = {PAPER_DENSE: ["full-0"] if "full-0" in names else [],
            full_label(len(full)): full if len(full) > 1 else [],
            RANDOM_SPLIT: parts, DENSE_MATCHED: [n for n in names if n == "dense-matched"],
            "seed": [n for n in names if n == "seed"]}
    return {label: runs for label, runs in rows.items() if runs}


def onestep_rows(ens: MoDEEnsemble) -> dict[str, list[str]]:
    """The paper's OneStep-m row, when the run holds that ablation's experts: routed like
    ``DEFAULT_METHOD``, by the OneStep centres (``pipeline.clustering.onestep``)."""
    return {f"OneStep-{len(ens.onestep_runs)}": ens.onestep_runs} if ens.onestep_runs else {}


def _expert_logits(ens: MoDEEnsemble, task: Task) -> list[np.ndarray]:
    return [ens.logits(run_name("expert", e), task.images, task.classnames, task.templates)
            for e in range(ens.num_experts)]


def _mixed(ens: MoDEEnsemble, task: Task, experts: list[np.ndarray],
           params: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(weights, mixed logits) of one routing choice."""
    w = ens.weights(task.classnames, task.templates, **params)
    return w, sum(w[e] * experts[e] for e in range(len(experts)))


def grid_accuracy(ens: MoDEEnsemble, validation: Task) -> dict[str, float]:
    """Accuracy of every ``ROUTING_GRID`` point on a task's validation split."""
    experts = _expert_logits(ens, validation)
    return {label: accuracy(_mixed(ens, validation, experts, params)[1], validation.labels)
            for label, params in ROUTING_GRID.items()}


def choose_routing(validation: dict[str, dict[str, float]]) -> dict[str, Any]:
    """The grid point with the best mean validation accuracy over tasks (the first on a tie),
    from ``{task: grid_accuracy(...)}``: validation numbers are all it is given."""
    mean = {label: float(np.mean([v[label] for v in validation.values()])) for label in ROUTING_GRID}
    best = max(mean, key=lambda label: mean[label])     # max keeps the first of equals
    return {"chosen": best, "params": ROUTING_GRID[best], "mean": mean, "tasks": validation}


def zero_shot_task(ens: MoDEEnsemble, task: Task, validated: dict[str, Any] | None = None) -> dict[str, Any]:
    """Accuracy of every method on one task, and the routing weights each routed method used;
    ``validated``: the routing parameters chosen on validation (``choose_routing``)."""
    m = ens.num_experts
    experts = _expert_logits(ens, task)
    acc = {run_name("expert", e): accuracy(lg, task.labels) for e, lg in enumerate(experts)}
    acc["oracle"] = max(acc[run_name("expert", e)] for e in range(m))
    weights = {}
    if validated is not None:
        w, mixed = _mixed(ens, task, experts, validated)
        acc[VALIDATED], weights[VALIDATED] = accuracy(mixed, task.labels), w.tolist()
    for label, params in METHODS.items():
        w = ens.weights(task.classnames, task.templates, **params)
        acc[label] = accuracy(sum(w[e] * experts[e] for e in range(m)), task.labels)
        if params.get("mode") != "uniform":
            weights[label] = w.tolist()
    growth = {}
    if len(ens.levels) > 1:     # the ensemble before the last generation, on the same logits
        before = len(ens.levels) - 2
        m_before = ens.levels[before][1]
        for label, params in METHODS.items():
            w = ens.weights(task.classnames, task.templates, level=before, **params)
            growth[label] = {"before": accuracy(sum(w[e] * experts[e] for e in range(m_before)),
                                                task.labels),
                             "after": acc[label], "weights_before": w.tolist()}
    for label, runs in baseline_rows(ens).items():
        acc[label] = accuracy(np.mean([ens.logits(n, task.images, task.classnames, task.templates)
                                       for n in runs], axis=0), task.labels)
    for label, runs in onestep_rows(ens).items():
        w = ens.weights(task.classnames, task.templates, centres="onestep", **METHODS[DEFAULT_METHOD])
        acc[label] = accuracy(sum(w[e] * ens.logits(n, task.images, task.classnames, task.templates)
                                  for e, n in enumerate(runs)), task.labels)
    return {"classes": len(task.classnames), "images": len(task.labels),
            "chance": 1.0 / len(task.classnames), "accuracy": acc, "weights": weights,
            "growth": growth}


def _similarities(ens: MoDEEnsemble, name: str, pairs: Pairs) -> np.ndarray:
    """(images x captions) cosine similarity of one model."""
    model, _, tokenizer = ens.model(name)
    image = ens.image_features(name, pairs.images)
    import torch  # late import: the stage table imports this module, and torch costs ~2 s

    with torch.no_grad():
        text = model.encode_text(tokenizer(pairs.captions).to(ens.device), normalize=True)
    return (image @ text.T).float().cpu().numpy()


def _retrieval(ens: MoDEEnsemble, pairs: Pairs,
               validated: dict[str, Any] | None = None) -> dict[str, dict[str, float]]:
    """Recall@1/5 both ways for every method (and the routing chosen on the zero-shot tasks'
    validation splits, ``validated``); routed as the paper does (see module doc)."""
    m = ens.num_experts
    sims = {run_name("expert", e): _similarities(ens, run_name("expert", e), pairs) for e in range(m)}
    experts = np.stack(list(sims.values()))                                   # (m, images, captions)
    caption_emb = np.asarray(ens.encoder.encode(pairs.captions), np.float64)
    caption_emb /= np.linalg.norm(caption_emb, axis=1, keepdims=True)
    out: dict[str, dict[str, float]] = {}

    def score(name: str, i2t: np.ndarray, t2i: np.ndarray) -> None:
        r_i, r_t = recall_at(i2t), recall_at(t2i)
        out[name] = {"i2t_r1": r_i[1], "i2t_r5": r_i[5], "t2i_r1": r_t[1], "t2i_r5": r_t[5]}

    for name, s in sims.items():
        score(name, s, s.T)
    routed = {**METHODS, **({VALIDATED: validated} if validated is not None else {})}
    for label, params in routed.items():
        corpus = ens.route(caption_emb, **params)
        per_query = np.stack([ens.route(caption_emb[i:i + 1], **params)
                              for i in range(len(caption_emb))])              # (captions, m)
        # query caption q: sum_c w_c(q) * similarity_c(image, q)
        score(label, np.tensordot(corpus, experts, axes=1), np.einsum("qc,ciq->qi", per_query, experts))
    best = max(sims, key=lambda n: np.mean(list(out[n].values())))
    out["oracle"] = dict(out[best], expert=best)
    for label, runs in baseline_rows(ens).items():
        s = np.mean([_similarities(ens, n, pairs) for n in runs], axis=0)
        score(label, s, s.T)
    return out


def confusion(run: RunDir, truth_uri: str, storage: StorageConfig) -> pd.DataFrame:
    """Expert-by-true-domain counts of the assigned training samples (worlds that know them)."""
    fs, path = filesystem(truth_uri, storage)
    truth = pd.read_parquet(io.BytesIO(fs.cat_file(path)), columns=["key", "split", "domain"])
    a = assignments.read(run).select_columns(["key", "expert_id"]).to_pandas()
    merged = a.merge(truth[truth["split"] == "train"], on="key", how="left")
    merged["domain"] = merged["domain"].fillna("(unknown)")
    return pd.crosstab(merged["expert_id"], merged["domain"])


# ----------------------------------------------------------------------------- report
def method_order(m: int, columns: Sequence[str]) -> list[str]:
    first = [DEFAULT_METHOD, VALIDATED, *METHODS, *sorted(c for c in columns if c.startswith("OneStep-")),
             "oracle", PAPER_DENSE,
             *sorted(c for c in columns if c.startswith("Full-")), RANDOM_SPLIT, DENSE_MATCHED, "seed"]
    first = list(dict.fromkeys(first))
    experts = [run_name("expert", e) for e in range(m)]
    return [c for c in first if c in columns] + [e for e in experts if e in columns]


def summary_table(report: dict[str, Any]) -> pd.DataFrame:
    """Methods x tasks accuracy (%) with the mean over tasks."""
    acc = pd.DataFrame({t: r["accuracy"] for t, r in report["zero_shot"].items()})
    acc["mean"] = acc.mean(axis=1)
    return (100 * acc.loc[method_order(report["num_experts"], acc.index)]).round(1)


def run_samples(entries: dict[str, dict[str, Any]]) -> dict[str, int]:
    """Samples each registered run trained on itself: the seed from 0, every other run from
    the seed's end (where it starts)."""
    seed_end = entries["seed"]["metrics"]["samples_seen"] if "seed" in entries else 0
    return {name: e["metrics"]["samples_seen"] - (0 if e["kind"] == "seed" else seed_end)
            for name, e in entries.items()}


def method_samples(entries: dict[str, dict[str, Any]], methods: Sequence[str],
                   baselines: dict[str, list[str]]) -> dict[str, dict[str, float]]:
    """Every report row's training cost: the samples its models trained on, the seed's
    included (a mix of the experts costs the seed and every expert; an expert alone, the seed
    and itself; a baseline row, the seed and its runs), and that over the paper's dense
    baseline, the seed plus one expert's continuation (an expert's ``samples_seen``: every
    expert ends at ``train.total_samples``). MoDE-n comes out at ``(f + n (1 - f))`` times it,
    ``(27 + 5n) / 32`` at the paper's seed share."""
    own = run_samples(entries)
    experts = sorted(n for n in entries if parse_name(n)[0] == "expert")
    if not experts:
        return {}
    seed = own.get("seed", 0)
    reference = entries[experts[0]]["metrics"]["samples_seen"]
    runs = {**{label: [] if label == "seed" else names for label, names in baselines.items()},
            **{e: [e] for e in experts}}
    out = {}
    for method in methods:
        used = runs.get(method, experts)
        samples = seed + sum(own[n] for n in used)
        out[method] = {"samples": int(samples), "vs_dense": samples / reference}
    return out


def _markdown(df: pd.DataFrame, digits: int = 1) -> str:
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join([df.index.name or "", *cols]) + " |",
             "|" + "---|" * (len(cols) + 1)]
    for idx, row in df.astype(object).iterrows():   # object: an int column stays int
        lines.append("| " + " | ".join([str(idx), *(f"{v:.{digits}f}" if isinstance(v, float)
                                                      else str(v) for v in row)]) + " |")
    return "\n".join(lines)


def with_cost(table: pd.DataFrame, report: dict[str, Any]) -> pd.DataFrame:
    """A methods table with each method's training cost beside it (``method_samples``)."""
    cost = report.get("method_cost") or {}
    out = table.copy()
    out["samples"] = [int(cost[m]["samples"]) if m in cost else "" for m in out.index]
    out["x dense"] = [f"{cost[m]['vs_dense']:.2f}" if m in cost else "" for m in out.index]
    return out


def markdown(report: dict[str, Any]) -> str:
    out = [f"# MoDE evaluation: {report['run']}", "",
           f"{report['num_experts']} experts; zero-shot accuracy (%) per task, mean over tasks, "
           "and what each method cost to train: `samples`, the seed's included, and `x dense`, "
           f"that over the paper's dense baseline `{PAPER_DENSE}` (the seed continued on all "
           f"data for one expert's budget). `{DEFAULT_METHOD}` is the authors' routing, "
           f"`{PAPER_FORMULA}` the paper's text; `{VALIDATED}` the routing chosen on the tasks' "
           f"validation splits (below); `{COARSE}` routes by the coarse centres (the paper's "
           "CoarseCluster); `oracle` the best single expert per task; `Full-n` n runs like "
           f"`{PAPER_DENSE}`, averaged (the paper's equal-cost control); `{RANDOM_SPLIT}` the "
           f"random-split experts averaged; `{DENSE_MATCHED}` one model trained for MoDE's whole "
           "budget.", "",
           _markdown(with_cost(summary_table(report), report).rename_axis("method")), ""]
    if report.get("zero_shot"):
        w = pd.DataFrame({t: r["weights"][DEFAULT_METHOD] for t, r in report["zero_shot"].items()}).T
        w.columns = [run_name("expert", e) for e in w.columns]
        out += [f"## Routing weights, {DEFAULT_METHOD}", "", _markdown(w.rename_axis("task"), digits=3), ""]
    if report.get("routing_selection"):
        out += [selection_section(report["routing_selection"]), ""]
    if report.get("generations"):
        out += [growth_section(report), ""]
    if report.get("retrieval"):
        r = pd.DataFrame(report["retrieval"]).T.drop(columns=["expert"], errors="ignore")
        out += [f"## Retrieval on {report['retrieval_pairs']} held-out pairs (recall, %)", "",
                _markdown((100 * r.astype(float)).round(1).rename_axis("method")), ""]
    if report.get("cost"):
        c = pd.DataFrame.from_dict(report["cost"], orient="index").astype({"samples": int})
        out += ["## Training cost", "", "CPU and GPU units each run's workers reserved, times its "
                "wall time (Ray Train's start-up included), in hours; samples trained on. MoDE's "
                "experts train independently, so they can run at once on separate nodes.", "",
                _markdown(c.rename_axis("run"), digits=3), ""]
    if report.get("confusion"):
        c = pd.DataFrame(report["confusion"]).fillna(0).astype(int)
        out += ["## Clustering: assigned training samples, expert x true domain", "",
                _markdown(c.rename_axis("expert")), ""]
    return "\n".join(out)


GROWTH_METHODS = (DEFAULT_METHOD, "routed (T=1)")


def selection_section(selection: dict[str, Any]) -> str:
    """The validation accuracy of every grid point per task, and the one chosen."""
    v = pd.DataFrame(selection["tasks"]).T[list(ROUTING_GRID)]
    v.loc["mean"] = v.mean()
    return "\n".join([
        "## Routing chosen on validation", "",
        f"Validation accuracy (%) of each routing choice (`ROUTING_GRID`); chosen: "
        f"**{selection['chosen']}** (`{VALIDATED}` above, applied to the test splits). No test "
        "label is read to choose it.", "",
        _markdown((100 * v).round(1).rename_axis("task"))])


def cost_table(runs: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """What each training run reserved (registry ``cost``: CPU and GPU units held by its
    workers times wall time, in hours) and the samples its last attempt trained on; then the
    totals of MoDE (the seed and every expert) and of each baseline (the seed and its runs).
    Runs registered before costs were recorded are left out."""
    rows = {}
    for name, e in runs.items():
        if "cost" in e:
            rows[name] = {"cpu_hours": e["cost"]["cpu_seconds"] / 3600,
                          "gpu_hours": e["cost"]["gpu_seconds"] / 3600,
                          "samples": e["cost"]["samples"]}
    table = pd.DataFrame.from_dict(rows, orient="index", columns=["cpu_hours", "gpu_hours", "samples"])
    kinds = {name: runs[name]["kind"] for name in table.index}
    # each total: the runs of these kinds or names, when every one of them is there
    totals = {"MoDE (seed + experts)": ("seed", "expert"),
              "dense (seed + full-0)": ("seed", "full-0"),
              "Full-n (seed + full runs)": ("seed", "full"),
              "random split (seed + parts)": ("seed", "random-split"),
              "dense-matched (seed + dense-matched)": ("seed", "dense-matched")}
    for label, wanted in totals.items():
        part = table.loc[[n for n, k in kinds.items() if k in wanted or n in wanted]]
        if set(wanted) <= {kinds[n] for n in part.index} | set(part.index):
            table.loc[label] = part.sum()
    order = sorted(table.index, key=lambda n: (n in totals, n != "seed", n))
    return table.loc[order].astype({"samples": int})


def growth_table(report: dict[str, Any]) -> pd.DataFrame:
    """Per task: the routed ensemble's accuracy (%) before the last generation's experts and
    after, and the change, for ``GROWTH_METHODS``."""
    rows = {}
    for task, r in report["zero_shot"].items():
        row = {}
        for label in GROWTH_METHODS:
            g = r["growth"][label]
            row[f"{label} before"] = 100 * g["before"]
            row[f"{label} after"] = 100 * g["after"]
            row[f"{label} change"] = 100 * (g["after"] - g["before"])
        rows[task] = row
    return pd.DataFrame(rows).T.round(1)


def growth_section(report: dict[str, Any]) -> str:
    last = report["generations"][-1]
    before, after = report["experts_before_last_generation"], report["num_experts"]
    return "\n".join([
        f"## Growth: before and after generation `{last}`", "",
        f"Zero-shot accuracy (%) of the routed ensemble of the {before} experts before the "
        f"generation and of all {after} after it (same checkpoints, same images; the new "
        "experts' own routing weights decide what they add).", "",
        _markdown(growth_table(report).rename_axis("task"))])


def plot_accuracy(report: dict[str, Any]) -> bytes:
    import matplotlib  # late import: 0.6 s, kept out of the processes that only read tasks

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = summary_table(report)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(table.columns)), 4.5))
    width = 0.8 / len(table.index)
    for i, method in enumerate(table.index):
        ax.bar(np.arange(len(table.columns)) + i * width, table.loc[method], width, label=method)
    ax.set_xticks(np.arange(len(table.columns)) + 0.4 - width / 2, table.columns)
    ax.set_ylabel("zero-shot accuracy (%)")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("MoDE vs baselines")
    return _png(fig)


def plot_routing(report: dict[str, Any]) -> bytes:
    import matplotlib  # late import: 0.6 s, kept out of the processes that only read tasks

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(report["zero_shot"])
    keys = list(report["zero_shot"][tasks[0]]["weights"])
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 0.6 * len(tasks) + 1.5))
    for ax, key in zip(np.atleast_1d(axes), keys, strict=True):
        w = np.array([report["zero_shot"][t]["weights"][key] for t in tasks])
        im = ax.imshow(w, vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(w.shape[1]), [f"e{e}" for e in range(w.shape[1])])
        ax.set_yticks(range(len(tasks)), tasks)
        for (i, j), v in np.ndenumerate(w):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if v < 0.5 else "black")
        ax.set_title(key)
    fig.colorbar(im, ax=axes)
    return _png(fig)


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt  # late import: see plot_accuracy

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def demo_inputs(data_uri: str, storage: StorageConfig) -> tuple[list[str], str, str] | None:
    """(task URIs, retrieval URI, truth URI) of a demo world, or None where there is none."""
    fs, path = filesystem(data_uri, storage)
    if not fs.exists(join(path, "world.json")):
        return None
    world = json.loads(fs.cat_file(join(path, "world.json")))
    # Every domain's task, the held-out one too: before an expert for it exists, its accuracy
    # is what growing the run (docs/growth.md) has to improve on.
    tasks = [join(data_uri, "eval", t) for t in [*world["train_domains"], *world.get("new_domain", {})]]
    return tasks, join(data_uri, "eval", "retrieval"), join(data_uri, "truth.parquet")


def inputs(run_uri: str, tasks: Sequence[str], retrieval: str | None, demo_data: str | None,
           storage: StorageConfig) -> tuple[list[str], str | None, str | None] | None:
    """What the eval stage reads: (tasks, retrieval, truth), or None when there is nothing.

    Given tasks and retrieval are kept; a demo world (``demo_data``, else ``<run>/../data``, as
    `make demo` lays it out) adds its tasks where none are given, its retrieval pairs and its
    true domains (for the clustering's confusion table)."""
    tasks, truth = list(tasks), None
    demo = demo_data or run_uri.rstrip("/").rsplit("/", 1)[0] + "/data"
    found = demo_inputs(demo, storage) if (demo_data or not tasks) else None
    if found:
        tasks = tasks or found[0]
        retrieval, truth = retrieval or found[1], found[2]
    if not tasks and not retrieval:
        return None
    return tasks, retrieval, truth


def select_on_validation(ens: MoDEEnsemble, tasks: Sequence[str], storage: StorageConfig,
                         log: Callable[[str], None] = print) -> dict[str, Any] | None:
    """``choose_routing`` over the ``val/`` splits of ``tasks`` (None when none has one); reads
    no test split. ``images``: the validation images it scored."""
    scores, images = {}, 0
    for uri in tasks:
        if has_split(uri, storage, VAL_SPLIT):
            val = read_task(uri, storage, VAL_SPLIT)
            scores[val.name] = grid_accuracy(ens, val)
            images += len(val.labels)
    if not scores:
        return None
    selection = choose_routing(scores)
    log(f"[eval] routing chosen on the validation splits of {len(scores)} task(s): "
        f"{selection['chosen']} ({selection['mean'][selection['chosen']]:.1%} mean validation accuracy)")
    return {**selection, "images": images}


def run(cfg: ConfigView, run: RunDir, upstream: dict[str, Any], log: Callable[[str], None] = print, *,
        tasks: Sequence[str], retrieval: str | None = None, truth: str | None = None) -> StageOutput:
    """Evaluate the run's experts and baselines; write ``eval/``."""
    ens = MoDEEnsemble(run.uri, cfg)
    report: dict[str, Any] = {"run": run.uri, "num_experts": ens.num_experts,
                              "generations": ens.generations,
                              "experts_before_last_generation": ens.levels[-2][1] if ens.generations else None,
                              "runs": sorted(ens.registry), "methods": METHODS, "zero_shot": {}}
    images = 0
    selection = select_on_validation(ens, tasks, cfg.storage, log)
    if selection is not None:
        report["routing_selection"] = selection
        images += selection.pop("images")
    validated = selection["params"] if selection else None
    for uri in tasks:
        task = read_task(uri, cfg.storage)
        result = report["zero_shot"][task.name] = zero_shot_task(ens, task, validated)
        images += len(task.labels)
        acc = result["accuracy"]
        log(f"[eval] {task.name}: {len(task.labels)} images, {len(task.classnames)} classes; "
            f"{DEFAULT_METHOD} {acc[DEFAULT_METHOD]:.1%}, {PAPER_DENSE} "
            f"{acc.get(PAPER_DENSE, float('nan')):.1%}")
    if retrieval:
        pairs = read_pairs(retrieval, cfg.storage)
        report["retrieval_pairs"] = len(pairs.captions)
        images += len(pairs.captions)
        log(f"[eval] retrieval: {len(pairs.captions)} pairs")
        report["retrieval"] = _retrieval(ens, pairs, validated)
    report["cost"] = cost_table(ens.registry).to_dict(orient="index")
    if report["zero_shot"]:
        methods = next(iter(report["zero_shot"].values()))["accuracy"]
        report["method_cost"] = method_samples(ens.registry, list(methods),
                                               {**baseline_rows(ens), **onestep_rows(ens)})
    if truth:
        report["confusion"] = {str(k): {str(e): int(v) for e, v in col.items()}
                               for k, col in confusion(run, truth, cfg.storage).items()}
    fs = run.fs
    write_bytes_atomic(fs, run.stage_path(STAGE, "report.json"),
                       (json.dumps(report, indent=2) + "\n").encode())
    write_bytes_atomic(fs, run.stage_path(STAGE, "report.md"), markdown(report).encode())
    if report["zero_shot"]:
        write_bytes_atomic(fs, run.stage_path(STAGE, "accuracy.png"), plot_accuracy(report))
        write_bytes_atomic(fs, run.stage_path(STAGE, "routing.png"), plot_routing(report))
    if any(e.get("history") for e in ens.registry.values()):    # runs trained before curves: none
        write_bytes_atomic(fs, run.stage_path(STAGE, "curves.png"), curves.plot(ens.registry))
    stats = upstream["assignments"]["stats"]      # the original clustering's sizes
    ids = sorted(int(e) for e in stats["rows_per_expert"])
    per_expert = np.array([stats["rows_per_expert"][str(e)] for e in ids])
    write_bytes_atomic(fs, run.stage_path(STAGE, "sizes.png"),
                       assignments.plot_sizes(np.array(stats["rows_per_fine_cluster"]), per_expert, ids))
    return StageOutput(images, images, {}, {"tasks": sorted(report["zero_shot"]),
                                            "retrieval_pairs": report.get("retrieval_pairs", 0)})


def load_report(run: RunDir) -> dict[str, Any]:
    """The report of the run's ``eval/`` stage."""
    return json.loads(run.fs.cat_file(run.stage_path(STAGE, "report.json")))
