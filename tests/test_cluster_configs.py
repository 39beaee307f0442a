"""The cluster configs (cluster.yaml for Ray's cluster launcher, deploy/ for KubeRay, Dockerfile)
are checked here, since no test can start them: cluster.yaml against the launcher's own schema as
shipped in the installed Ray, and all of them against each other (docs/cluster.md)."""

import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml

from pipeline.core.config import load_config, parse_node_types

REPO = Path(__file__).resolve().parents[1]
PINNED_RAY = re.search(r"^ray==([\d.]+)$", (REPO / "constraints.txt").read_text(), re.M).group(1)
# vCPUs, GiB and GPUs of the instance types the configs name (AWS's published sizes)
INSTANCES = {"m6i.2xlarge": (8, 32, 0), "m6i.8xlarge": (32, 128, 0), "g5.12xlarge": (48, 192, 4)}


def cluster() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def kuberay() -> dict[str, dict]:
    docs = [d for f in ("raycluster.yaml", "rayjob.yaml")
            for d in yaml.safe_load_all((REPO / "deploy" / f).read_text())]
    return {d["kind"]: d for d in docs}


def test_cluster_yaml_is_valid_for_the_installed_ray_cluster_launcher():
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    cfg = cluster()
    jsonschema.validate(cfg, schema)
    # the schema check can fail: a worker count that is not a number is refused
    broken = {**cfg, "max_workers": "sixteen"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_cluster_yaml_head_workers_image_auth_and_credentials():
    cfg = cluster()
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"] == {"CPU": 0} and "InstanceMarketOptions" not in head["node_config"]
    workers = {name: t for name, t in types.items() if name != cfg["head_node_type"]}
    gpus = {name: INSTANCES[t["node_config"]["InstanceType"]][2] for name, t in workers.items()}
    assert sorted(gpus.values()) == [0, 4]              # one CPU pool, one GPU pool
    for t in workers.values():
        assert t["min_workers"] == 0                    # both scale from zero
        assert t["node_config"]["InstanceMarketOptions"] == {"MarketType": "spot"}
    for t in types.values():                            # S3 by instance profile, on every node
        assert t["node_config"]["IamInstanceProfile"] == {"Name": "mode-ray-node"}
    # the image is ours, built from the Dockerfile, tagged with the pinned Ray
    assert cfg["docker"]["image"].endswith(f"/mode-on-ray:{PINNED_RAY}")
    for commands in (cfg["head_start_ray_commands"], cfg["worker_start_ray_commands"]):
        assert any("RAY_AUTH_MODE=token" in c and "ray start" in c for c in commands)
    assert "--num-cpus=0" in " ".join(cfg["head_start_ray_commands"])
    assert "/home/ray/.ray/auth_token" in cfg["file_mounts"]
    text = (REPO / "cluster.yaml").read_text()
    assert not re.search(r"(?i)aws_(secret_)?access_key|AKIA[0-9A-Z]{16}", text)


def test_dockerfile_starts_from_the_pinned_ray_gpu_image_and_installs_the_requirements():
    lines = [line.strip() for line in (REPO / "Dockerfile").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines[0] == f"FROM rayproject/ray:{PINNED_RAY}-py311-gpu"
    copied = " ".join(line for line in lines if line.startswith("COPY"))
    assert "requirements.txt" in copied and "constraints.txt" in copied
    assert any(line.startswith("RUN pip install") and "-r requirements.txt" in line
               and "-c constraints.txt" in line for line in lines)
    assert not any(re.search(r"(?i)aws_(secret_)?access_key", line) for line in lines)


def test_kuberay_cluster_matches_cluster_yaml():
    cfg, k8s = cluster(), kuberay()
    rc = k8s["RayCluster"]["spec"]
    assert rc["rayVersion"] == PINNED_RAY and rc["enableInTreeAutoscaling"] is True
    assert rc["authOptions"] == {"mode": "token"}
    assert rc["autoscalerOptions"]["idleTimeoutSeconds"] == 60 * cfg["idle_timeout_minutes"]
    # S3 through the service account's role: the same IAM role as the instance profile
    account = k8s["ServiceAccount"]
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].endswith(":role/mode-ray-node")
    head = rc["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"].replace("-", "_"): g for g in rc["workerGroupSpecs"]}
    types = cfg["available_node_types"]
    assert set(groups) | {cfg["head_node_type"]} == set(types)
    pods = [(cfg["head_node_type"], head["template"]["spec"], "ON_DEMAND")]
    pods += [(name, g["template"]["spec"], "SPOT") for name, g in groups.items()]
    for name, spec, capacity in pods:
        instance = types[name]["node_config"]["InstanceType"]
        assert spec["serviceAccountName"] == account["metadata"]["name"]
        assert spec["nodeSelector"] == {"node.kubernetes.io/instance-type": instance,
                                        "eks.amazonaws.com/capacityType": capacity}
        (container,) = spec["containers"]
        assert container["image"] == cfg["docker"]["image"]
        assert not any("AWS_" in e.get("name", "") for e in container.get("env", []))
        limits = container["resources"]["limits"]
        cpus, gib, gpus = INSTANCES[instance]
        assert container["resources"]["requests"] == limits
        assert 0.8 * cpus <= int(limits["cpu"]) <= cpus and int(limits["memory"].removesuffix("Gi")) <= gib
        assert int(limits.get("nvidia.com/gpu", 0)) == gpus
    for name, g in groups.items():
        assert (g["minReplicas"], g["replicas"]) == (0, 0) and g["maxReplicas"] == types[name]["max_workers"]


def test_kuberay_job_runs_jobs_and_flags_that_exist(capsys):

    k8s = kuberay()
    job = k8s["RayJob"]["spec"]
    assert job["clusterSelector"] == {"ray.io/cluster": k8s["RayCluster"]["metadata"]["name"]}
    assert job["submitterPodTemplate"]["spec"]["containers"][0]["image"] == cluster()["docker"]["image"]
    command = shlex.split(job["entrypoint"])
    assert command[:2] == ["python", "jobs/run_pipeline.py"], command
    from jobs import run_pipeline

    with pytest.raises(SystemExit):
        run_pipeline.main(["--help"])
    usage = capsys.readouterr().out
    for flag in (a for a in command[2:] if a.startswith("--")):
        assert flag in usage, f"jobs/run_pipeline.py has no {flag}"
    # the whole pipeline: nothing stops it early
    assert "--until" not in command


def test_the_cluster_presets_know_the_node_types_cluster_yaml_can_add():
    """`small` and `laion` declare cluster.yaml's worker pools in ray.node_types, which the
    launcher's resource plan counts on a cluster scaled to zero (Ray tells jobs nothing of them)."""
    pools = []
    for t in cluster()["available_node_types"].values():
        if "min_workers" in t:
            cpus, _, gpus = INSTANCES[t["node_config"]["InstanceType"]]
            pools.append((t["max_workers"], {"CPU": float(cpus), **({"GPU": float(gpus)} if gpus else {})}))
    for preset in ("small", "laion"):
        declared = parse_node_types("ray.node_types", load_config(preset).ray.node_types)
        assert sorted(declared, key=str) == sorted(pools, key=str), preset
