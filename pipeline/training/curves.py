"""Training curves of a system's runs in one figure, from their registry entries' ``history``.

Every run's loss against samples seen on one axis: the experts and baselines start where the seed
stopped (``pipeline.training.runs``), so each continues the seed's curve. The same lines, with lr and
throughput, are TensorBoard scalars beside the checkpoints (``pipeline.training.train_loop``).
"""

from __future__ import annotations

import io
from typing import Any

from pipeline.training.runs import parse_name

# Drawing order and line per kind: the seed under everything, thick; an expert, the full run
# and the random part of the same index share a colour (one expert's budget each).
ORDER = {"seed": 0, "expert": 1, "full": 2, "random-split": 3, "dense-matched": 4, "onestep": 5}
STYLE = {"seed": {"color": "black", "linewidth": 2.5, "linestyle": "-"},
         "expert": {"linewidth": 1.0, "linestyle": "-"},
         "full": {"linewidth": 1.5, "linestyle": "-."},
         "random-split": {"linewidth": 1.0, "linestyle": "--"},
         "dense-matched": {"color": "grey", "linewidth": 1.5, "linestyle": ":"},
         "onestep": {"linewidth": 1.0, "linestyle": ":"}}


def plot(entries: dict[str, dict[str, Any]]) -> bytes:
    """A PNG of training loss against samples seen for every entry (registry entries by run
    name) that has a ``history``; the others are skipped. Raises ``ValueError`` when none has."""
    import matplotlib  # late import: 0.6 s, kept out of the processes that never draw

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = sorted(((e["kind"], parse_name(name)[1] or 0, name)
                    for name, e in entries.items() if e.get("history")),
                   key=lambda k: (ORDER[k[0]], k[1]))
    if not drawn:
        raise ValueError(f"no run has a training history among {sorted(entries)}")
    fig, ax = plt.subplots(figsize=(8, 5))
    for kind, index, name in drawn:
        history = entries[name]["history"]
        style = {"color": f"C{index % 10}", **STYLE[kind]}
        ax.plot([h["samples_seen"] for h in history], [h["loss"] for h in history],
                label=name, **style)
    ax.set_xlabel("samples seen")
    ax.set_ylabel("contrastive loss (mean since the previous point)")
    ax.legend(fontsize=7, ncol=(len(drawn) + 11) // 12)
    ax.set_title("training curves")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()
