"""Print the plan of a config on a cluster before anything starts, and refuse one that does not
fit (docs/plan.md).

    python jobs/plan.py --config laion --cluster cluster.yaml
    python jobs/plan.py --config laion --cluster deploy/raycluster.yaml --rows 2000000000
    python jobs/plan.py --config laion --cluster cluster.yaml --rows 1000000000 --set cluster.num_experts=8
    python jobs/plan.py --config small --set train.max_concurrent=4

For every stage and training run: what one task, actor or worker reserves, on which node types,
how many run at once, each training worker's memory (checked against its GPU's), the wall time
from the measured rates, the GPU- and CPU-hours it reserves, the bytes it writes and, for
instance types with a known price, what its nodes cost on demand; then MoDE-n's training against
the paper's dense baseline, full-0 (n: cluster.num_experts). The nodes are the cluster file's
(Ray's cluster launcher YAML or a KubeRay RayCluster), else the config's ray.node_types, else
this machine. Exits 1 with the reasons, and the --set changes that make it fit, when something
does not fit. Every job checks the steps it runs the same way, on the cluster it joins, before
its work. Starts no Ray. docs/plan.md explains the plan, docs/scale.md its costs at 1B captions.
"""

import sys

from pipeline.core import cli, plan


def main(argv=None) -> int:
    p = cli.parser(__doc__, run_dir=False)
    p.add_argument("--cluster", metavar="FILE",
                   help="cluster.yaml or deploy/raycluster.yaml (default: ray.node_types, else this machine)")
    p.add_argument("--rows", type=int, default=None, metavar="N",
                   help="samples in the shards, for the data stages' times (default: demo.samples "
                        "for the demo world)")
    p.add_argument("--image-kb", type=float, default=plan.IMAGE_BYTES / 1e3, metavar="KB",
                   help="an encoded image's size, for what training_data writes (default: "
                        f"{plan.IMAGE_BYTES / 1e3:g}, img2dataset's LAION-400M at 256 px)")
    args = p.parse_args(argv)
    cfg, _ = cli.load(args)
    if args.cluster:
        nodes, where = plan.read_cluster(args.cluster), args.cluster
    elif cfg.ray.node_types:
        nodes, where = plan.declared_nodes(cfg.ray.node_types), "the node types of ray.node_types"
    else:
        nodes, where = plan.this_machine(), "this machine"
    # The demo world's size is in its config; real shards' size is not.
    rows = args.rows if args.rows or (args.config or "demo") != "demo" else cfg.demo.samples
    result = plan.checked(cfg, nodes, rows=rows, title=f"{args.config or 'demo'} on {where}",
                          image_bytes=round(args.image_kb * 1e3))
    print(result.text())
    return 0 if result.fits else 1


if __name__ == "__main__":
    sys.exit(main())
