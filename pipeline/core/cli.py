"""What every job shares: the common flags, loading the config, opening the run directory."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Literal

import ray
import yaml

from pipeline.core import console, stages
from pipeline.core.config import PRESETS, Config, ConfigError, load_config
from pipeline.core.plan import STEPS, at_start
from pipeline.core.raycluster import init_ray, require_shared_storage
from pipeline.core.rundir import RunDir
from pipeline.training.runs import Job, plan


def parser(description: str, run_dir: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None,
                   help=f"preset ({', '.join(PRESETS)}) or YAML file; default: the run "
                        "directory's config.yaml if it has one, else 'demo'")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.FIELD=VALUE", help="override one config field (repeatable)")
    if run_dir:
        p.add_argument("--run-dir", required=True, metavar="URI",
                       help="run directory: a local path or a URL (s3://bucket/prefix, gs://, az://)")
    p.add_argument("--force", action="store_true",
                   help="rerun stages even when their manifest matches the config")
    p.add_argument("--print-config", action="store_true",
                   help="print the config this command would use (every field, and where it came "
                        "from) and exit")
    p.add_argument("--verbose", action="store_true",
                   help=f"also print Ray's own logs, progress bars and our debug lines (as "
                        f"{console.LEVEL_ENV}=DEBUG does)")
    return p


def load(args: argparse.Namespace, write_config: bool = True) -> tuple[Config, RunDir | None]:
    """Config from --config/--set, falling back to the run directory's own config.yaml, then to
    the demo preset; says which it used (``--print-config`` prints it whole and exits). The run
    directory's config.yaml is then written with the config in force (unless ``write_config``
    is False: the job writes it after its own checks)."""
    try:
        cfg = load_config(args.config or "demo", args.overrides)
        run = None
        if args.config in PRESETS:
            source = f"the {args.config!r} preset"
        elif args.config:
            source = args.config
        else:
            source = "the 'demo' preset (no --config given)"
        if getattr(args, "run_dir", None):
            run = RunDir(args.run_dir, cfg.storage)
            if args.config is None and run.has_config():
                saved = yaml.safe_load(run.fs.cat_file(run.config_path))
                cfg = load_config(saved, args.overrides)
                run = RunDir(args.run_dir, cfg.storage)
                source = f"the run directory's {run.uri}/config.yaml"
            elif args.config is None:
                source = "the 'demo' preset (no --config given, no config.yaml in the run directory)"
        if args.overrides:
            source += f", with --set {' '.join(args.overrides)}"
        show(args, cfg, source)
        console.setup(verbose=getattr(args, "verbose", False))
        print(f"[config] {source}")
        if run is not None and write_config:
            run.write_config(cfg)
    except ConfigError as e:
        raise SystemExit(f"config error: {e}") from None
    return cfg, run


def show(args: argparse.Namespace, cfg: Config, source: str) -> None:
    """With ``--print-config``: print the whole config, headed by where it came from, and exit."""
    if not getattr(args, "print_config", False):
        return
    try:
        sys.stdout.write(f"# config: {source}\n{cfg.to_yaml()}")
        sys.stdout.flush()
    except BrokenPipeError:     # `| head`: the reader is gone (Python's documented recipe)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    raise SystemExit(0)


def start(cfg: Config, run: RunDir | None, *uris: str | None, steps: Sequence[str] = STEPS,
          runs: Sequence[Job] | None = None) -> str:
    """What a job does before its work: start or join Ray; on a cluster of several nodes, refuse
    a local run directory or data (``uris``, and the shards ingest read) that not every node can
    reach (``raycluster.require_shared_storage``); refuse a config whose ``steps`` (the plan's
    steps this job may run: ``pipeline.core.plan.STEPS``) do not fit the cluster, the checks of
    ``jobs/plan.py`` (``pipeline.core.plan.at_start``); then write the run directory's
    config.yaml. ``runs``: the training runs after the seed the job trains (default: every
    expert and the default baselines). Returns what ``init_ray`` did and the plan's line, for
    the job to print."""
    what = init_ray(cfg.ray)
    ingested = run.manifest("ingest") if run is not None else None
    shards = ingested["inputs"]["external"].get("data") if ingested else None
    require_shared_storage([run.uri if run is not None else None, *uris, shards], cfg.storage)
    fits = at_start(cfg, ray.nodes(), *_left(cfg, run, steps, runs))
    if run is not None:
        run.write_config(cfg)
    return f"{what}\n{fits}"


def _left(cfg: Config, run: RunDir | None, steps: Sequence[str],
          runs: Sequence[Job] | None) -> tuple[list[str], int]:
    """The steps a job has left to run, a complete one skipped as the job will skip it, and the
    training runs after the seed it has left (at most ``train.max_concurrent`` go at once: the
    launcher checks the same number when it starts them)."""
    runs = list(runs) if runs is not None else plan(cfg.train, cfg.cluster.num_experts)
    if run is None:
        return list(steps), len(runs)
    pending = [j for j in runs if run.manifest(j.unit) is None]
    units = {"seed": "checkpoints/seed"}
    done = {s for s in steps if s not in ("runs", "eval") and run.manifest(units.get(s, s)) is not None}
    return [s for s in steps if s not in done and (s != "runs" or pending)], len(pending)


def add_data_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", metavar="URI",
                   help="shards: folder, prefix or glob, local or a URL (s3://, gs://...; default: data.train_uri)")


def data_uri(p: argparse.ArgumentParser, args: argparse.Namespace, cfg: Config) -> str:
    """``--data``, else ``data.train_uri``; a usage error when neither is set."""
    data = args.data or cfg.data.train_uri
    if not data:
        p.error("no data: pass --data URI or set data.train_uri")
    return data


def add_eval_flags(p: argparse.ArgumentParser) -> None:
    """What jobs/evaluate.py and jobs/experiment.py evaluate on (``pipeline.evaluation.eval.inputs``)."""
    p.add_argument("--tasks", action="append", default=[], metavar="URI",
                   help="a clip_benchmark webdataset folder, local or s3:// (repeatable)")
    p.add_argument("--retrieval", metavar="URI", help="held-out pairs (jpg + txt) for retrieval")
    p.add_argument("--demo-data", metavar="URI",
                   help="demo world to take tasks from (default: <run-dir>/../data if present)")


def add_ingested_data_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", metavar="URI",
                   help="optional: the shards ingest validated (checked; the stage reads "
                        "ingest's output and the shards its manifest names)")


def check_ingested_data(p: argparse.ArgumentParser, args: argparse.Namespace, run: RunDir) -> None:
    """A ``--data`` given to a stage after ingest must be the data ingest read."""
    if not args.data:
        return
    m = run.manifest("ingest")
    ingested = m["inputs"]["external"]["data"] if m else None
    if ingested is None:
        p.error(f"{run.stage_uri('ingest')} is not complete: run jobs/ingest.py --data {args.data} first")
    if ingested.rstrip("/") != args.data.rstrip("/"):
        p.error(f"--data {args.data} is not the data ingest validated ({ingested}): run "
                f"jobs/ingest.py --data {args.data} first, or leave --data out")


def planned(p: argparse.ArgumentParser, cfg: Config, num_experts: int,
            experts: Sequence[int] | None, baselines: str) -> list[Job]:
    """The training runs after the seed that a job's flags ask for: the experts (all, or the
    ``--experts`` given), then the ``--baselines`` (comma-separated; none with ``--experts``).
    A bad id or baseline ends the job with the parser's usage message."""
    spec = [b for b in baselines.split(",") if b.strip()] if experts is None else []
    try:
        return plan(cfg.train, num_experts, experts, baselines=spec)
    except ValueError as e:
        p.error(str(e))


