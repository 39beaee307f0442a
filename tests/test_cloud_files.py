"""What a cloud cluster needs to start, checked in the shipped files, since no test here can
start one: the GPU nodes' machine image carries a driver for the image's torch build, the nodes
log in to the private registry they pull from, the object store fits in shared memory, the RayJob
says how it resumes, and docs/cloud.md's IAM policy grants what the nodes call.

Each check is a function returning the problems it finds; every test runs it on the shipped files
(no problem) and on a copy with the defect it exists for (the problem is found)."""

import copy
import importlib.metadata
import importlib.util
import json
import re
import shlex
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
# CUDA's minimum Linux driver per toolkit release (NVIDIA's CUDA toolkit release notes).
MIN_DRIVER = {"12.6": "560.28.03", "12.8": "570.26", "13.0": "580.65.06"}
# What the launcher's AWS provider does without an ImageId: its own default AMI, CUDA 11.2.
FLOATING_IMAGES = {"", "latest_dlami"}
ECR = re.compile(r"^(?P<account>\d{12}|ACCOUNT)\.dkr\.ecr\.(?P<region>[a-z0-9-]+)\.amazonaws\.com$")


def cluster() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def dockerfile() -> str:
    return (REPO / "Dockerfile").read_text()


def rayjob_text() -> str:
    return (REPO / "deploy" / "rayjob.yaml").read_text()


def cloud_doc() -> str:
    return (REPO / "docs" / "cloud.md").read_text()


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def _has_gpus(node_type: dict) -> bool:
    # g4dn, g5, g6, p4d, p5...: AWS's GPU instance families
    return bool(re.match(r"^[gp]\d", node_type["node_config"]["InstanceType"]))


def _docker_args(dockerfile_text: str) -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", dockerfile_text, re.M))


# --- machine image and driver ------------------------------------------------------------------

def image_problems(cfg: dict, dockerfile_text: str) -> list[str]:
    """The GPU nodes boot a pinned machine image whose driver runs the Dockerfile's torch build."""
    problems = []
    meta = cfg.get("metadata", {})
    args = _docker_args(dockerfile_text)
    for name, node_type in cfg["available_node_types"].items():
        image = str(node_type["node_config"].get("ImageId", ""))
        if image.lower() in FLOATING_IMAGES or "/latest/" in image:
            problems.append(f"{name}: no pinned ImageId ({image!r})")
        elif not re.fullmatch(r"ami-[0-9a-f]{8,17}|AMI_ID", image):
            problems.append(f"{name}: ImageId {image!r} is neither an AMI ID nor the AMI_ID placeholder")
        gpu_options = " ".join(cfg["docker"].get("run_options", []) + cfg["docker"].get("worker_run_options", [])
                               + node_type.get("docker", {}).get("worker_run_options", []))
        if _has_gpus(node_type) and "--gpus" not in gpu_options \
                and cfg["docker"].get("disable_automatic_runtime_detection"):
            problems.append(f"{name}: its GPUs never reach the container")
    if not re.search(r" \d{8}$", meta.get("machine_image", "")):
        problems.append(f"metadata.machine_image {meta.get('machine_image')!r} names no dated release")
    cuda = meta.get("torch_cuda")
    if cuda not in MIN_DRIVER:
        problems.append(f"metadata.torch_cuda {cuda!r}: its minimum driver is not in this test's table")
    elif _version(meta.get("min_nvidia_driver", "0")) < _version(MIN_DRIVER[cuda]):
        problems.append(f"metadata.min_nvidia_driver {meta.get('min_nvidia_driver')} is below CUDA {cuda}'s "
                        f"{MIN_DRIVER[cuda]}")
    if _version(meta.get("machine_image_driver", "0")) < _version(meta.get("min_nvidia_driver", "999")):
        problems.append(f"the machine image's driver {meta.get('machine_image_driver')} is older than "
                        f"{meta.get('min_nvidia_driver')}")
    if args.get("TORCH_CUDA") != cuda:
        problems.append(f"Dockerfile's TORCH_CUDA {args.get('TORCH_CUDA')!r} is not metadata.torch_cuda {cuda!r}")
    if not args.get("TORCH_INDEX", "").endswith("/cu" + (cuda or "").replace(".", "")):
        problems.append(f"Dockerfile's TORCH_INDEX {args.get('TORCH_INDEX')!r} is not the CUDA {cuda} index")
    return problems


