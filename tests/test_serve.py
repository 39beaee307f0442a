"""Serving the routed ensemble with Ray Serve (pipeline/serving, docs/serving.md): the answer of
the in-process ensemble over HTTP, an expert added at runtime without restarting the others or
failing a request, and bad requests refused with a message while the service stays up."""

import base64
import importlib
import io
import json
import socket
import tarfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.evaluation.metrics import DEFAULT_TEMPLATES
from pipeline.serving import mixing
from pipeline.serving.app import APP_NAME, build
from pipeline.serving.options import ServeOptions
from pipeline.training.runs import run_name
from tests.tiny import EXPERTS, copy_run

NEW = run_name("expert", EXPERTS)    # the grown run's added expert


def png(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def call(url: str, body: bytes | None = None, content_type: str = "application/json",
         timeout: float = 60) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": content_type} if content_type else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def classify(url: str, image: str, labels, **extra) -> tuple[int, dict]:
    return call(f"{url}/classify", json.dumps({"image": image, "labels": list(labels), **extra}).encode())


def task(folder: Path) -> tuple[list[str], object]:
    """An eval task's class names and its first image (read straight from its tar)."""
    from PIL import Image

    classnames = (folder / "classnames.txt").read_text().split("\n")
    with tarfile.open(next((folder / "test").glob("*.tar"))) as tar:
        first = min(m.name for m in tar.getmembers() if m.name.endswith(".jpg"))
        image = Image.open(io.BytesIO(tar.extractfile(first).read())).convert("RGB")
    return [c.strip() for c in classnames if c.strip()], image


def in_process(ens, image, labels) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, weights) of jobs/predict.py's formula on MoDEEnsemble.zero_shot."""
    out = ens.zero_shot([image], labels, list(DEFAULT_TEMPLATES))
    scale = np.mean([float(ens.model(run_name("expert", e))[0].logit_scale.detach().exp())
                     for e in out.expert_logits])
    z = scale * out.logits[0]
    p = np.exp(z - z.max())
    return p / p.sum(), out.weights


@dataclass
class Served:
    url: str
    run_dir: Path
    hidden: Path     # the added expert's registry entry, moved aside before the service started
    entry: Path      # where it belongs


@pytest.fixture(scope="module")
def served(ray_local, grown, tmp_path_factory):
    """The grown tiny run served on 127.0.0.1 with the added expert's registry entry hidden:
    the service starts with the 4 original experts."""
    from ray import serve

    from pipeline.serving.app import router
    from pipeline.serving.fleet import Source

    run_dir = tmp_path_factory.mktemp("served") / "run"
    copy_run(grown[0], run_dir)
    entry = run_dir / "registry" / f"{NEW}.json"
    hidden = run_dir / f"{NEW}.json.hidden"
    entry.rename(hidden)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # 2 CPUs for 6 replicas: small reservations; caps small enough to test cheaply
    opts = ServeOptions(router_num_cpus=0.05, expert_num_cpus=0.05, poll_s=0.5,
                        router_max_replicas=1, expert_max_replicas=1, max_labels=50,
                        max_body_bytes=256 * 1024, max_image_pixels=100_000)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(router(Source("run", str(run_dir)), opts), name=APP_NAME, route_prefix="/")
        yield Served(f"http://127.0.0.1:{port}", run_dir, hidden, entry)
    finally:
        serve.shutdown()


