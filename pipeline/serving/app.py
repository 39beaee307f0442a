"""The application builder: ``serve run pipeline.serving.app:build run_dir=...`` or the
``import_path`` of deploy/serve.yaml (docs/serving.md)."""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from pipeline.serving.fleet import Source
from pipeline.serving.options import ServeOptions
from pipeline.serving.router import Router

APP_NAME = "mode"   # the router's application; each expert's is "mode-expert-<e>"


def router(source: Source, opts: ServeOptions) -> Application:
    """The router application of a run directory or bundle (it deploys the experts itself)."""
    return Router.options(**opts.router_deployment()).bind(source, opts.to_dict())


def build(args: dict[str, Any]) -> Application:
    """Serve's application builder: ``run_dir`` or ``bundle`` (one of them), and any
    ``ServeOptions`` field."""
    args = dict(args)
    run_dir, bundle = args.pop("run_dir", None), args.pop("bundle", None)
    if bool(run_dir) == bool(bundle):
        raise ValueError("the application needs one of the arguments run_dir (a run directory) "
                         "and bundle (an exported bundle)")
    source = Source("run", str(run_dir)) if run_dir else Source("bundle", str(bundle))
    return router(source, ServeOptions.from_dict(args))
