"""The add_experts step: checks, a generation's stages in order, its new experts' training.

``jobs/add_experts.py`` and the demo call ``add_experts`` (or ``prepare``, then launch the new
experts with other runs). The stages themselves are declared in
``pipeline.core.stages.GENERATION_STAGES`` and the growth-specific ones live in
``pipeline/grow/growth.py``; docs/growth.md explains the whole.
"""

from __future__ import annotations

from typing import Any

from pipeline.core import stages
from pipeline.core.config import Config
from pipeline.core.rundir import RunDir, check_generation_name, now
from pipeline.core.storage import read_json, write_json_atomic
from pipeline.training import checkpoints
from pipeline.training.runs import Job


class GrowError(ValueError):
    """add_experts cannot start: the message names the problem; nothing was written."""


MARKER = "generation.json"


def check(cfg: Config, run: RunDir, name: str, data: str) -> None:
    """Everything add_experts needs, checked before it writes anything (``GrowError``)."""
    try:
        check_generation_name(name)
    except ValueError as e:
        raise GrowError(str(e)) from None
    embedded = run.manifest("embeddings")
    if embedded is not None and embedded["stats"]["model"] != cfg.embed.model:
        raise GrowError(f"new data must be embedded with the run's encoder: {run.uri} was embedded "
                        f"with {embedded['stats']['model']} ({embedded['stats']['dim']}-d), the "
                        f"config asks for {cfg.embed.model}; drop --set embed.model")
    try:
        seed = stages.StageRun("checkpoints/seed", cfg, run)
    except (stages.MissingUpstream, stages.StaleUpstream) as e:
        raise GrowError(f"{run.uri} has no finished seed to grow from: {e}") from None
    if seed.completed() is None:
        raise GrowError(f"{run.uri} has no finished seed to grow from: run jobs/train_seed.py first")
    path = f"{run.generation(name).path}/{MARKER}"
    if run.fs.exists(path):
        recorded = read_json(run.fs, path)["data"]
        if recorded.rstrip("/") != data.rstrip("/"):
            raise GrowError(f"generation {name!r} of {run.uri} already holds {recorded}, not {data}: "
                            f"choose another --name (taken: {', '.join(run.generation_names())})")


def prepare(cfg: Config, run: RunDir, data: str, name: str, new_experts: int | str = "auto",
            force: bool = False, log=print) -> tuple[dict[str, Any], list[Job]]:
    """Every stage of generation ``name`` up to its training data (``force``: rerun each even
    when complete); returns what was found (novelty counts, why there are new experts or none)
    and the training runs to launch."""
    check(cfg, run, name, data)
    gen = run.generation(name)
    marker = f"{gen.path}/{MARKER}"
    if not run.fs.exists(marker):
        write_json_atomic(run.fs, marker, {"name": name, "data": data, "started_at": now()})
    unit = lambda stage: stages.gen_unit(name, stage)  # noqa: E731 - a short local spelling
    stages.run_stage(unit("ingest"), cfg, run, force=force, data=data, key_prefix=f"{name}/", log=log)
    stages.run_stage(unit("embeddings"), cfg, run, force=force, log=log)
    flagged = stages.run_stage(unit("novelty"), cfg, run, force=force, log=log)
    level = stages.run_stage(unit("clusters"), cfg, run, force=force, new_experts=new_experts, log=log)
    out = {"generation": name, "novel": flagged["stats"]["novel"],
           "familiar": flagged["stats"]["familiar"],
           "familiar_by_expert": flagged["stats"]["familiar_by_expert"],
           "why": level["stats"]["why"], "experts": [], "failed": {}}
    if not level["stats"]["experts"]:
        return out, []
    stages.run_stage(unit("assignments"), cfg, run, force=force, log=log)
    stages.run_stage(unit("training_data"), cfg, run, force=force, log=log)
    t = cfg.train.total_samples
    jobs = [Job("expert", e["expert_id"], t, t, generation=name) for e in level["stats"]["experts"]]
    out["experts"] = [job.name for job in jobs]
    return out, jobs


def add_experts(cfg: Config, run: RunDir, data: str, name: str, new_experts: int | str = "auto",
                force: bool = False, log=print) -> dict[str, Any]:
    """Add the data at ``data`` to ``run`` as generation ``name``, and train an expert for each
    part of what in it is novel. Idempotent: a rerun skips what is complete and resumes the
    training runs from their checkpoints; ``force`` reruns the generation's stages and retrains
    its experts. Returns what was done (novelty counts, new experts)."""
    out, jobs = prepare(cfg, run, data, name, new_experts, force, log)
    if jobs:
        _, out["failed"] = checkpoints.launch(cfg, run, jobs, cfg.train.max_concurrent,
                                              force=force, log=log)
    return out
