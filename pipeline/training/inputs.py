"""Model inputs from training rows: open_clip's image transform and tokenizer.

``Preprocess`` turns rows ``{caption, image bytes}`` into the tensors a CLIP trains on. It runs
where ``train.decode_in_worker`` says: in Ray Data ``map_batches`` tasks (``preprocess_batch``,
the default: decoding scales with the cluster's CPUs, apart from the GPUs that train), or in the
Ray Train worker itself (``pipeline.training.train_loop``: no extra processes, each of which would import
torch and open_clip, the better choice on a small CPU machine such as the demo's). Leaf module:
torch and open_clip are imported by ``pipeline.training.model.tools`` when a ``Preprocess`` is built.

Images travel as uint8 (docs/training.md): ``Preprocess`` runs open_clip's transform up
to its tensor conversion (decode, resize, crop: the CPU's part) and stops there, so a 224 px
image is 150 KB on its way to the trainer instead of 600 KB as float32. The transform's last two
steps, the conversion to float and the normalisation, run on the training device
(``DeviceNormalize``): the same maths, a quarter of the bytes copied, cached and shuffled.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from pipeline.core.keys import key_rank
from pipeline.data.images import open_rgb


def split_transform(transform) -> tuple[Any, tuple[float, ...], tuple[float, ...]]:
    """open_clip's image transform (a torchvision ``Compose`` ending in ``ToTensor``, then
    ``Normalize``) as ``(pil_steps, mean, std)``: the steps that work on the PIL image, and the
    normalisation's statistics. Raises for a transform of another shape."""
    from torchvision.transforms import Compose, Normalize  # late import: torch, as above

    steps = list(transform.transforms)
    if len(steps) < 2 or "ToTensor" not in type(steps[-2]).__name__ \
            or not isinstance(steps[-1], Normalize):
        raise ValueError(f"expected open_clip's transform to end in ToTensor, Normalize; got "
                         f"{[type(t).__name__ for t in steps]}")
    return Compose(steps[:-2]), tuple(steps[-1].mean), tuple(steps[-1].std)


class Preprocess:
    """Rows ``{caption, image bytes}`` to model inputs with open_clip's transform and tokenizer.

    Returns ``{"image": uint8 (N, 3, H, W), "text": int64 (N, context_length)}``, with
    ``key_hash`` (int64, ``pipeline.core.keys.key_rank`` with seed 0) where rows have keys and
    ``expert_id`` as it came where they have one (the trainer records its batches' mix). A row
    whose image does not decode or whose caption is missing raises: training data must come from
    ingest's good rows. The images are open_clip's transform without its last two steps
    (``split_transform``): ``DeviceNormalize`` with ``mean`` and ``std`` finishes them.
    """

    def __init__(self, model_name: str, augment: bool = False) -> None:
        from torchvision.transforms.functional import pil_to_tensor  # late import: as below

        from pipeline.training.model import tools  # late import: open_clip, only in the decoding tasks

        preprocess_train, preprocess_val, self.tokenizer = tools(model_name)
        self.transform = preprocess_train if augment else preprocess_val
        self.pil_steps, self.mean, self.std = split_transform(self.transform)
        self.to_tensor = pil_to_tensor

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys = batch["key"] if "key" in batch else np.arange(len(batch["caption"]))
        for column in ("caption", "image"):
            missing = [i for i, v in enumerate(batch[column]) if v is None or len(v) == 0]
            if missing:
                raise ValueError(f"{len(missing)} rows without {column} (keys "
                                 f"{keys[missing[:5]].tolist()}): train on ingest's good rows")
        images = np.stack([self._image(b, k) for b, k in zip(batch["image"], keys.tolist(), strict=True)])
        out = {"image": images, "text": self.tokenizer(list(batch["caption"])).numpy()}
        if "key" in batch:  # the trainer fingerprints the keys it is fed (pipeline.core.keys.digest)
            out["key_hash"] = key_rank(batch["key"], 0).view(np.int64)
        if "expert_id" in batch:
            out["expert_id"] = np.asarray(batch["expert_id"])
        return out

    def _image(self, data: bytes, key: Any) -> np.ndarray:
        try:    # any mode to RGB, 16-bit scaled (pipeline.data.images); ingest refused the bombs
            return self.to_tensor(self.pil_steps(open_rgb(data, max_pixels=None))).numpy()
        except OSError as e:  # PIL's UnidentifiedImageError and truncated files
            raise ValueError(f"image of key {key!r} does not decode ({e}): train on ingest's "
                             f"good rows") from e


class DeviceNormalize:
    """The end of open_clip's transform, on the training device: uint8 images (N, 3, H, W) to
    float32 in [0, 1] (torchvision's ``to_dtype``, scaled), then normalised by the model's
    ``mean`` and ``std`` (torchvision's ``normalize``)."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        from torchvision.transforms.v2 import functional  # late import: torch, as above

        self.mean, self.std, self.f = list(mean), list(std), functional

    def __call__(self, images):
        import torch  # late import: torch, as above; loaded already where this is called

        return self.f.normalize(self.f.to_dtype(images, torch.float32, scale=True),
                                self.mean, self.std)


@functools.cache
def preprocessor(model_name: str, augment: bool) -> Preprocess:
    """One ``Preprocess`` per process and model, built on first use."""
    return Preprocess(model_name, augment)


def preprocess_batch(batch: dict[str, np.ndarray], model_name: str,
                     augment: bool) -> dict[str, np.ndarray]:
    """``Preprocess`` as a Ray Data task function: one ``Preprocess`` per worker process, built
    on first use. Tasks (not an actor pool) so the step fuses with the read and scales with
    whatever CPUs the Train workers leave free."""
    return preprocessor(model_name, augment)(batch)