def test_gpu_nodes_boot_a_pinned_image_whose_driver_runs_the_torch_build():
    cfg, docker_text = cluster(), dockerfile()
    assert image_problems(cfg, docker_text) == []
    assert any(_has_gpus(t) for t in cfg["available_node_types"].values())
    # the launcher's default AMI (no ImageId), and a CUDA 13.0 torch on a 570 driver, are refused
    bare = copy.deepcopy(cfg)
    del bare["available_node_types"]["gpu_worker"]["node_config"]["ImageId"]
    assert any("gpu_worker: no pinned ImageId" in p for p in image_problems(bare, docker_text))
    old_driver = copy.deepcopy(cfg)
    old_driver["metadata"]["machine_image_driver"] = "570.172.08"
    assert any("older than" in p for p in image_problems(old_driver, docker_text))
    other_build = docker_text.replace("TORCH_CUDA=13.0", "TORCH_CUDA=12.8")
    assert any("TORCH_CUDA" in p for p in image_problems(cfg, other_build))


def test_the_dockerfile_installs_its_named_cuda_build_and_stops_on_another():
    text = dockerfile()
    args = _docker_args(text)
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    install = next(i for i, line in enumerate(lines)
                   if line.startswith("RUN pip install") and "-r requirements" in line)
    assert '--extra-index-url "$TORCH_INDEX"' in lines[install]
    # the check right after the install compares torch's own CUDA version with TORCH_CUDA
    assert "torch.version.cuda == '$TORCH_CUDA'" in lines[install + 1]
    # the tests ran with that build: the venv's torch records its CUDA version in torch/version.py
    # (read, not imported: importing torch takes seconds)
    pinned = re.search(r"^torch==([\d.]+)$", (REPO / "constraints.txt").read_text(), re.M).group(1)
    assert importlib.metadata.version("torch").split("+")[0] == pinned
    spec = importlib.util.find_spec("torch")
    built = Path(spec.submodule_search_locations[0], "version.py").read_text()
    cuda = re.search(r"^cuda: .*= '([\d.]+)'$", built, re.M)
    if cuda:        # a CPU-only torch in the venv has none
        assert cuda[1] == args["TORCH_CUDA"]


def test_docs_look_up_the_machine_image_cluster_yaml_pins():
    meta, doc = cluster()["metadata"], cloud_doc()
    lookup = f"--owners {meta['machine_image_owner']}"
    assert lookup in doc and f"'Name=name,Values={meta['machine_image']}'" in doc
    assert meta["machine_image_driver"] in doc and meta["min_nvidia_driver"] in doc
    assert f"'Name=name,Values={meta['machine_image']}'" in (REPO / "cluster.yaml").read_text()


# --- registry login ----------------------------------------------------------------------------

def registry_problems(cfg: dict) -> list[str]:
    """Every private registry the nodes pull from is logged in to before Docker starts."""
    docker = cfg.get("docker", {})
    images = {docker.get(k) for k in ("image", "head_image", "worker_image")}
    images |= {t.get("docker", {}).get("worker_image") for t in cfg["available_node_types"].values()}
    commands = " ; ".join(cfg.get("initialization_commands", []))
    problems = []
    for image in sorted(i for i in images if i):
        host = image.split("/")[0] if "/" in image and re.search(r"[.:]", image.split("/")[0]) else "docker.io"
        if host == "docker.io" or not docker.get("pull_before_run"):
            continue
        if not re.search(rf"docker login\b[^;]*--password-stdin\s+{re.escape(host)}\b", commands):
            problems.append(f"{image}: no `docker login ... {host}` in initialization_commands")
        ecr = ECR.match(host)
        if ecr and f"aws ecr get-login-password --region {ecr['region']} |" not in commands:
            problems.append(f"{image}: no `aws ecr get-login-password --region {ecr['region']}` piped to the login")
    return problems


def test_nodes_log_in_to_the_private_registry_before_they_pull():
    cfg = cluster()
    assert cfg["docker"]["pull_before_run"] is True and ECR.match(cfg["docker"]["image"].split("/")[0])
    assert registry_problems(cfg) == []
    # the login runs on the host, before Docker: initialization_commands, not setup_commands
    assert not any("docker login" in c for c in cfg.get("setup_commands", []))
    no_login = {**cfg, "initialization_commands": []}
    assert registry_problems(no_login) and "no `docker login" in registry_problems(no_login)[0]
    wrong_region = {**cfg, "initialization_commands": [c.replace("--region us-east-1", "--region eu-west-1")
                                                       for c in cfg["initialization_commands"]]}
    assert any("get-login-password --region us-east-1" in p for p in registry_problems(wrong_region))


