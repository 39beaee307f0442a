"""Several training seeds of one clustering: the paper's comparison, every method's spread and
paired differences, with what each method cost to train.

``jobs/experiment.py`` trains S training seeds (``train.seed`` = the run's, then the next ones)
of every run of the paper's comparison (``pipeline.training.runs.ALL_BASELINES``: the seed model, the
experts, full-0 .. full-<m-1>, the random split, dense-matched) and evaluates each seed's runs.
Each seed lives in a replica of the run directory (``experiment/seed-<s>/``,
``RunDir.replica``) that reads the run's own data stages: one ingest, one embedding, one
clustering, one assignment and one ``training_data`` for all seeds. ``train.data_seed`` is not
varied, so the random split's parts and each expert's out-of-cluster draw are the same in every
seed; what a seed changes is the model's initialisation and the order of the data. The runs of
the run's own seed are not trained again: where the run directory holds them complete with the
same hash, the replica adopts their manifests (their checkpoints stay where they are).

Writes ``experiment/`` in the run directory (docs/experiment.md)::

    experiment/results.json   per task and method: mean, sd and every seed's accuracy; each
                              method's training cost; paired differences (``comparisons``) with
                              95% t intervals over seeds
    experiment/results.md     the same as tables
    experiment/seeds.png      mean accuracy with error bars (sd over seeds) and every seed's point
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from pipeline.core import stages
from pipeline.core.config import Config, load_config
from pipeline.core.rundir import MANIFEST, RunDir
from pipeline.core.storage import filesystem, join, write_bytes_atomic
from pipeline.data import demo_world
from pipeline.evaluation import eval as evaluation
from pipeline.training import checkpoints
from pipeline.training.runs import ALL_BASELINES, plan, run_name, seed_job

Log = Callable[[str], None]
FOLDER = "experiment"
MEAN = "mean"       # the pseudo-task: the mean over the headline tasks
MoDE = (evaluation.DEFAULT_METHOD, evaluation.VALIDATED)


def comparisons(methods: Sequence[str]) -> list[tuple[str, str]]:
    """(method, baseline) pairs whose per-seed differences the tables give, those the reports
    hold: MoDE (the authors' routing and the validated one) against the paper's dense baseline,
    its equal-cost Full-n, the random split, routing by the coarse centres, OneStep; then against
    the questions the paper does not ask (one model for MoDE's whole budget, uniform weights)."""
    full = sorted(m for m in methods if m.startswith("Full-"))
    one = sorted(m for m in methods if m.startswith("OneStep-"))
    bases = [evaluation.PAPER_DENSE, *full, evaluation.RANDOM_SPLIT, evaluation.COARSE, *one,
             evaluation.DENSE_MATCHED, "uniform"]
    return [(m, b) for m in MoDE for b in bases if m in methods and b in methods]


# Rows of the tables and the plot, in this order (others, like single experts, are in the JSON).
SHOWN = [evaluation.DEFAULT_METHOD, evaluation.VALIDATED, evaluation.PAPER_FORMULA,
         "routed (T=1)", "routed top-1", "uniform", evaluation.COARSE, "OneStep-*", "oracle",
         evaluation.PAPER_DENSE, "Full-*", evaluation.RANDOM_SPLIT, evaluation.DENSE_MATCHED, "seed"]


def seed_config(cfg: Config, seed: int) -> Config:
    return load_config(cfg.to_dict(), [f"train.seed={seed}"])


def adopt(cfg: Config, run: RunDir, replica: RunDir, baselines: Sequence[str] = ALL_BASELINES,
          log: Log = print) -> list[str]:
    """Copy into ``replica`` the manifests of the run's complete training runs that ``cfg``
    would train there with the same hash (the run's own seed): they are not trained again."""
    adopted = []
    jobs = [seed_job(cfg.train), *plan(cfg.train, checkpoints.num_experts(run), baselines=baselines)]
    for job in jobs:        # the seed first: the others' hashes read the adopted seed's
        if replica.manifest(job.unit) or not run.manifest(job.unit):
            continue
        try:
            theirs = stages.StageRun(job.unit, cfg, run)
            ours = stages.StageRun(job.unit, cfg, replica)
        except (stages.MissingUpstream, stages.StaleUpstream):
            continue        # made with another config, or the replica's seed is not theirs
        if theirs.completed() is not None and ours.config_hash == theirs.config_hash:
            replica.fs.pipe_file(replica.stage_path(job.unit, MANIFEST),
                                 run.fs.cat_file(run.stage_path(job.unit, MANIFEST)))
            adopted.append(job.name)
    if adopted:
        log(f"[experiment] seed {cfg.train.seed}: the run's own {', '.join(adopted)} adopted")
    return adopted


Replicas = dict[int, tuple[Config, RunDir]]     # training seed -> (its config, its replica)


def replicas(cfg: Config, run: RunDir, seeds: Sequence[int],
             baselines: Sequence[str] = ALL_BASELINES, log: Log = print) -> Replicas:
    """Each seed's config and replica (``experiment/seed-<s>/``, its config written); the run's
    own seed adopts the run's complete runs."""
    out = {}
    for seed in seeds:
        scfg = seed_config(cfg, seed)
        replica = run.replica(f"seed-{seed}")
        replica.write_config(scfg)
        if seed == cfg.train.seed:
            adopt(scfg, run, replica, baselines, log)
        out[seed] = (scfg, replica)
    return out


def seed_queue(reps: Replicas, experts: int,
               baselines: Sequence[str] = ALL_BASELINES) -> list[checkpoints.Launch]:
    """Every run of every seed for one ``launch_many``: each seed model, and each seed's
    experts and baselines after that seed's own seed model (labels
    ``seed-<s>/<run>``). A seed model gets the torch threads a seed model alone would get
    (``checkpoints.seed_threads``), shared with the runs it trains beside."""
    cfg = next(iter(reps.values()))[0]
    pending = sum(stages.StageRun(seed_job(scfg.train).unit, scfg, replica).completed() is None
                  for scfg, replica in reps.values())
    at_once = max(1, min(pending, cfg.train.max_concurrent))
    threads = max(cfg.train.threads_per_worker, checkpoints.seed_threads(cfg.train) // at_once)
    runs = []
    for seed, (scfg, replica) in reps.items():
        seed_label = f"seed-{seed}/seed"
        runs.append(checkpoints.Launch(scfg, replica, seed_job(scfg.train), seed_label, threads=threads))
        runs += [checkpoints.Launch(scfg, replica, job, f"seed-{seed}/{job.name}", after=seed_label)
                 for job in plan(scfg.train, experts, baselines=baselines)]
    return runs


def train_seeds(cfg: Config, run: RunDir, seeds: Sequence[int],
                baselines: Sequence[str] = ALL_BASELINES, log: Log = print) -> Replicas:
    """Train (or skip, or adopt) every run of every seed in one queue (``seed_queue``),
    ``train.max_concurrent`` at once: the seed models first, then each seed's other runs,
    longest first, as soon as that seed's own seed model has finished. One queue keeps a
    cluster as full as the runs allow (seeds do not wait for each other) and, on a small
    machine, leaves no slot idle while a last seed model trains alone."""
    reps = replicas(cfg, run, seeds, baselines, log)
    runs = seed_queue(reps, checkpoints.num_experts(run), baselines)
    _, failed = checkpoints.launch_many(runs, cfg.train.max_concurrent, log=log)
    if failed:
        raise RuntimeError(f"runs failed: {failed} (rerun the job: finished runs are skipped, "
                           "interrupted ones resume)")
    return reps


def evaluate(scfg: Config, replica: RunDir, eval_inputs: dict[str, Any],
             log: Log = print) -> dict[str, Any]:
    """One seed's runs evaluated in its replica (skipped when complete); its report."""
    stages.run_stage("eval", scfg, replica, log=log, **eval_inputs)
    return evaluation.load_report(replica)


def headline_tasks(tasks: Sequence[str], truth_uri: str | None, cfg: Config) -> list[str]:
    """The tasks the headline mean is over: a demo world's training domains (its held-out domain
    has no expert before a run grows; the world is the one whose ``truth.parquet`` the eval
    inputs found), else every task. Task names, not URIs."""
    names = [t.rstrip("/").rsplit("/", 1)[-1] for t in tasks]
    if truth_uri:
        fs, path = filesystem(truth_uri.rsplit("/", 1)[0], cfg.storage)
        if fs.exists(join(path, "world.json")):
            known = json.loads(fs.cat_file(join(path, "world.json")))["train_domains"]
            return [n for n in names if n in known]
    return names


# ----------------------------------------------------------------------------- statistics
def t_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The ``level`` t interval of the mean of ``values`` (nan with fewer than two)."""
    n = len(values)
    if n < 2:
        return float("nan"), float("nan")
    half = stats.t.ppf(0.5 + level / 2, n - 1) * values.std(ddof=1) / np.sqrt(n)
    return float(values.mean() - half), float(values.mean() + half)


def accuracies(reports: dict[int, dict[str, Any]], headline: Sequence[str]) -> pd.DataFrame:
    """Accuracy (%) by (seed, task, method), with the ``MEAN`` pseudo-task over ``headline``."""
    rows = []
    for seed, report in reports.items():
        for task, r in report["zero_shot"].items():
            rows += [(seed, task, m, 100 * a) for m, a in r["accuracy"].items()]
    df = pd.DataFrame(rows, columns=["seed", "task", "method", "accuracy"])
    mean = df[df.task.isin(headline)].groupby(["seed", "method"], as_index=False)["accuracy"].mean()
    return pd.concat([df, mean.assign(task=MEAN)], ignore_index=True)


def summarise(reports: dict[int, dict[str, Any]], headline: Sequence[str]) -> dict[str, Any]:
    """Per task and method: mean, sd and every seed's value; per comparison and task: the paired
    differences' mean, sd, 95% interval and what it says."""
    seeds = sorted(reports)
    acc = accuracies(reports, headline)
    wide = acc.pivot_table(index=["task", "method"], columns="seed", values="accuracy")
    table = {}
    for (task, method), row in wide.iterrows():
        v = row[seeds].to_numpy(float)
        table.setdefault(task, {})[method] = {
            "mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else float("nan"),
            "seeds": {str(s): float(x) for s, x in zip(seeds, v, strict=True)}}
    diffs = {}
    for method, base in comparisons(list(table.get(MEAN, {}))):
        label = f"{method} - {base}"
        for task, methods in table.items():
            if method not in methods or base not in methods:
                continue
            d = np.array([methods[method]["seeds"][str(s)] - methods[base]["seeds"][str(s)] for s in seeds])
            low, high = t_interval(d)
            verdict = ("above" if low > 0 else "below" if high < 0 else "within noise") \
                if len(d) > 1 else "one seed"
            diffs.setdefault(label, {})[task] = {
                "mean": float(d.mean()), "sd": float(d.std(ddof=1)) if len(d) > 1 else float("nan"),
                "ci95": [low, high], "seeds": {str(s): float(x) for s, x in zip(seeds, d, strict=True)},
                "verdict": verdict}
    chosen = {str(s): r.get("routing_selection", {}).get("chosen") for s, r in reports.items()}
    # samples trained are the same in every seed (the schedule decides them): the first's
    cost = reports[seeds[0]].get("method_cost", {})
    return {"seeds": seeds, "headline_tasks": list(headline), "accuracy": table,
            "cost": cost, "differences": diffs, "validated_choice": chosen}


def diagnostics(reports: dict[int, dict[str, Any]], entries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Where MoDE's difference to the dense baseline comes from, in numbers (docs/results.md):

    - ``own_domain``: each expert's accuracy on the task of the domain it holds most of, minus
      the paper's dense baseline's (``full-0``) on that task, per seed (the paper's premise: a
      specialist beats the generalist on its own data), with the 95% interval;
    - ``epochs``: how many times each run passed over its data (samples trained on / rows);
    - ``same_domain_pairs``: the chance that two samples of a run's data share a true domain, the
      share of in-batch negatives from the same domain (the paper's harder negatives).

    Needs reports with a ``confusion`` table (a demo world's true domains); {} otherwise."""
    first = reports[min(reports)]
    confusion = first.get("confusion")
    if not confusion:
        return {}
    counts = pd.DataFrame(confusion).fillna(0)            # expert x domain
    counts.index = counts.index.astype(int)
    share = counts.div(counts.sum(axis=1), axis=0)
    overall = counts.sum() / counts.to_numpy().sum()
    out: dict[str, Any] = {"own_domain": {}, "epochs": {}, "same_domain_pairs": {}}
    for e, row in counts.iterrows():
        domain = str(row.idxmax())
        name = run_name("expert", e)
        out["same_domain_pairs"][name] = float((share.loc[e] ** 2).sum())
        if evaluation.PAPER_DENSE in first["zero_shot"].get(domain, {}).get("accuracy", {}):
            d = np.array([100 * (r["zero_shot"][domain]["accuracy"][name]
                                 - r["zero_shot"][domain]["accuracy"][evaluation.PAPER_DENSE])
                          for r in reports.values()])
            out["own_domain"][name] = {"domain": domain, "mean": float(d.mean()), "ci95": list(t_interval(d)),
                                       "seeds": [float(x) for x in d]}
    out["same_domain_pairs"]["all data (seed, full, random split)"] = float((overall ** 2).sum())
    seed_end = entries["seed"]["metrics"]["samples_seen"] if "seed" in entries else 0
    for name, e in sorted(entries.items()):
        trained = e["metrics"]["samples_seen"] - (0 if e["kind"] == "seed" else seed_end)
        out["epochs"][name] = round(trained / e["samples"], 2) if e.get("samples") else None
    out["seeds"] = sorted(reports)
    return out


def negatives(truth: pd.DataFrame, assigned: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Same-image-content negatives (``demo_world.same_content_negatives``: the chance that
    image j holds the concept caption i names, for two samples of a run's data) for each
    expert's data (its cluster's rows; its small out-of-cluster share left out) and for all the
    data (what the seed, ``full-<i>`` and dense-matched read), with the part beyond caption
    collisions (the rate if every image held only the concept its caption names): the false
    negatives that images with several concepts add, which the paper says clustering removes.

    ``truth``: truth.parquet of a demo world; ``assigned``: key and expert_id of the run's
    training rows."""
    rows = assigned[["key", "expert_id"]].merge(truth, on="key", how="inner")
    blank = pd.Series("", index=rows.index)
    named = rows["caption_label"] != ""
    single = rows.assign(fg_domain=rows["caption_domain"].where(named, ""),
                         fg_label=rows["caption_label"].where(named, ""), bg_domain=blank, bg_label=blank)

    def rates(mask: pd.Series) -> dict[str, float]:
        rate = demo_world.same_content_negatives(rows[mask])
        return {"rate": rate, "beyond_collisions": rate - demo_world.same_content_negatives(single[mask])}

    out = {run_name("expert", int(e)): rates(rows["expert_id"] == e)
           for e in sorted(rows["expert_id"].unique())}
    out["all data (seed, full-i, dense-matched)"] = rates(pd.Series(True, index=rows.index))
    return out


def _order(methods: Sequence[str]) -> list[str]:
    out = []
    for shown in SHOWN:
        if shown.endswith("-*"):
            out += sorted(m for m in methods if m.startswith(shown[:-1]))
        elif shown in methods:
            out.append(shown)
    return out


def markdown(summary: dict[str, Any]) -> str:
    seeds, acc = summary["seeds"], summary["accuracy"]
    tasks = [MEAN, *sorted(t for t in acc if t != MEAN)]
    cols = {t: {m: f"{v['mean']:.1f} ± {v['sd']:.1f}" for m, v in acc[t].items()} for t in tasks}
    table = pd.DataFrame(cols).loc[_order(acc[MEAN])]
    table = evaluation.with_cost(table, {"method_cost": summary.get("cost")})
    per_seed = pd.DataFrame({f"seed {s}": {m: acc[MEAN][m]["seeds"][str(s)] for m in table.index}
                             for s in seeds}).round(1)
    headline, by_task = {}, {}
    for label, results in summary["differences"].items():
        for task in tasks:
            if task in results:
                d = results[task]
                row = {"task": task, "mean": f"{d['mean']:+.1f}",
                       "95% interval": f"[{d['ci95'][0]:+.1f}, {d['ci95'][1]:+.1f}]",
                       "per seed": ", ".join(f"{x:+.1f}" for x in d["seeds"].values()),
                       "verdict": d["verdict"]}
                (headline if task == MEAN else by_task)[(label, task)] = row
    choices = ", ".join(f"seed {s}: {c}" for s, c in summary["validated_choice"].items())
    return "\n".join([
        f"# MoDE over {len(seeds)} training seeds ({', '.join(map(str, seeds))})", "",
        "One clustering, one data split (`train.data_seed`); each seed changes the models' "
        "initialisation and data order. Zero-shot accuracy (%), mean ± sd over seeds; "
        f"`{MEAN}` is over {', '.join(summary['headline_tasks'])}. `samples`: what the method's "
        "models trained on, the seed's included; `x dense`: that over the paper's dense baseline "
        f"`{evaluation.PAPER_DENSE}`.", "",
        evaluation._markdown(table.rename_axis("method")), "",
        f"## Every seed, `{MEAN}`", "", evaluation._markdown(per_seed.rename_axis("method")), "",
        "## Paired differences (points), 95% t interval over seeds", "",
        "Per seed, the method minus the baseline on the same seed's runs. `above`/`below`: the "
        f"interval excludes 0; `within noise`: it does not. On `{MEAN}`:", "",
        _differences(headline), "", "Per task:", "", _differences(by_task), "",
        f"Routing chosen on validation: {choices}.", "",
        *_diagnostics_markdown(summary.get("diagnostics") or {})])


def _differences(rows: dict[tuple[str, str], dict[str, str]]) -> str:
    diffs = pd.DataFrame.from_dict(rows, orient="index")
    diffs.index = [label for label, _ in diffs.index]
    return evaluation._markdown(diffs.rename_axis("method - baseline"))


def _diagnostics_markdown(diag: dict[str, Any]) -> list[str]:
    if not diag:
        return []
    own = pd.DataFrame({n: {"domain": d["domain"], "expert - dense (full-0)": f"{d['mean']:+.1f}",
                            "95% interval": f"[{d['ci95'][0]:+.1f}, {d['ci95'][1]:+.1f}]",
                            "per seed": ", ".join(f"{x:+.1f}" for x in d["seeds"])}
                        for n, d in diag["own_domain"].items()}).T
    pairs = pd.DataFrame({"same-domain pairs": diag["same_domain_pairs"]}).round(3)
    epochs = pd.DataFrame({"epochs": diag["epochs"]})
    content = []
    if diag.get("same_content_negatives"):
        table = pd.DataFrame(diag["same_content_negatives"]).T.round(4)
        content = ["Same-image-content negatives: the chance that image j holds the concept caption "
                   "i names, for two samples of a run's data, and the part beyond two captions "
                   "naming the same concept (what images of several concepts add):", "",
                   evaluation._markdown(table.rename_axis("data"), digits=4), ""]
    return ["## Where the difference comes from (docs/results.md)", "",
            f"Each expert on the task of the domain it holds, minus {evaluation.PAPER_DENSE} on "
            "that task (points):", "",
            evaluation._markdown(own.rename_axis("expert")), "",
            "The chance that two samples of a run's data share a true domain (in-batch negatives "
            "of the same domain):", "", evaluation._markdown(pairs.rename_axis("data"), digits=3), "",
            *content,
            "Passes over its own data per run (the same in every seed):", "",
            evaluation._markdown(epochs.rename_axis("run"), digits=2), ""]


def plot(summary: dict[str, Any]) -> bytes:
    import matplotlib  # late import: only the summary plots

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = summary["accuracy"]
    tasks = [MEAN, *sorted(t for t in acc if t != MEAN)]
    methods = _order(acc[MEAN])
    fig, ax = plt.subplots(figsize=(max(7, 1.9 * len(tasks)), 4.5))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        x = np.arange(len(tasks)) + i * width
        mean = [acc[t][m]["mean"] if m in acc[t] else np.nan for t in tasks]
        sd = [acc[t][m]["sd"] if m in acc[t] else np.nan for t in tasks]
        ax.bar(x, mean, width, yerr=sd, capsize=2, label=m)
        for xi, t in zip(x, tasks, strict=True):
            if m in acc[t]:
                pts = list(acc[t][m]["seeds"].values())
                ax.plot([xi] * len(pts), pts, ".", color="black", markersize=3)
    ax.set_xticks(np.arange(len(tasks)) + 0.4 - width / 2, tasks)
    ax.set_ylabel("zero-shot accuracy (%)")
    ax.set_title(f"mean ± sd over {len(summary['seeds'])} training seeds (dots: each seed)")
    ax.legend(fontsize=7, ncol=3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def write(run: RunDir, summary: dict[str, Any]) -> str:
    """``experiment/results.{json,md}`` and ``seeds.png``; returns the markdown."""
    text = markdown(summary)
    write_bytes_atomic(run.fs, run.stage_path(FOLDER, "results.json"),
                       (json.dumps(summary, indent=2) + "\n").encode())
    write_bytes_atomic(run.fs, run.stage_path(FOLDER, "results.md"), text.encode())
    write_bytes_atomic(run.fs, run.stage_path(FOLDER, "seeds.png"), plot(summary))
    return text
