"""How stable the clustering is: the fit repeated for several k-means seeds on a run's
embeddings, each expert's domain purity on a demo world's clean pairs (docs/clustering.md).

A bad draw of initial centres can merge two domains into one expert and split another across
two; an expert's purity (the share of its clean pairs from its largest domain) shows the merge.
Noisy pairs are left out of purity: a mismatched pair carries another domain's caption, and
the clustering, which reads captions only, rightly follows the caption. ``noisy_split`` says how
they went. Nothing here changes the run: the refits live in memory, the table in
``experiment/cluster_stability.{json,md}``.
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd
import ray.data

from pipeline.clustering import kmeans_ray
from pipeline.core.config import Config
from pipeline.core.rundir import RunDir
from pipeline.core.storage import filesystem, pyarrow_filesystem, write_bytes_atomic


def purity(assigned: pd.DataFrame, truth: pd.DataFrame) -> pd.DataFrame:
    """Per expert: its clean training pairs, their largest domain and that domain's share.

    Args:
        assigned: ``key``, ``expert_id`` of every assigned sample.
        truth: the demo world's ``truth.parquet`` (``key``, ``split``, ``domain``, ``noise``).
    """
    clean = truth.loc[(truth["split"] == "train") & (truth["noise"] == "clean"), ["key", "domain"]]
    merged = assigned.merge(clean, on="key")
    counts = pd.crosstab(merged["expert_id"], merged["domain"])
    return pd.DataFrame({"expert_id": counts.index.astype(int), "clean_pairs": counts.sum(axis=1).to_numpy(),
                         "domain": counts.idxmax(axis=1).to_numpy(),
                         "purity": (counts.max(axis=1) / counts.sum(axis=1)).to_numpy()})


def noisy_split(assigned: pd.DataFrame, truth: pd.DataFrame, owners: pd.DataFrame) -> dict[str, Any]:
    """Where the noisy pairs went, by kind: the share landing with the expert whose largest
    domain is their caption's domain, and the share landing with their image's domain's."""
    noisy = truth.loc[(truth["split"] == "train") & (truth["noise"] != "clean")]
    m = assigned.merge(noisy, on="key").merge(owners[["expert_id", "domain"]].rename(
        columns={"domain": "owner"}), on="expert_id")
    out = {}
    for kind, g in m.groupby("noise"):
        out[str(kind)] = {"pairs": len(g), "with_caption_domain": float((g["owner"] == g["caption_domain"]).mean()),
                          "with_image_domain": float((g["owner"] == g["domain"]).mean())}
    return out


def study(cfg: Config, run: RunDir, seeds: Sequence[int], truth_uri: str,
          log: Callable[[str], None] = print) -> dict[str, Any]:
    """Refit the clusters of ``run`` (config ``cfg.cluster``, seed replaced) for every seed in
    ``seeds``, assign every embedded row as the ``assignments`` stage does, and measure purity."""
    fs, path = filesystem(truth_uri, cfg.storage)
    truth = pd.read_parquet(io.BytesIO(fs.cat_file(path)))
    ds = ray.data.read_parquet(run.stage_uri("embeddings"), filesystem=pyarrow_filesystem(run.fs)).materialize()
    n = ds.count()
    rows = []
    for seed in seeds:
        c = dataclasses.replace(cfg.cluster, seed=seed)
        level = kmeans_ray.fit_level(ds, n, c, c.fine_k, c.num_experts, log=lambda *_: None)
        assigned = kmeans_ray.assign_dataset(ds, n, level.fine_centroids, level.fine_to_expert, c) \
            .select_columns(["key", "expert_id"]).to_pandas()
        table = purity(assigned, truth)
        rows.append({"seed": seed, "objective": level.stats["objective"],
                     "coarse_objective": level.stats["coarse_objective"],
                     "experts": table.to_dict("records"), "min_purity": float(table["purity"].min()),
                     "noisy": noisy_split(assigned, truth, table)})
        log(f"[stability] seed {seed}: purity " + ", ".join(
            f"{r.domain} {r.purity:.3f}" for r in table.itertuples()) + f" (min {table['purity'].min():.3f})")
    return {"rows": n, "fine_k": cfg.cluster.fine_k, "num_experts": cfg.cluster.num_experts,
            "restarts": cfg.cluster.restarts, "balanced_coarse": cfg.cluster.balanced_coarse,
            "capacity_slack": cfg.cluster.capacity_slack, "coarse_restarts": cfg.cluster.coarse_restarts,
            "seeds": rows, "min_purity": min(r["min_purity"] for r in rows)}


def markdown(result: dict[str, Any]) -> str:
    """The purity table: a row per seed, a column per expert (its largest domain and purity)."""
    m = result["num_experts"]
    lines = [f"Clean-pair domain purity of each expert over {len(result['seeds'])} k-means seeds "
             f"({result['rows']:,} rows, {result['fine_k']} fine centres, {m} experts, "
             f"{result['restarts']} restart(s) of the fine level, capacity slack {result['capacity_slack']}, "
             f"{result['coarse_restarts']} of the coarse level):", "",
             "| seed | " + " | ".join(f"expert {e}" for e in range(m)) + " | min |",
             "|---|" + "---|" * (m + 1)]
    for r in result["seeds"]:
        cells = [f"{e['domain']} {e['purity']:.3f}" for e in r["experts"]]
        lines.append(f"| {r['seed']} | " + " | ".join(cells) + f" | {r['min_purity']:.3f} |")
    lines += ["", f"Minimum over seeds and experts: **{result['min_purity']:.3f}**.", ""]
    kinds = sorted({k for r in result["seeds"] for k in r["noisy"]})
    if kinds:
        lines.append("Noisy pairs (left out above), share with the expert of their caption's "
                     "domain / of their image's domain, mean over seeds:")
        for k in kinds:
            got = [r["noisy"][k] for r in result["seeds"] if k in r["noisy"]]
            cap = sum(g["with_caption_domain"] for g in got) / len(got)
            img = sum(g["with_image_domain"] for g in got) / len(got)
            lines.append(f"- {k} ({got[0]['pairs']} pairs): {cap:.2f} / {img:.2f}")
    return "\n".join(lines) + "\n"


def write(run: RunDir, result: dict[str, Any]) -> str:
    """``experiment/cluster_stability.json`` and ``.md`` in the run directory; returns the md's URI."""
    folder = run.stage_uri("experiment")
    write_bytes_atomic(run.fs, f"{run.stage_path('experiment')}/cluster_stability.json",
                       json.dumps(result, indent=1).encode())
    write_bytes_atomic(run.fs, f"{run.stage_path('experiment')}/cluster_stability.md",
                       markdown(result).encode())
    return f"{folder}/cluster_stability.md"
