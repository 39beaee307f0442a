"""Classify one image with a run's routed experts.

    python jobs/predict.py --run-dir demo_out/run --image cat.jpg --labels "circle,square,star"

Prints the top labels with their probabilities (softmax of the mixed cosine logits times the
experts' mean logit scale) and the expert weights the labels routed to.
"""

import sys

import numpy as np
from PIL import Image

from pipeline.core import cli
from pipeline.evaluation.ensemble import MoDEEnsemble
from pipeline.training.runs import run_name

DEFAULT_TEMPLATES = ("a photo of a {c}.", "a {c}.", "{c}")


def main(argv=None) -> int:
    p = cli.parser(__doc__)
    p.add_argument("--image", required=True, help="an image file")
    p.add_argument("--labels", required=True, help='comma-separated class names: "a,b,c"')
    p.add_argument("--template", action="append", default=[], metavar="TEXT",
                   help="prompt template with {c} (repeatable; default: a few generic ones)")
    p.add_argument("--temperature", type=float, default=8.0, help="routing temperature")
    p.add_argument("--top-k", type=int, default=0, help="run only the k heaviest experts")
    p.add_argument("--show", type=int, default=5, help="labels to print")
    args = p.parse_args(argv)
    cfg, run = cli.load(args, write_config=False)     # it only reads the run
    labels = [x.strip() for x in args.labels.split(",") if x.strip()]
    if len(labels) < 2:
        p.error("--labels needs at least two comma-separated class names")
    try:
        image = Image.open(args.image).convert("RGB")
    except OSError as e:
        p.error(f"cannot read --image {args.image}: {e}")
    ens = MoDEEnsemble(run.uri, cfg)
    params = {"temperature": args.temperature}
    if args.top_k:
        params.update(mode="top_k", k=args.top_k)
    out = ens.zero_shot([image], labels, args.template or list(DEFAULT_TEMPLATES), **params)
    scale = np.mean([float(ens.model(run_name("expert", e))[0].logit_scale.detach().exp()) for e in out.expert_logits])
    z = scale * out.logits[0]
    prob = np.exp(z - z.max())
    prob /= prob.sum()
    for i in np.argsort(-prob)[:args.show]:
        print(f"{prob[i]:7.1%}  {labels[i]}")
    print("expert weights: " + ", ".join(f"{run_name('expert', e)} {w:.3f}" for e, w in enumerate(out.weights)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
