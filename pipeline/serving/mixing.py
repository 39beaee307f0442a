"""One answer of the service from its experts' logits: pure numpy, no Ray (docs/serving.md)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from pipeline.evaluation.metrics import label_probabilities


def probabilities(weights: np.ndarray, logits: Mapping[int, np.ndarray],
                  scales: Mapping[int, float]) -> np.ndarray:
    """Class probabilities of one image, float64 summing to 1.

    ``logits``: expert id -> (n,) cosine similarities of the experts that ran (weight > 0);
    ``scales``: their ``exp(logit_scale)``. The logits are mixed with the routing weights as
    ``MoDEEnsemble.zero_shot`` mixes them, then softmaxed at the experts' mean logit scale, as
    jobs/predict.py does.
    """
    if not logits:
        raise ValueError("no expert logits to mix")
    mixed = sum(float(weights[e]) * np.asarray(lg, np.float64) for e, lg in logits.items())
    return label_probabilities(mixed, float(np.mean([scales[e] for e in logits])))[0]


def ranked(labels: Sequence[str], probs: np.ndarray) -> tuple[list[str], list[float]]:
    """Labels and probabilities, most probable first (ties keep the request's order)."""
    order = np.argsort(-probs, kind="stable")
    return [labels[i] for i in order], [float(probs[i]) for i in order]
