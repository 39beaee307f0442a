"""Stage ``training_data``: the validated training samples, re-sharded by expert.

Every trainer reads its data many times over (one epoch after another), so the expensive parts
(validating images, joining each sample with its assignment) run once here. Output (README, "Run
directory")::

    training_data/expert_id=<e>/*.parquet   key: string, caption: string, image: binary,
                                            fine_id: int32, random_id: int32

``random_id`` is the sample's part in the random-split baseline: a seeded uniform partition with
the same expected sizes as the experts. Readers: ``expert_rows`` (an expert's samples plus a
seeded ``ooc_ratio`` share of the others), ``random_rows``, ``all_rows``. The manifest's
``stats.rows_per_run`` counts what each of those readers yields (``run_rows``), so a trainer
needs no counting pass of its own.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import ray.data
from ray.data import SaveMode

from pipeline import assign, ingest
from pipeline.cluster import key_rank
from pipeline.config import Config
from pipeline.embed import count_rows
from pipeline.rundir import RunDir, stage_hash
from pipeline.storage import pyarrow_filesystem

STAGE = "training_data"
COLUMNS = ["key", "caption", "image", "fine_id", "random_id"]
# Seeds of the two hash draws, offset from train.seed so they never coincide with the sample.
_RANDOM_SPLIT_SALT = 7_919
_OOC_SALT = 104_729


def random_parts(keys: Any, fractions: np.ndarray, seed: int) -> np.ndarray:
    """A seeded uniform partition of keys into len(fractions) parts of those expected shares."""
    u = key_rank(keys, seed + _RANDOM_SPLIT_SALT).astype(np.float64) / 2.0**64
    cuts = np.cumsum(fractions)[:-1] / np.sum(fractions)
    return np.searchsorted(cuts, u, side="right").astype(np.int32)


def _label(batch: pd.DataFrame, fractions: np.ndarray, seed: int) -> pd.DataFrame:
    out = batch.copy()
    assigned = out["expert_id"].notna()
    out["status"] = np.where(assigned, "", "not_assigned")
    out["random_id"] = random_parts(out["key"].to_numpy(), fractions, seed)
    out["fine_id"] = out["fine_id"].fillna(-1).astype(np.int32)
    out["expert_id"] = out["expert_id"].fillna(-1).astype(np.int32)
    return out


def ooc_mask(keys: Any, expert: int, ratio: float, seed: int) -> np.ndarray:
    """Which of ``keys`` (samples of other experts) expert ``expert`` also trains on: a seeded
    ``ratio`` share, a different draw per expert."""
    return key_rank(keys, seed + expert + _OOC_SALT) < np.uint64(int(ratio * 2**64))


def _counts(batch: pd.DataFrame) -> pd.DataFrame:
    return batch.groupby("status", as_index=False).size()


def _run_sizes(batch: pd.DataFrame, num_experts: int, ratio: float, seed: int) -> pd.DataFrame:
    """One row: the samples of this batch that each expert's and random part's reader yields."""
    batch = batch.loc[batch["status"] == ""]
    keys, expert, part = (batch[c].to_numpy() for c in ("key", "expert_id", "random_id"))
    sizes = {}
    for e in range(num_experts):
        own = expert == e
        ooc = ooc_mask(keys[~own], e, ratio, seed).sum() if ratio > 0 else 0
        sizes[f"expert-{e}"] = [int(own.sum() + ooc)]
        sizes[f"random-{e}"] = [int((part == e).sum())]
    return pd.DataFrame(sizes)


def _assigned(batch: pd.DataFrame) -> pd.DataFrame:
    return batch.loc[batch["status"] == "", [*COLUMNS, "expert_id"]]


def run_stage(cfg: Config, run: RunDir, data_uri: str, force: bool = False,
              log=print) -> dict[str, Any]:
    """Validate the shards' samples, join them with their assignment, write them by expert."""
    asg = run.manifest("assignments")
    if asg is None:
        raise FileNotFoundError(f"{run.stage_uri('assignments')} has no manifest: "
                                "run jobs/assign.py first")
    inputs = {"data": data_uri, "format": cfg.data.format, "assignments": asg["config_hash"]}
    config_hash = stage_hash(cfg, ("data", "train"), inputs)
    done = run.completed(STAGE, config_hash)
    if done and not force:
        log(f"[training_data] complete for this config ({run.stage_uri(STAGE)}): skipped")
        return done
    started = run.begin(STAGE)
    t0 = time.perf_counter()
    sizes = np.array([asg["stats"]["rows_per_expert"][str(e)]
                      for e in range(len(asg["stats"]["rows_per_expert"]))], np.float64)
    samples = ingest.read_samples(data_uri, cfg.data, cfg.storage).select_columns(
        ["key", "caption", "image", "skip_reason"]).materialize()
    reasons = samples.map_batches(_reason_counts, batch_format="pandas").to_pandas() \
        .groupby("skip_reason")["size"].sum().to_dict()
    rows_in = int(sum(reasons.values()))
    good = int(reasons.pop("", 0))
    parts = max(1, int(np.ceil(good / cfg.embed.rows_per_file)))
    labels = assign.read(run).select_columns(["key", "fine_id", "expert_id"])
    joined = ingest.good_rows(samples).drop_columns(["skip_reason"]) \
        .join(labels, join_type="left_outer", num_partitions=parts, on=("key",)) \
        .map_batches(_label, batch_format="pandas",
                     fn_kwargs={"fractions": sizes, "seed": cfg.train.seed}).materialize()
    status = joined.map_batches(_counts, batch_format="pandas").to_pandas() \
        .groupby("status")["size"].sum().to_dict()
    if status.get("not_assigned"):
        reasons["not_assigned"] = int(status["not_assigned"])
    joined.map_batches(_assigned, batch_format="pandas").write_parquet(
        run.stage_path(STAGE), filesystem=pyarrow_filesystem(run.fs), partition_cols=["expert_id"],
        mode=SaveMode.OVERWRITE)
    rows_out = count_rows(run, STAGE)
    per_expert = {str(e): count_rows(run, STAGE, f"expert_id={e}") for e in range(len(sizes))}
    per_run = joined.map_batches(_run_sizes, batch_format="pandas", fn_kwargs={
        "num_experts": len(sizes), "ratio": cfg.train.ooc_ratio, "seed": cfg.train.seed,
    }).to_pandas().sum().astype(int).to_dict()
    stats = {"rows_per_expert": per_expert, "rows_per_run": per_run,
             "ooc": {"ratio": cfg.train.ooc_ratio, "seed": cfg.train.seed},
             "seconds": round(time.perf_counter() - t0, 2)}
    return run.finish(STAGE, config_hash=config_hash, inputs=inputs, rows_in=rows_in,
                      rows_out=rows_out, rows_skipped=reasons, started_at=started, stats=stats)


