"""What every job shares: the common flags, loading the config, opening the run directory."""

from __future__ import annotations

import argparse
import logging
import os

import yaml

from pipeline.config import PRESETS, Config, ConfigError, load_config
from pipeline.rundir import RunDir


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
                       help="run directory: a local path or s3://bucket/prefix")
    p.add_argument("--force", action="store_true",
                   help="rerun stages even when their manifest matches the config")
    return p


def load(args: argparse.Namespace) -> tuple[Config, RunDir | None]:
    """Config from --config/--set, falling back to the run directory's own config.yaml."""
    logging.basicConfig(level=os.environ.get("MODE_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = load_config(args.config or "demo", args.overrides)
        run = None
        if getattr(args, "run_dir", None):
            run = RunDir(args.run_dir, cfg.storage)
            if args.config is None and run.has_config():
                saved = yaml.safe_load(run.fs.cat_file(run.config_path))
                cfg = load_config(saved, args.overrides)
                run = RunDir(args.run_dir, cfg.storage)
            run.write_config(cfg)
    except ConfigError as e:
        raise SystemExit(f"config error: {e}") from None
    return cfg, run


def add_data_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", metavar="URI",
                   help="shards: folder, prefix or glob, local or s3:// (default: data.train_uri)")


def data_uri(p: argparse.ArgumentParser, args: argparse.Namespace, cfg: Config) -> str:
    """``--data``, else ``data.train_uri``; a usage error when neither is set."""
    data = args.data or cfg.data.train_uri
    if not data:
        p.error("no data: pass --data URI or set data.train_uri")
    return data