def stage_job(description: str, stage: str, argv: Sequence[str] | None,
              data: Literal["shards", "ingested"] | None = None,
              inputs: Sequence[tuple[str, str, str]] = ()) -> int:
    """A job that runs one stage: the common flags (and ``--data``), the config, Ray, the stage.

    Args:
        description: the job's ``--help`` text (its module docstring).
        stage: the stage's name in ``pipeline.core.stages.STAGES``.
        argv: the command line (None: ``sys.argv``).
        data: ``"shards"``: ``--data`` names the shards to read (ingest); ``"ingested"``: an
            optional ``--data`` is checked against the shards ingest read.
        inputs: optional external inputs of the stage, as (flag, stage keyword, help):
            ``("--from", "source", "...")`` passes ``--from URI`` as ``source=URI``.
    """
    p = parser(description)
    if data == "shards":
        add_data_flag(p)
    elif data == "ingested":
        add_ingested_data_flag(p)
    for flag, keyword, text in inputs:
        p.add_argument(flag, dest=keyword, metavar="URI", help=text)
    args = p.parse_args(argv)
    cfg, run = load(args, write_config=False)
    external = {}
    if data == "shards":
        external["data"] = data_uri(p, args, cfg)
    elif data == "ingested":
        check_ingested_data(p, args, run)
    external.update({k: getattr(args, k) for _, k, _ in inputs if getattr(args, k)})
    print(start(cfg, run, *external.values(), steps=(stage,)))
    stages.run_stage(stage, cfg, run, force=args.force, **external)
    return 0