def _reason_counts(batch: pd.DataFrame) -> pd.DataFrame:
    return batch.groupby("skip_reason", as_index=False).size()


def _read(run: RunDir, experts: list[int] | None = None,
          columns: list[str] | None = None) -> ray.data.Dataset:
    return assign.read_by_expert(run, STAGE, experts, columns)


def _expert_filter(batch: pa.Table, expert: int, ratio: float, seed: int) -> pa.Table:
    keys = batch.column("key").to_numpy(zero_copy_only=False)
    own = batch.column("expert_id").to_numpy(zero_copy_only=False) == expert
    return batch.filter(pa.array(own | ooc_mask(keys, expert, ratio, seed)))


def _random_part(batch: pa.Table, part: int) -> pa.Table:
    return batch.filter(pc.equal(batch.column("random_id"), part))


def all_rows(run: RunDir, columns: list[str] | None = None) -> ray.data.Dataset:
    """Every training sample (the seed and the dense baseline)."""
    return _read(run, None, columns)


def expert_rows(run: RunDir, expert: int, num_experts: int, ooc_ratio: float, seed: int,
                columns: list[str] | None = None) -> ray.data.Dataset:
    """Expert ``expert``'s samples plus a seeded ``ooc_ratio`` share of every other expert's
    (``columns`` must then include ``key``). One read of every partition and a filter, rather
    than two reads and a union: each read costs Ray Data a listing pass of its own."""
    if num_experts == 1 or ooc_ratio == 0:
        return _read(run, [expert], columns)
    read_columns = None if columns is None else list(dict.fromkeys([*columns, "expert_id"]))
    ds = _read(run, None, read_columns).map_batches(_expert_filter, batch_format="pyarrow", fn_kwargs={
        "expert": expert, "ratio": ooc_ratio, "seed": seed})
    return ds if columns is None or "expert_id" in columns else ds.drop_columns(["expert_id"])


def random_rows(run: RunDir, part: int, columns: list[str] | None = None) -> ray.data.Dataset:
    """Part ``part`` of the random split (the clustering-free baseline; ``columns`` must then
    include ``random_id``)."""
    return _read(run, None, columns).map_batches(_random_part, batch_format="pyarrow", fn_kwargs={"part": part})


def run_rows(run: RunDir, cfg: Config, kind: str, index: int | None) -> int | None:
    """Samples a run's reader yields, from this stage's manifest: all rows (``seed``, ``dense``),
    expert ``index``'s rows plus its out-of-cluster share (``expert``, when the manifest was
    written with this ``train.ooc_ratio`` and ``train.seed``), random part ``index``
    (``random_split``). None where the manifest does not say (a run directory written before
    ``rows_per_run`` existed): count the reader instead."""
    m = run.manifest(STAGE)
    if m is None:
        return None
    if kind in ("seed", "dense"):
        return int(m["rows_out"])
    per_run, ooc = m["stats"].get("rows_per_run"), m["stats"].get("ooc")
    if per_run is None:
        return None
    if kind == "expert":
        if ooc != {"ratio": cfg.train.ooc_ratio, "seed": cfg.train.seed}:
            return None
        return per_run.get(f"expert-{index}")
    return per_run.get(f"random-{index}")
