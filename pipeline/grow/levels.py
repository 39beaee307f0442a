"""The numbering of generations' levels: which expert ids and fine ids each generation owns.

A generation that adds experts (docs/growth.md, "Numbering") needs the next expert ids and fine
ids of the run. Two ``add_experts`` jobs may reach that point at once, so the ids are not read
off the generations that happen to be finished: each generation *claims* its level with one
write-once file, ``generations/_levels/<number>.json`` holding its name, its number of experts
and of fine centres. Claim ``k`` is created only when claims ``1..k-1`` exist (the writer lists
them, then creates ``k`` if nobody did first: ``storage.create_json``, a link locally and a
conditional PUT on S3), so the claims are a gapless sequence, and a generation's first ids are
the original level's counts plus the sizes claimed before it. Nothing is locked: a job killed
after claiming finds its own claim when rerun.

Leaf module: no stage imports it through another (``clusters`` and ``growth`` both read it).
"""

from __future__ import annotations

from typing import Any

from pipeline.core.rundir import RunDir, now
from pipeline.core.storage import create_json, join, read_json

FOLDER = "_levels"  # below generations/; a generation's name cannot start with "_"


class LevelClash(ValueError):
    """A generation asks for another level size than the one it claimed."""


def _folder(run: RunDir) -> str:
    return join(run.path, "generations", FOLDER)


def claims(run: RunDir) -> list[dict[str, Any]]:
    """Every claim of the run directory (the root), in claim order, each with its ``number``."""
    folder = _folder(run)
    run.fs.invalidate_cache(folder)     # s3fs caches listings: other jobs claim here too
    if not run.fs.exists(folder):
        return []
    found = []
    for path in run.fs.ls(folder, detail=False):
        stem = path.rsplit("/", 1)[-1]
        if stem.endswith(".json") and stem[:-5].isdigit():   # not a temporary file
            found.append({**read_json(run.fs, path), "number": int(stem[:-5])})
    return sorted(found, key=lambda c: c["number"])


def offsets(found: list[dict[str, Any]], base_experts: int, base_fine: int) -> dict[str, tuple[int, int]]:
    """(first expert id, first fine id) of each claimed generation, by name."""
    out, e, f = {}, base_experts, base_fine
    for c in found:
        out[c["generation"]] = (e, f)
        e, f = e + c["experts"], f + c["fine_centres"]
    return out


def claim(run: RunDir, generation: str, experts: int, fine_centres: int,
          base_experts: int, base_fine: int) -> tuple[int, int]:
    """Claim ``experts`` expert ids and ``fine_centres`` fine ids for ``generation`` (or find
    its earlier claim) and return (first expert id, first fine id)."""
    while True:
        found = claims(run)
        mine = [c for c in found if c["generation"] == generation]
        if mine:
            c = mine[0]
            if (c["experts"], c["fine_centres"]) != (experts, fine_centres):
                raise LevelClash(
                    f"generation {generation!r} claimed {c['experts']} expert(s) and "
                    f"{c['fine_centres']} fine centres (claim {c['number']}); its level now has "
                    f"{experts} and {fine_centres}: a generation's ids are fixed once claimed, add "
                    "the data again under another --name")
            return offsets(found, base_experts, base_fine)[generation]
        number = found[-1]["number"] + 1 if found else 1
        entry = {"generation": generation, "experts": experts, "fine_centres": fine_centres,
                 "claimed_at": now()}
        if create_json(run.fs, join(_folder(run), f"{number:06d}.json"), entry):
            return offsets([*found, {**entry, "number": number}], base_experts, base_fine)[generation]
        # another job took this number first: list again, our ids come after its level
