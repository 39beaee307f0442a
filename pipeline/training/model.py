"""CLIP models, transforms and tokenizers from open_clip, by architecture name.

Architectures are data: open_clip's JSON configs. The ones kept in ``pipeline/training/model_configs``
(``mode-tiny``: a 3.3M-parameter CLIP for 32x32 images that learns the demo world on a laptop
CPU) are registered next to open_clip's own (``ViT-B-32``, ``ViT-B-16``...). Models are always
built without pretrained weights: every MoDE model trains from scratch or from our checkpoints.
"""

from __future__ import annotations

import functools
import logging
import pathlib
from collections.abc import Callable

import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2

CONFIG_DIR = pathlib.Path(__file__).resolve().parent / "model_configs"


@functools.cache
def register_configs() -> None:
    """Make the repo's JSON architectures known to open_clip (once per process)."""
    open_clip.add_model_config(CONFIG_DIR)


def names() -> list[str]:
    """Every architecture name ``create`` accepts."""
    register_configs()
    return open_clip.list_models()


def create(name: str) -> tuple[torch.nn.Module, Callable, Callable, Callable]:
    """A randomly initialised CLIP and its tools: ``(model, preprocess_train, preprocess_val,
    tokenizer)``. Seed torch before calling for a reproducible init.

    Args:
        name: an open_clip architecture (``mode-tiny``, ``ViT-B-32``, ``ViT-B-16``...).
    """
    register_configs()
    if name not in open_clip.list_models():
        raise ValueError(f"unknown model {name!r}; models: {names()}")
    # open_clip warns on every randomly initialised model; that is the point here, not news.
    factory_log = logging.getLogger()
    level = factory_log.level
    factory_log.setLevel(logging.ERROR)
    try:
        model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
            name, pretrained=None)
    finally:
        factory_log.setLevel(level)
    return model, preprocess_train, preprocess_val, open_clip.get_tokenizer(name)


def tools(name: str) -> tuple[Callable, Callable, Callable]:
    """``(preprocess_train, preprocess_val, tokenizer)`` of an architecture without building the
    model (a ViT-B-16 is 150M parameters: too heavy for a data-loading actor). Same transforms
    as ``create``: open_clip's defaults, overridden by the config's ``preprocess_cfg``.
    """
    register_configs()
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ValueError(f"unknown model {name!r}; models: {names()}")
    pp = PreprocessCfg(**{**cfg.get("preprocess_cfg", {}), "size": cfg["vision_cfg"]["image_size"]})
    return (image_transform_v2(pp, is_train=True), image_transform_v2(pp, is_train=False),
            open_clip.get_tokenizer(name))
