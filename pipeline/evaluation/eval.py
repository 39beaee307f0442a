"""Stage ``eval``: zero-shot classification and retrieval for MoDE and every baseline.

Writes ``eval/`` in the run directory::

    eval/report.json        every number: per task and method, routing weights, retrieval
    eval/report.md          the same as tables, for people
    eval/accuracy.png       per-task accuracy bars of every method
    eval/routing.png        routing weights per task and routed method (heat maps)
    eval/sizes.png          fine-cluster and expert sizes (from the assignments manifest)
    eval/curves.png         every run's training loss against samples seen (pipeline/training/curves.py)
    eval/clip_benchmark/    one clip_benchmark result file per task and row: acc1, acc5, mean per-class recall

Zero-shot tasks stream (``pipeline.evaluation.scoring``): this module computes what depends on
class names only (``task_mixes``: every row's runs and routing weights) and turns the tallies the
scoring actors return (``tally``: per class, images and top-1/top-5 hits) into the report. No
task image enters this process. ``read_task`` + ``zero_shot_task`` do the same for a task held
in memory (small tasks, tests); retrieval (``read_pairs``) holds its pairs, as recall needs the
whole image-by-caption matrix.

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
import re
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
from pipeline.evaluation import scoring
from pipeline.evaluation.ensemble import MoDEEnsemble
from pipeline.evaluation.metrics import IMAGE_EXTS, Mix, clip_metrics, runs_of, tally, tally_accuracy
from pipeline.training import curves
from pipeline.training.runs import parse_name, run_name

STAGE = "eval"

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


def shards(uri: str, storage: StorageConfig, split: str = "test") -> list[str]:
    """The ``.tar`` shards of a webdataset folder's ``<split>/`` (paths inside its filesystem)."""
    fs, path = filesystem(uri, storage)
    folder = join(path, split)
    if not fs.exists(folder):
        raise FileNotFoundError(f"{uri}: no {split}/ folder of .tar shards (clip_benchmark's layout)")
    tars = sorted(p for p in fs.ls(folder, detail=False) if p.endswith(".tar"))
    if not tars:
        raise FileNotFoundError(f"{uri}/{split} has no .tar shards")
    return tars


def _rows(uri: str, storage: StorageConfig, split: str = "test") -> list[dict[str, Any]]:
    """Every sample of a webdataset folder's ``<split>/`` tars, in memory (Ray Data's reader)."""
    fs, _ = filesystem(uri, storage)
    ds = ray.data.read_webdataset(shards(uri, storage, split), filesystem=pyarrow_filesystem(fs),
                                  decoder=None)
    return ds.take_all()


def image_of(row: dict[str, Any], uri: str) -> Image.Image:
    """The image of a webdataset sample (its first ``IMAGE_EXTS`` member)."""
    for ext in IMAGE_EXTS:
        if row.get(ext) is not None:
            return open_rgb(row[ext])     # any mode, 16-bit scaled; Pillow's size limit
    raise ValueError(f"{uri}: sample {row.get('__key__')!r} has no image ({'/'.join(IMAGE_EXTS)})")


def has_split(uri: str, storage: StorageConfig, split: str) -> bool:
    fs, path = filesystem(uri, storage)
    return fs.exists(join(path, split))


@dataclasses.dataclass(frozen=True)
class TaskInfo:
    """A zero-shot task without its images: what routing and the report need."""
    uri: str
    name: str
    classnames: list[str]
    templates: list[str]


def task_info(uri: str, storage: StorageConfig) -> TaskInfo:
    """A clip_benchmark task's name, class names and templates (its images stay where they are)."""
    fs, path = filesystem(uri, storage)
    for f in ("classnames.txt", "zeroshot_classification_templates.txt"):
        if not fs.exists(join(path, f)):
            raise FileNotFoundError(f"{uri}: no {f} (clip_benchmark's webdataset layout)")
    return TaskInfo(uri, path.rstrip("/").split("/")[-1], _lines(fs, join(path, "classnames.txt")),
                    _lines(fs, join(path, "zeroshot_classification_templates.txt")))