# --- object store and shared memory -------------------------------------------------------------

def _bytes(size: str) -> int:
    """Docker's --shm-size value in bytes: a number with an optional unit (b, k, m, g)."""
    number, unit = re.fullmatch(r"'?(\d+(?:\.\d+)?)([bkmg]?)'?", size.lower()).groups()
    return int(float(number) * {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30}[unit])


def shm_problems(cfg: dict) -> list[str]:
    """Each node type's object store fits in its container's /dev/shm: Ray caps the store at 95% of
    /dev/shm otherwise, and refuses an explicit store larger than it."""
    docker = cfg.get("docker", {})
    starts = [c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"] if "ray start" in c]
    problems = []
    for name, node_type in cfg["available_node_types"].items():
        role = "head" if name == cfg["head_node_type"] else "worker"
        options = " ".join(docker.get("run_options", []) + docker.get(f"{role}_run_options", [])
                           + node_type.get("docker", {}).get("worker_run_options", []))
        commands = [c for c in starts if ("--head" in c) == (role == "head")]
        stores = [re.search(r"--object-store-memory[= ](\d+)", c) for c in commands]
        shm = re.search(r"--shm-size[= ]('?[\d.]+[bkmgBKMG]?'?)", options)
        if shm:
            for store in stores:
                if not store:
                    problems.append(f"{name}: --shm-size={shm[1]} with Ray's default object store, which it "
                                    f"caps at 95% of that")
                elif int(store[1]) > _bytes(shm[1]):
                    problems.append(f"{name}: --object-store-memory={store[1]} exceeds --shm-size={shm[1]}")
        elif docker.get("disable_shm_size_detection"):
            problems.append(f"{name}: no --shm-size and no detection: Docker's 64 MB /dev/shm")
        elif any(stores):
            problems.append(f"{name}: an explicit object store needs an explicit --shm-size beside it")
    return problems


def test_the_object_store_fits_in_shared_memory_on_every_node_type():
    cfg = cluster()
    assert shm_problems(cfg) == []
    # a fixed /dev/shm below what Ray would take is refused, unless the store is set to fit in it
    fixed = copy.deepcopy(cfg)
    fixed["docker"]["run_options"].append("--shm-size=16g")
    assert len(shm_problems(fixed)) == len(cfg["available_node_types"])
    sized = copy.deepcopy(fixed)
    sized["head_start_ray_commands"][-1] += " --object-store-memory=10000000000"
    sized["worker_start_ray_commands"][-1] += " --object-store-memory=10000000000"
    assert shm_problems(sized) == []
    too_big = copy.deepcopy(fixed)
    too_big["worker_start_ray_commands"][-1] += " --object-store-memory=40000000000"
    assert any("exceeds --shm-size" in p for p in shm_problems(too_big))
    # KubeRay sizes /dev/shm to the container's memory limit: an explicit store must fit in it
    for doc in yaml.safe_load_all((REPO / "deploy" / "raycluster.yaml").read_text()):
        if doc["kind"] != "RayCluster":
            continue
        spec = doc["spec"]
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            store = group["rayStartParams"].get("object-store-memory")
            limit = group["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"]
            assert store is None or int(store) <= int(limit.removesuffix("Gi")) * 2**30


# --- the RayJob ---------------------------------------------------------------------------------

def rayjob_problems(text: str) -> list[str]:
    """The RayJob's comments say how to resume it: a finished RayJob is deleted and created
    again; applying the same one again does nothing."""
    name = yaml.safe_load(text)["metadata"]["name"]
    comments = " ".join(line.split("#", 1)[1].strip() for line in text.splitlines() if "#" in line)
    problems = []
    for sentence in re.split(r"(?<=[.;:])\s+", comments):
        if re.search(r"\bappl(y|ied)\b.*\bagain\b", sentence, re.I) \
                and re.search(r"goes on|resumes?|continues", sentence, re.I) and "delete" not in sentence:
            problems.append(f"claims that applying it again resumes it: {sentence!r}")
    if f"kubectl delete rayjob {name}" not in comments or "kubectl apply -f deploy/rayjob.yaml" not in comments:
        problems.append(f"does not say `kubectl delete rayjob {name}`, then `kubectl apply -f deploy/rayjob.yaml`")
    return problems


def test_the_rayjob_says_it_is_deleted_and_created_again_to_resume():
    text = rayjob_text()
    assert rayjob_problems(text) == []
    old = text.split("  # Every stage in one driver")[0] + (
        "  # Every stage in one driver (jobs/run_pipeline.py); each is skipped when complete, so the same\n"
        "  # RayJob applied again after a failure goes on where it stopped.\n"
        "  entrypoint: " + text.split("  entrypoint: ", 1)[1])
    assert len(rayjob_problems(old)) == 2
    # the command it gives runs the RayJob the file defines
    assert shlex.split(yaml.safe_load(text)["spec"]["entrypoint"])[:2] == ["python", "jobs/run_pipeline.py"]


# --- IAM ----------------------------------------------------------------------------------------

def _policies(doc: str) -> list[dict]:
    blocks = re.findall(r"```json\n(.*?)```", doc, re.S)
    return [json.loads(block) for block in blocks]


def iam_problems(policies: list[dict], cfg: dict) -> list[str]:
    """The nodes' policy grants what the nodes call, on the resources cluster.yaml names."""
    statements = [s for p in policies for s in p.get("Statement", []) if s.get("Effect") == "Allow"]

    def resources(action: str) -> list[str]:
        found = []
        for s in statements:
            actions = [s["Action"]] if isinstance(s["Action"], str) else s["Action"]
            if action in actions:
                found += [s["Resource"]] if isinstance(s["Resource"], str) else s["Resource"]
        return found

    host, repository = cfg["docker"]["image"].split(":")[0].split("/", 1)
    region = ECR.match(host)["region"]
    profiles = {t["node_config"]["IamInstanceProfile"]["Name"] for t in cfg["available_node_types"].values()}
    needed = {
        "s3:ListBucket": None, "s3:GetObject": None, "s3:PutObject": None, "s3:DeleteObject": None,
        # an account-wide action: a repository ARN as its resource would match nothing
        "ecr:GetAuthorizationToken": "*",
        "ecr:BatchGetImage": f"arn:aws:ecr:{region}:ACCOUNT:repository/{repository}",
        "ecr:GetDownloadUrlForLayer": f"arn:aws:ecr:{region}:ACCOUNT:repository/{repository}",
        # the head's autoscaler starts workers with the profile's role
        "ec2:RunInstances": None, "ec2:CreateTags": None, "ec2:DescribeInstances": None,
        "ec2:TerminateInstances": None,
    }
    problems = []
    wanted = [*needed.items(), *(("iam:PassRole", f"arn:aws:iam::ACCOUNT:role/{p}") for p in sorted(profiles))]
    for action, resource in wanted:
        granted = resources(action)
        if not granted:
            problems.append(f"{action} is not granted")
        elif resource and resource not in granted:
            problems.append(f"{action} is granted on {granted}, not {resource}")
    for s in statements:
        tag = s.get("Condition", {}).get("StringEquals", {}).get("ec2:ResourceTag/ray-cluster-name")
        if tag is not None and tag != cfg["cluster_name"]:
            problems.append(f"{s.get('Sid')}: limited to cluster {tag!r}, not {cfg['cluster_name']!r}")
    return problems


def test_the_documented_iam_policy_grants_what_the_nodes_call():
    cfg, policies = cluster(), _policies(cloud_doc())
    assert policies, "docs/cloud.md holds no ```json policy"
    assert iam_problems(policies, cfg) == []
    # the same role, on EKS: the service account of deploy/ assumes it
    account = next(d for d in yaml.safe_load_all((REPO / "deploy" / "raycluster.yaml").read_text())
                   if d["kind"] == "ServiceAccount")
    role = account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].rsplit("/", 1)[1]
    assert {t["node_config"]["IamInstanceProfile"]["Name"] for t in cfg["available_node_types"].values()} == {role}
    # a policy without the registry, or with the token on the repository only, is refused
    without_ecr = [{**p, "Statement": [s for s in p["Statement"] if "ecr:" not in json.dumps(s)]} for p in policies]
    assert sum("ecr:" in p for p in iam_problems(without_ecr, cfg)) == 3
    narrow = json.loads(json.dumps(policies).replace('"Action": ["ecr:GetAuthorizationToken"], "Resource": "*"',
                                                     '"Action": ["ecr:GetAuthorizationToken"], "Resource": "x"'))
    assert any(p.startswith("ecr:GetAuthorizationToken is granted on") for p in iam_problems(narrow, cfg))
