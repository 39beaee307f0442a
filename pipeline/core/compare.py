"""Do two run directories hold the same data-stage outputs? (docs/bad_input.md, "Killed jobs")

A job killed and rerun, or a run whose workers were killed under it (``jobs/chaos.py``), must
end with the outputs of an undisturbed run over the same shards and config:

- ``ingest``: the same good and skipped rows (key, caption, shard, position, reason);
- ``embeddings``: the same keys, once each; vectors within ``atol`` (1e-5: a batch made of other
  rows may round differently);
- ``clusters`` and ``assignments``: bit-identical whenever the embeddings are;
- ``training_data``: the same rows with the same images;
- every stage's manifest: the same rows in, out and skipped by reason.

``differences`` lists what differs, in words; an empty list means the runs agree.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

DATA_STAGES = ("ingest", "embeddings", "clusters", "assignments", "training_data")


def _table(folder: Path, order: list[str]) -> pd.DataFrame:
    return pd.read_parquet(folder).sort_values(order).reset_index(drop=True)


def _frames_differ(a: pd.DataFrame, b: pd.DataFrame) -> str:
    try:
        pd.testing.assert_frame_equal(a, b, check_dtype=False)
    except AssertionError as e:
        return str(e).strip().splitlines()[0][:200]
    return ""


def differences(run: str | Path, reference: str | Path, stages: tuple[str, ...] = DATA_STAGES,
                atol: float = 1e-5) -> list[str]:
    """What differs between the data stages of two local run directories."""
    run, ref = Path(run), Path(reference)
    found: list[str] = []
    for stage in stages:
        manifests = [d / stage / "_manifest.json" for d in (run, ref)]
        if not all(m.exists() for m in manifests):
            found.append(f"{stage}: no manifest in {[str(m.parent) for m in manifests if not m.exists()]}")
            continue
        a, b = (json.loads(m.read_text()) for m in manifests)
        counts = ("rows_in", "rows_out", "rows_skipped")
        if [a[c] for c in counts] != [b[c] for c in counts]:
            found.append(f"{stage}: manifest counts {[a[c] for c in counts]} != {[b[c] for c in counts]}")
    if found:
        return found
    exact = True
    if "ingest" in stages:
        for part in ("samples", "skipped"):
            if (ref / "ingest" / part).exists():
                why = _frames_differ(_table(run / "ingest" / part, ["shard", "pos"]),
                                     _table(ref / "ingest" / part, ["shard", "pos"]))
                if why:
                    found.append(f"ingest/{part}: {why}")
    if "embeddings" in stages:
        e, e0 = (_table(d / "embeddings", ["key"]) for d in (run, ref))
        if not e.key.is_unique:
            found.append("embeddings: a key twice")
        if e.key.tolist() != e0.key.tolist():
            found.append("embeddings: other keys")
        else:
            x, x0 = np.stack(e.embedding), np.stack(e0.embedding)
            gap = float(np.abs(x - x0).max())
            if gap > atol:
                found.append(f"embeddings: vectors differ by up to {gap:.2e} (> {atol:g})")
            exact = bool(np.array_equal(x, x0))
    if "clusters" in stages and exact:
        for f in sorted(p.name for p in (ref / "clusters").iterdir() if p.suffix == ".npy"):
            if not np.array_equal(np.load(run / "clusters" / f), np.load(ref / "clusters" / f)):
                found.append(f"clusters/{f}: not bit-identical (the embeddings are)")
    if "assignments" in stages and exact:
        why = _frames_differ(_table(run / "assignments", ["key"]), _table(ref / "assignments", ["key"]))
        if why:
            found.append(f"assignments: {why}")
    if "training_data" in stages:
        t, t0 = (_table(d / "training_data", ["key"]) for d in (run, ref))
        cols = list(t0.columns) if exact else ["key", "caption", "image", "random_id"]
        if not t.key.is_unique:
            found.append("training_data: a key twice")
        why = _frames_differ(t[cols], t0[cols])
        if why:
            found.append(f"training_data: {why}")
    return found