def test_the_mix_is_predicts_formula_and_options_are_checked():
    w = np.array([0.5, 0.0, 0.5])
    logits = {0: np.array([0.2, 0.1, 0.3]), 2: np.array([0.1, 0.4, 0.0])}
    p = mixing.probabilities(w, logits, {0: 10.0, 2: 30.0})
    z = 20.0 * (0.5 * logits[0] + 0.5 * logits[2])
    assert p == pytest.approx(np.exp(z) / np.exp(z).sum(), abs=1e-12)
    assert mixing.ranked(["a", "b", "c"], p) == (["b", "a", "c"], sorted(p.tolist(), reverse=True))
    assert ServeOptions.from_dict({"top_k": 2, "templates": "a {c}"}).templates == ("a {c}",)
    assert ServeOptions.from_dict({"top_k": "2", "poll_s": "0.5"}).top_k == 2   # `serve run` strings
    for bad, field in [({"top_k": -1}, "top_k"), ({"poll": 1}, "unknown"), ({"max_labels": "x"}, "max_labels"),
                       ({"templates": ["no class"]}, "templates"), ({"router_min_replicas": 0}, "router_min")]:
        with pytest.raises(ValueError, match=field):
            ServeOptions.from_dict(bad)
    with pytest.raises(ValueError, match="run_dir"):
        build({"top_k": 1})


def test_the_serve_config_deploys_the_builder_with_valid_options():
    from ray.serve.schema import ServeDeploySchema

    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "deploy" / "serve.yaml").read_text())
    (app,) = ServeDeploySchema.model_validate(cfg).applications
    module, name = app.import_path.split(":")
    assert getattr(importlib.import_module(module), name) is build
    build(app.args)     # every argument a known option with an allowed value
    with pytest.raises(ValueError, match="expert_max_replicas"):
        build({**app.args, "expert_max_replicas": 0})


def test_served_answers_match_the_ensemble_and_a_new_expert_joins_without_a_failure(served, tiny_world):
    from ray import serve

    from pipeline.serving.fleet import expert_app

    shapes, shape = task(tiny_world / "eval" / "shapes")
    arrows, arrow = task(tiny_world / "eval" / "arrows")
    assert call(f"{served.url}/healthz")[1] == {"status": "ok", "experts": EXPERTS}
    listed = call(f"{served.url}/experts")[1]
    assert [e["name"] for e in listed["experts"]] == [run_name("expert", e) for e in range(EXPERTS)]

    image = png(shape)
    status, got = classify(served.url, image, shapes)
    assert status == 200, got
    assert sum(got["probs"]) == pytest.approx(1.0, abs=1e-9) and len(got["weights"]) == EXPERTS
    assert got["probs"] == sorted(got["probs"], reverse=True)
    assert sorted(got["labels"]) == sorted(shapes)

    def actors() -> dict[str, str]:
        return {n: serve.get_app_handle(expert_app(APP_NAME, n)).info.remote().result()["actor_id"]
                for n in (run_name("expert", e) for e in range(EXPERTS))}

    before = actors()
    # A client sends requests all through the growth; every one must succeed.
    stop, results = threading.Event(), []

    def client() -> None:
        while not stop.is_set():
            try:
                code, body = classify(served.url, image, shapes)
            except OSError as e:    # a refused or dropped connection is a failure too
                code, body = -1, {"error": repr(e)}
            results.append((time.monotonic(), code, len(body.get("weights", {})), body))

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    try:
        time.sleep(1.0)
        served.hidden.rename(served.entry)       # the new expert's training finishes
        deadline = time.monotonic() + 180
        while len(call(f"{served.url}/experts")[1]["experts"]) == EXPERTS:
            assert time.monotonic() < deadline, "the new expert was not served within 3 minutes"
            time.sleep(0.5)
        grew = time.monotonic()
        while not any(t > grew and n == EXPERTS + 1 for t, _, n, _ in results):
            assert time.monotonic() < deadline, "no request answered by the grown fleet"
            time.sleep(0.2)
    finally:
        stop.set()
        thread.join(60)
    failures = [(code, body) for _, code, _, body in results if code != 200]
    assert not failures, failures[:3]
    assert {n for _, _, n, _ in results} == {EXPERTS, EXPERTS + 1}   # answers before and after

    listed = call(f"{served.url}/experts")[1]
    assert [e["name"] for e in listed["experts"]][-1] == NEW
    assert listed["experts"][-1]["generation"] == "arrows" and listed["generations"] == ["arrows"]
    assert actors() == before, "an existing expert's replica was restarted"

    # the answers of the ensemble in this process (jobs/predict.py's formula), old task and new
    from pipeline.evaluation.ensemble import MoDEEnsemble

    ens = MoDEEnsemble(str(served.run_dir))
    assert ens.num_experts == EXPERTS + 1
    for labels, picture in ((shapes, shape), (arrows, arrow)):
        status, got = classify(served.url, png(picture), labels)
        assert status == 200, got
        assert sum(got["probs"]) == pytest.approx(1.0, abs=1e-9)
        probs, weights = in_process(ens, picture, labels)
        by_label = dict(zip(got["labels"], got["probs"], strict=True))
        assert [by_label[c] for c in labels] == pytest.approx(probs, abs=1e-5)
        assert list(got["weights"].values()) == pytest.approx(weights, abs=1e-5)
    # the new expert takes its own domain's labels
    assert max(got["weights"], key=got["weights"].get) == NEW, got["weights"]
    image = png(arrow)
    # top_k runs only the heaviest experts: the others get weight 0
    status, got = classify(served.url, image, arrows, top_k=1)
    assert status == 200 and got["weights"][NEW] == 1.0 and sum(got["weights"].values()) == 1.0


