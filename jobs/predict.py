"""Classify images with a run's routed experts: one image, or a whole dataset to parquet.

    python jobs/predict.py --run-dir demo_out/run --image cat.jpg --labels "circle,square,star"
    python jobs/predict.py --run-dir demo_out/run --images s3://bucket/photos/ \\
        --labels "circle,square,star" --out s3://bucket/predictions/

One image: prints the top labels with their probabilities (softmax of the mixed cosine logits
times the experts' mean logit scale) and the expert weights the labels routed to. A dataset
(--images: a folder of image files, or of webdataset .tar shards): Ray Data streams the images
through a pool of actors that each hold the run's experts, and writes parquet to --out with, per
image, key (a tar sample's key, else the file's path), path, labels and probs (the --show best,
best first), weights (the experts' routing weights) and error (set where an image does not
decode; its lists are then empty). The driver holds no image.
"""

import sys

from PIL import Image

from pipeline.core import cli
from pipeline.evaluation import scoring
from pipeline.evaluation.ensemble import MoDEEnsemble
from pipeline.evaluation.eval import use_gpu
from pipeline.evaluation.metrics import DEFAULT_TEMPLATES
from pipeline.training.runs import run_name


def main(argv=None) -> int:
    p = cli.parser(__doc__)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--image", help="an image file")
    what.add_argument("--images", metavar="URI",
                      help="a folder of image files or of webdataset .tar shards, local or s3://")
    p.add_argument("--out", metavar="URI", help="with --images: the parquet folder to write")
    p.add_argument("--labels", required=True, help='comma-separated class names: "a,b,c"')
    p.add_argument("--template", action="append", default=[], metavar="TEXT",
                   help="prompt template with {c} (repeatable; default: a few generic ones)")
    p.add_argument("--temperature", type=float, default=8.0, help="routing temperature")
    p.add_argument("--top-k", type=int, default=0, help="run only the k heaviest experts")
    p.add_argument("--show", type=int, default=5, help="labels to print (or write, per image)")
    args = p.parse_args(argv)
    if args.images and not args.out:
        p.error("--images needs --out URI (the parquet folder to write)")
    if args.out and not args.images:
        p.error("--out goes with --images")
    cfg, run = cli.load(args, write_config=False)     # it only reads the run
    labels = [x.strip() for x in args.labels.split(",") if x.strip()]
    if len(labels) < 2:
        p.error("--labels needs at least two comma-separated class names")
    image = None
    if args.image:
        try:
            image = Image.open(args.image).convert("RGB")
        except OSError as e:
            p.error(f"cannot read --image {args.image}: {e}")
    ens = MoDEEnsemble(run.uri, cfg)
    params = {"temperature": args.temperature}
    if args.top_k:
        params.update(mode="top_k", k=args.top_k)
    templates = args.template or list(DEFAULT_TEMPLATES)
    weights = ens.weights(labels, templates, **params)
    if image is not None:
        prob = scoring.routed_probabilities(ens, [image], labels, templates, weights)[0]
        for i in (-prob).argsort(kind="stable")[:args.show]:
            print(f"{prob[i]:7.1%}  {labels[i]}")
    else:
        # Ray, the storage every node must reach, and the plan's check of the scoring actors
        print(cli.start(cfg, None, run.uri, args.images, args.out, steps=("eval",), runs=[]))
        try:
            done = scoring.predict(run.uri, cfg, args.images, args.out, labels, templates, weights,
                                   cfg.storage, show=args.show, use_gpu=use_gpu(cfg))
        except (FileNotFoundError, ValueError) as e:
            p.error(str(e))
        print(f"wrote {done['images']:,} predictions to {args.out}"
              + (f" ({done['errors']:,} image(s) did not decode: see the error column)" if done["errors"] else ""))
    print("expert weights: " + ", ".join(f"{run_name('expert', e)} {w:.3f}" for e, w in enumerate(weights)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