def read_task(uri: str, storage: StorageConfig, split: str = "test") -> Task:
    """A zero-shot classification task in clip_benchmark's webdataset layout (its ``split``),
    every image in memory: for small tasks and tests; the stage streams them (``scoring``)."""
    info = task_info(uri, storage)
    rows = sorted(_rows(uri, storage, split), key=lambda r: r["__key__"])
    labels = np.array([int(bytes(r["cls"]).decode().strip()) for r in rows])
    if len(labels) and (labels.min() < 0 or labels.max() >= len(info.classnames)):
        raise ValueError(f"{uri}: class indices must be in 0..{len(info.classnames) - 1}")
    return Task(info.name, info.classnames, info.templates, [image_of(r, uri) for r in rows], labels)


def read_pairs(uri: str, storage: StorageConfig) -> Pairs:
    """Held-out image-caption pairs (``.jpg`` + ``.txt``) for retrieval."""
    rows = sorted(_rows(uri, storage), key=lambda r: r["__key__"])
    return Pairs([image_of(r, uri) for r in rows], [bytes(r["txt"]).decode().strip() for r in rows])


# ----------------------------------------------------------------------------- metrics
def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((np.argmax(logits, axis=1) == labels).mean())


def recall_at(similarity: np.ndarray, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Recall@k of a square (queries x candidates) similarity whose true match is the diagonal."""
    true = similarity[np.arange(len(similarity)), np.arange(len(similarity))][:, None]
    rank = (similarity > true).sum(axis=1)          # candidates scored above the true one
    return {k: float((rank < k).mean()) for k in ks}


# Keys of the mixes scored beside the report's rows: each ROUTING_GRID point, and each routed
# method of the ensemble before the last generation.
GRID, BEFORE = "grid: ", "before: "


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


def grid_mixes(ens: MoDEEnsemble, classnames: Sequence[str],
               templates: Sequence[str]) -> dict[str, Mix]:
    """The experts mixed at every ``ROUTING_GRID`` point, keyed ``GRID + label``."""
    experts = tuple(run_name("expert", e) for e in range(ens.num_experts))
    return {GRID + label: Mix(experts, tuple(ens.weights(classnames, templates, **params).tolist()))
            for label, params in ROUTING_GRID.items()}


def task_mixes(ens: MoDEEnsemble, classnames: Sequence[str], templates: Sequence[str],
               validated: dict[str, Any] | None = None) -> dict[str, Mix]:
    """The ``Mix`` of every zero-shot row of a task, in report order, and the routed methods of
    the ensemble before the last generation (``BEFORE + label``). Routing weights depend on the
    class names alone: computed here once per task, never per image."""
    m = ens.num_experts
    experts = tuple(run_name("expert", e) for e in range(m))
    mixes = {e: Mix((e,)) for e in experts}
    routed = {**({VALIDATED: validated} if validated is not None else {}), **METHODS}
    for label, params in routed.items():
        mixes[label] = Mix(experts, tuple(ens.weights(classnames, templates, **params).tolist()))
    for label, runs in baseline_rows(ens).items():
        mixes[label] = Mix(tuple(runs))
    for label, runs in onestep_rows(ens).items():
        w = ens.weights(classnames, templates, centres="onestep", **METHODS[DEFAULT_METHOD])
        mixes[label] = Mix(tuple(runs), tuple(w.tolist()))
    if len(ens.levels) > 1:     # the ensemble before the last generation, on the same logits
        before = len(ens.levels) - 2
        m_before = ens.levels[before][1]
        for label, params in METHODS.items():
            w = ens.weights(classnames, templates, level=before, **params)
            mixes[BEFORE + label] = Mix(experts[:m_before], tuple(w.tolist()))
    return mixes


def zero_shot_result(tallies: dict[str, np.ndarray], mixes: dict[str, Mix],
                     num_experts: int) -> dict[str, Any]:
    """One task's entry of the report from the tallies of its mixes (``task_mixes``): accuracy
    of every row (``oracle``: the best expert), the routing weights of the routed rows, and
    growth before and after the last generation."""
    experts = [run_name("expert", e) for e in range(num_experts)]
    acc = {e: tally_accuracy(tallies[e]) for e in experts}
    acc["oracle"] = max(acc[e] for e in experts)
    weights, growth = {}, {}
    for label, mix in mixes.items():
        if label in acc or label.startswith((GRID, BEFORE)):
            continue
        acc[label] = tally_accuracy(tallies[label])
        if label in (VALIDATED, *METHODS) and METHODS.get(label, {}).get("mode") != "uniform":
            weights[label] = list(mix.weights)
    for label in METHODS:
        if BEFORE + label in mixes:
            growth[label] = {"before": tally_accuracy(tallies[BEFORE + label]), "after": acc[label],
                             "weights_before": list(mixes[BEFORE + label].weights)}
    first = tallies[experts[0]]
    return {"classes": len(first), "images": int(first[:, 0].sum()), "chance": 1.0 / len(first),
            "accuracy": acc, "weights": weights, "growth": growth}


def _expert_logits(ens: MoDEEnsemble, task: Task) -> list[np.ndarray]:
    return [ens.logits(run_name("expert", e), task.images, task.classnames, task.templates)
            for e in range(ens.num_experts)]


def _mixed(ens: MoDEEnsemble, task: Task, experts: list[np.ndarray],
           params: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(weights, mixed logits) of one routing choice."""
    w = ens.weights(task.classnames, task.templates, **params)
    return w, sum(w[e] * experts[e] for e in range(len(experts)))


def grid_accuracy(ens: MoDEEnsemble, validation: Task) -> dict[str, float]:
    """Accuracy of every ``ROUTING_GRID`` point on a task's validation split held in memory."""
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
    """Accuracy of every method on one task held in memory (``read_task``), and the routing
    weights each routed method used; ``validated``: the routing parameters chosen on validation
    (``choose_routing``). The stage streams its tasks instead (``scoring.score``); both sum
    the same tallies of the same mixes."""
    mixes = task_mixes(ens, task.classnames, task.templates, validated)
    logits = {r: ens.logits(r, task.images, task.classnames, task.templates) for r in runs_of(mixes)}
    tallies = {k: tally(mix.logits(logits), task.labels, len(task.classnames)) for k, mix in mixes.items()}
    return zero_shot_result(tallies, mixes, ens.num_experts)


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


def use_gpu(cfg) -> bool:
    """Whether scoring actors take a GPU each: where the config trains on GPUs
    (``train.use_gpu``, as pipeline/training/train.py decides), when the view may read it."""
    if isinstance(cfg, ConfigView) and "train.use_gpu" not in (*cfg.fields, *cfg.knobs):
        return False
    return bool(cfg.train.use_gpu)


@dataclasses.dataclass(frozen=True)
class Scored:
    """What a streaming pass returns for one task: its test split's tallies of every mix, and
    its validation split's accuracy of every ``ROUTING_GRID`` point (with the images behind
    each)."""
    info: TaskInfo
    mixes: dict[str, Mix] | None            # None: test split not scored
    tallies: dict[str, np.ndarray] | None
    validation: dict[str, float] | None     # None: the task has no val/ split
    val_images: int = 0


def score_tasks(ens: MoDEEnsemble, tasks: Sequence[str], storage: StorageConfig, *,
                test: bool = True, actors: int | None = None) -> list[Scored]:
    """Every task's ``val/`` split (the ``ROUTING_GRID`` mixes) and, with ``test``, its test
    split (every row of the report, and the grid) in one streaming pass (``scoring.score``):
    images never reach this process, only tallies do."""
    infos = [task_info(uri, storage) for uri in dict.fromkeys(tasks)]   # each task once
    parts, plan = [], []
    for info in infos:
        splits = [s for s in (VAL_SPLIT, "test") if (s == "test" and test) or
                  (s == VAL_SPLIT and has_split(info.uri, storage, VAL_SPLIT))]
        for split in splits:
            mixes = grid_mixes(ens, info.classnames, info.templates)
            if split == "test":
                mixes = {**task_mixes(ens, info.classnames, info.templates), **mixes}
            parts.append(scoring.Part(info.uri, split, tuple(shards(info.uri, storage, split)),
                                      tuple(info.classnames), tuple(info.templates),
                                      tuple(mixes.values())))
            plan.append((info.name, split, mixes))
    tallies = scoring.score(ens.run.uri, ens.cfg, parts, storage, use_gpu=use_gpu(ens.cfg),
                            actors=actors)
    found: dict[str, dict[str, Any]] = {}
    for (name, split, mixes), t in zip(plan, tallies, strict=True):
        by_key = dict(zip(mixes, t, strict=True))
        if split == VAL_SPLIT:
            found.setdefault(name, {})["validation"] = {
                label: tally_accuracy(by_key[GRID + label]) for label in ROUTING_GRID}
            found[name]["val_images"] = int(t[0][:, 0].sum())
        else:
            found.setdefault(name, {}).update(mixes=mixes, tallies=by_key)
    return [Scored(info, **{"mixes": None, "tallies": None, "validation": None, **found.get(info.name, {})})
            for info in infos]


def _selection(scored: Sequence[Scored], log: Callable[[str], None]) -> dict[str, Any] | None:
    validation = {s.info.name: s.validation for s in scored if s.validation is not None}
    if not validation:
        return None
    selection = choose_routing(validation)
    log(f"[eval] routing chosen on the validation splits of {len(validation)} task(s): "
        f"{selection['chosen']} ({selection['mean'][selection['chosen']]:.1%} mean validation accuracy)")
    return {**selection, "images": sum(s.val_images for s in scored)}


def select_on_validation(ens: MoDEEnsemble, tasks: Sequence[str], storage: StorageConfig,
                         log: Callable[[str], None] = print) -> dict[str, Any] | None:
    """``choose_routing`` over the ``val/`` splits of ``tasks`` (None when none has one); reads
    no test split. ``images``: the validation images it scored."""
    return _selection(score_tasks(ens, tasks, storage, test=False), log)


def clip_benchmark_result(dataset: str, method: str, pretrained: str, t: np.ndarray) -> dict[str, Any]:
    """One method on one task as clip_benchmark's ``zeroshot_classification`` result file."""
    return {"dataset": dataset, "model": method, "pretrained": pretrained,
            "task": "zeroshot_classification", "metrics": clip_metrics(t), "language": "en"}


def clip_benchmark_name(dataset: str, method: str) -> str:
    """The result file's name, clip_benchmark's ``{dataset}_{model}_{language}_{task}.json``
    with the method's label made safe for a path."""
    slug = re.sub(r"[^A-Za-z0-9.=+-]+", "-", method).strip("-")
    return f"{dataset}_{slug}_en_zeroshot_classification.json"


def run(cfg: ConfigView, run: RunDir, upstream: dict[str, Any], log: Callable[[str], None] = print, *,
        tasks: Sequence[str], retrieval: str | None = None, truth: str | None = None) -> StageOutput:
    """Evaluate the run's experts and baselines; write ``eval/``."""
    ens = MoDEEnsemble(run.uri, cfg)
    report: dict[str, Any] = {"run": run.uri, "num_experts": ens.num_experts,
                              "generations": ens.generations,
                              "experts_before_last_generation": ens.levels[-2][1] if ens.generations else None,
                              "runs": sorted(ens.registry), "methods": METHODS, "zero_shot": {}}
    images = 0
    scored = score_tasks(ens, tasks, cfg.storage)
    selection = _selection(scored, log)
    if selection is not None:
        report["routing_selection"] = selection
        images += selection.pop("images")
    validated = selection["params"] if selection else None
    fs = run.fs
    results = run.stage_path(STAGE, "clip_benchmark")
    if fs.exists(results):
        fs.rm(results, recursive=True)
    for s in scored:
        info, tallies = s.info, dict(s.tallies)
        mixes = task_mixes(ens, info.classnames, info.templates, validated)
        if validated is not None:     # the chosen grid point, scored in the same pass
            tallies[VALIDATED] = tallies[GRID + selection["chosen"]]
        result = report["zero_shot"][info.name] = zero_shot_result(tallies, mixes, ens.num_experts)
        images += result["images"]
        for method in result["accuracy"]:
            if method != "oracle":
                write_bytes_atomic(fs, join(results, clip_benchmark_name(info.name, method)),
                                   json.dumps(clip_benchmark_result(info.name, method, run.uri,
                                                                    tallies[method])).encode())
        acc = result["accuracy"]
        log(f"[eval] {info.name}: {result['images']} images, {len(info.classnames)} classes; "
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