def test_bad_requests_get_a_4xx_with_a_message_and_the_service_stays_up(served, tiny_world):
    from PIL import Image

    labels, image = task(tiny_world / "eval" / "shapes")
    good = png(image)
    raw = base64.b64decode(good)
    b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731
    body = lambda **fields: json.dumps(fields).encode()  # noqa: E731
    url = f"{served.url}/classify"
    cases = {
        "corrupt image": (body(image=b64(raw[: len(raw) // 2]), labels=labels), 400, "image cannot be decoded"),
        "not an image": (body(image=b64(b"hello, world"), labels=labels), 400, "image cannot be decoded"),
        "empty image": (body(image="", labels=labels), 400, "image is empty"),
        "invalid base64": (body(image="@@not base64@@", labels=labels), 400, "base64"),
        "empty labels": (body(image=good, labels=[]), 422, "at least two"),
        "blank label": (body(image=good, labels=["a", " "]), 422, "empty"),
        "duplicate labels": (body(image=good, labels=["a", "a"]), 422, "distinct"),
        "too many labels": (body(image=good, labels=[f"c{i}" for i in range(51)]), 422, "limit of 50"),
        "labels not strings": (body(image=good, labels=[1, 2]), 422, "labels must be a list of strings"),
        "negative top_k": (body(image=good, labels=labels, top_k=-1), 422, "top_k"),
        "top_k not a number": (body(image=good, labels=labels, top_k="2"), 422, "top_k must be"),
        "too many pixels": (body(image=png(Image.new("RGB", (400, 400))), labels=labels), 413, "too large"),
        "huge body": (body(image="A" * 300_000, labels=labels), 413, "over the limit"),
        "not JSON": (b"{image:", 400, "not valid JSON"),
        "not an object": (b"[1, 2]", 422, "JSON object"),
        "unknown field": (body(image=good, labels=labels, colour="red"), 422, "unknown fields ['colour']"),
        "missing field": (body(labels=labels), 422, "missing fields ['image']"),
    }
    for what, (data, code, message) in cases.items():
        status, answer = call(url, data)
        assert (status, message in answer.get("detail", "")) == (code, True), (what, status, answer)
    status, answer = call(url, body(image=good, labels=labels), content_type="text/plain")
    assert status == 415 and "application/json" in answer["detail"]
    assert call(url, b"", content_type="")[0] == 415      # urllib's default: a form
    status, answer = classify(served.url, good, labels)
    assert status == 200 and len(answer["probs"]) == len(labels)
    assert call(f"{served.url}/healthz")[0] == 200
