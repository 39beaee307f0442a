import dataclasses
import json
import math
import shutil

import numpy as np
import pytest
import torch

from pipeline.core.config import DataConfig, StorageConfig, TrainConfig
from pipeline.training.checkpoint_io import list_checkpoints, load_model, read_checkpoint
from pipeline.training.inputs import DeviceNormalize, Preprocess
from pipeline.training.schedule import lr_at
from pipeline.training.train_loop import param_groups

# ----------------------------------------------------------------------------- pure helpers
PEAK, WARMUP, TOTAL = 1e-3, 1_000, 11_000


def test_lr_warms_up_linearly_then_decays_to_zero():
    assert lr_at(0, PEAK, WARMUP, TOTAL) == 0.0
    assert lr_at(WARMUP // 4, PEAK, WARMUP, TOTAL) == pytest.approx(PEAK / 4)
    assert lr_at(WARMUP, PEAK, WARMUP, TOTAL) == pytest.approx(PEAK)
    assert lr_at((WARMUP + TOTAL) // 2, PEAK, WARMUP, TOTAL) == pytest.approx(PEAK / 2)
    assert lr_at(TOTAL, PEAK, WARMUP, TOTAL) == 0.0
    assert lr_at(TOTAL + 500, PEAK, WARMUP, TOTAL) == 0.0
    decay = [lr_at(s, PEAK, WARMUP, TOTAL) for s in range(WARMUP, TOTAL + 1, 250)]
    assert all(a > b for a, b in zip(decay, decay[1:], strict=False))


def _lrs(start: int, end: int, batch: int) -> list[float]:
    """The lr of every step a run takes from ``start`` to ``end`` samples, as the loop sets it."""
    out, seen = [], start
    while seen < end:
        out.append(lr_at(seen + batch, PEAK, WARMUP, TOTAL))
        seen += batch
    return out


def test_lr_of_seed_plus_continuation_is_one_run():
    batch, seed_end = 100, 6_400
    assert _lrs(0, seed_end, batch) + _lrs(seed_end, TOTAL, batch) == _lrs(0, TOTAL, batch)
    # and the continuation does not restart the schedule: no second warmup
    assert _lrs(seed_end, TOTAL, batch)[0] < PEAK


def test_weight_decay_only_on_matrices():
    from pipeline.training.model import create

    model, *_ = create("mode-tiny")
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"])
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert {"logit_scale", "visual.class_embedding", "ln_final.bias"} <= skipped
    assert "token_embedding.weight" not in skipped
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_the_fused_optimiser_makes_the_same_updates_as_the_per_tensor_one():
    """make_optimizer's fused AdamW (one kernel for all parameters) against PyTorch's
    per-tensor loop with the same groups and hyperparameters, both fed the same gradients (those
    of the per-tensor model) for three CLIP steps, so only the optimisers' arithmetic differs.

    The bound, from that arithmetic: bias-corrected Adam moves a weight w by
    lr * (m_hat / (sqrt(v_hat) + eps) + wd * w) a step, and by Cauchy-Schwarz
    |m_hat| / sqrt(v_hat) <= B = sqrt(sum_k a_k**2 / b_k), with a_k and b_k the bias-corrected
    weights that the moving averages give step k's gradient and its square. Each optimiser
    evaluates the formula in float32 with about a dozen roundings per step; each is a relative
    error of at most u = 2**-24 of a quantity no larger than |w| or the step, and no operation
    amplifies one (sums of terms of one sign, square roots, divisions by sqrt(v_hat) + eps).
    After t steps the two weights differ by at most 2 * 12 * t * u * scale, with
    scale = |w0| + t * lr * (B + wd * |w0|): IEEE arithmetic on identical inputs, on any CPU.
    Different groups, betas, learning rate or weight decay move weights by about lr * wd * |w|
    or more, thousands of times the bound."""
    import math

    import torch
    from open_clip.loss import ClipLoss

    from pipeline.training.model import create
    from pipeline.training.train_loop import ADAMW_BETAS, ADAMW_EPS, make_optimizer

    lr, wd, steps = 3e-3, 0.1, 3
    torch.manual_seed(0)
    images, texts = torch.randn(8, 3, 32, 32), torch.randint(0, 400, (8, 16))
    models = []
    for _ in range(2):
        torch.manual_seed(1)
        models.append(create("mode-tiny")[0])
    fused, reference = models
    start = {name: value.clone() for name, value in reference.state_dict().items()}
    optimizers = (make_optimizer(fused, lr, wd),
                  torch.optim.AdamW(param_groups(reference, wd), lr=lr, betas=ADAMW_BETAS,
                                    eps=ADAMW_EPS, foreach=False))
    assert optimizers[0].defaults["fused"] is True
    for _ in range(steps):
        loss = ClipLoss()(*reference(images, texts))
        optimizers[1].zero_grad()
        loss.backward()
        for f, r in zip(fused.parameters(), reference.parameters(), strict=True):
            f.grad = None if r.grad is None else r.grad.clone()
        for optimizer in optimizers:
            optimizer.step()
    b1, b2 = ADAMW_BETAS
    a = [(1 - b1) * b1 ** (steps - k) / (1 - b1 ** steps) for k in range(1, steps + 1)]
    b = [(1 - b2) * b2 ** (steps - k) / (1 - b2 ** steps) for k in range(1, steps + 1)]
    bound_b = math.sqrt(sum(x * x / y for x, y in zip(a, b, strict=True)))
    moved = 0
    for name, value in fused.state_dict().items():
        w0 = start[name].abs()
        scale = w0 + steps * lr * (bound_b + wd * w0)
        gap = (value - reference.state_dict()[name]).abs()
        assert (gap <= 2 * 12 * steps * 2.0 ** -24 * scale).all(), (name, gap.max().item())
        moved += not torch.equal(value, start[name])
    assert moved > 50      # the steps changed the weights (the comparison is not of two inits)


def test_preprocess_uses_open_clip_transform_and_tokenizer():
    from pipeline.data.demo_world import _rng, render

    jpgs = [render(_rng(0, "t", i), "shapes", "circle", 32)[0] for i in range(3)]
    batch = {"key": np.array(["a", "b", "c"]), "caption": np.array(["a red circle", "x", "a b c"], dtype=object),
             "image": np.array(jpgs, dtype=object)}
    preprocess = Preprocess("mode-tiny")
    out = preprocess(batch)
    assert out["image"].shape == (3, 3, 32, 32) and out["image"].dtype == np.uint8
    assert out["text"].shape == (3, 16) and out["text"].dtype == np.int64
    # normalised on the device: open_clip's statistics, a roughly zero-centred image
    images = DeviceNormalize(preprocess.mean, preprocess.std)(torch.from_numpy(out["image"]))
    assert images.dtype == torch.float32 and images.min() < -0.5
    assert (out["text"][:, 0] == out["text"][0, 0]).all()  # start-of-text token
    batch["image"][2] = jpgs[2][:40]  # a truncated JPEG
    with pytest.raises(ValueError, match=r"image of key 'c' does not decode"):
        Preprocess("mode-tiny")(batch)
    batch["caption"][1] = None
    with pytest.raises(ValueError, match=r"without caption \(keys \['b'\]\)"):
        Preprocess("mode-tiny")(batch)


@pytest.mark.parametrize("augment", [False, True])
def test_uint8_images_normalised_on_the_device_are_open_clips_inputs(augment):
    """Images travel as uint8 and are normalised on the device (docs/training.md): the
    tensors equal open_clip's own transform's to float rounding, with its random crops too
    (the same torch seed draws the same crop), and a CLIP's loss on them is the same.

    The rounding, bounded from the arithmetic: both paths start from the same uint8 pixel k.
    open_clip's ToTensor computes k / 255 and torchvision's to_dtype k * (1 / 255), together
    at most 3u apart on values in [0, 1] (u = 2**-24); both then subtract the mean and divide
    by the std, each rounding once more. So they differ by at most
    (3u + 2u * s) / min(std) + 2u * s / min(std), with s the largest |x - mean| for x in
    [0, 1]. The losses of inputs that close agree within torch's float32 tolerance."""
    from open_clip.loss import ClipLoss

    from pipeline.data.demo_world import _rng, render
    from pipeline.data.images import open_rgb
    from pipeline.training.model import create

    jpgs = [render(_rng(0, "u", i), "shapes", "circle", 48)[0] for i in range(8)]
    batch = {"caption": np.array([f"a circle {i}" for i in range(8)], dtype=object),
             "image": np.array(jpgs, dtype=object)}
    preprocess = Preprocess("mode-tiny", augment)
    torch.manual_seed(0)
    out = preprocess(batch)
    torch.manual_seed(0)
    reference = torch.stack([preprocess.transform(open_rgb(j, max_pixels=None)) for j in jpgs])
    images = DeviceNormalize(preprocess.mean, preprocess.std)(torch.from_numpy(out["image"]))
    assert images.dtype == reference.dtype and images.shape == reference.shape
    u = 2.0 ** -24
    mean, std = np.array(preprocess.mean), np.array(preprocess.std)
    spread = max(1 - mean.min(), mean.max())
    torch.testing.assert_close(images, reference, rtol=0,
                               atol=(3 * u + 4 * u * spread) / std.min())
    torch.manual_seed(1)
    model, *_ = create("mode-tiny")
    texts = torch.from_numpy(out["text"])
    with torch.no_grad():
        ours, theirs = (ClipLoss()(*model(x, texts)) for x in (images, reference))
    torch.testing.assert_close(ours, theirs)


def _grads(model, images, texts, **step_args):
    from open_clip.loss import ClipLoss

    from pipeline.training.train_loop import _autocast, train_step

    model.zero_grad(set_to_none=True)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    loss = train_step(model, ClipLoss(), images, texts, scaler,
                      lambda: _autocast("fp32", torch.device("cpu")), **step_args)
    return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_accumulation_checkpointing_and_channels_last_keep_the_gradients():
    """train.accum_steps (open_clip's accum_freq: micro-batches with the whole batch as
    negatives), train.grad_checkpointing and train.channels_last change how a step runs, not
    what it computes: the loss and every parameter's gradient equal the plain step's to float
    rounding (1e-5 of the largest gradient). A micro-batch loss of its own (what plain
    accumulation would do) is far off, so the comparison can tell."""
    from open_clip.loss import ClipLoss

    from pipeline.training.model import create

    torch.manual_seed(0)
    images, texts = torch.randn(16, 3, 32, 32), torch.randint(0, 400, (16, 16))
    torch.manual_seed(1)
    model, *_ = create("mode-tiny")
    loss, grads = _grads(model, images, texts)
    scale = max(g.abs().max() for g in grads.values())

    def same(other_loss, other_grads):
        torch.testing.assert_close(other_loss, loss, rtol=1e-5, atol=1e-6)
        assert other_grads.keys() == grads.keys()
        for name, g in grads.items():
            torch.testing.assert_close(other_grads[name], g, rtol=0, atol=1e-5 * scale, msg=name)

    same(*_grads(model, images, texts, accum_steps=4))
    model.set_grad_checkpointing(True)
    same(*_grads(model, images, texts))
    model.set_grad_checkpointing(False)
    last = model.to(memory_format=torch.channels_last)
    same(*_grads(last, images.contiguous(memory_format=torch.channels_last), texts))
    # the control: four separate micro-batch losses, averaged, are another objective
    model.zero_grad(set_to_none=True)
    for i, t in zip(images.chunk(4), texts.chunk(4), strict=True):
        (ClipLoss()(*model(i, t)) / 4).backward()
    naive = model.visual.conv1.weight.grad
    assert (naive - grads["visual.conv1.weight"]).abs().max() > 1e-3 * scale


def test_attention_runs_through_pytorchs_sdpa(monkeypatch):
    """open_clip's attention blocks (torch's MultiheadAttention, asked for no weights) call
    PyTorch's fused scaled_dot_product_attention in training: nothing to switch on."""
    import torch.nn.functional as F

    from pipeline.training.model import create

    calls = []
    sdpa = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    model, *_ = create("mode-tiny")
    model.train()
    image, text, _ = model(torch.randn(2, 3, 32, 32), torch.randint(0, 400, (2, 16)))
    (image.sum() + text.sum()).backward()
    layers = len(model.visual.transformer.resblocks) + len(model.transformer.resblocks)
    assert len(calls) == layers


def test_models_are_open_clip_configs():
    from pipeline.training.model import create, names, tools

    assert {"mode-tiny", "ViT-B-32", "ViT-B-16"} <= set(names())
    model, _, preprocess_val, tokenizer = create("mode-tiny")
    assert 3_000_000 < sum(p.numel() for p in model.parameters()) < 4_000_000
    assert tokenizer(["a red circle"]).shape == (1, 16)
    big, *_ = create("ViT-B-32")  # no pretrained weights needed, nothing downloaded
    assert sum(p.numel() for p in big.parameters()) > 100_000_000
    assert repr(tools("ViT-B-16")[1]) == repr(create("ViT-B-16")[2])
    with pytest.raises(ValueError, match="unknown model 'ViT-X'.*mode-tiny"):
        create("ViT-X")


def test_train_config_is_checked():
    from pipeline.core.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"train\.precision: 'fp16' is not allowed.*'amp_bf16'"):
        load_config("demo", ["train.precision=fp16"])
    with pytest.raises(ConfigError, match=r"train\.batch_size \(128\) must be a multiple of "
                                          r"train\.num_workers \(3\)"):
        load_config("demo", ["train.num_workers=3"])
    with pytest.raises(ConfigError, match=r"train\.cache_inputs.*augment"):
        load_config("demo", ["train.augment=true"])
    with pytest.raises(ConfigError, match=r"train\.cpus_per_worker: must be >= 0"):
        load_config("demo", ["train.cpus_per_worker=-1"])
    with pytest.raises(ConfigError, match=r"train\.warmup_samples"):
        load_config("demo", ["train.warmup_samples=240000"])
    with pytest.raises(ConfigError, match=r"train\.accum_steps \(3\) must divide each worker's "
                                          r"batch .* = 64\)"):
        load_config("demo", ["train.num_workers=2", "train.accum_steps=3"])
    with pytest.raises(ConfigError, match=r"train\.prefetch_batches: must be > 0"):
        load_config("demo", ["train.prefetch_batches=0"])


# ----------------------------------------------------------------------------- Ray Train runs
BATCH = 32
# cache_inputs: the tiny world is 600 rows, 18 steps an epoch; streaming and decoding it again
# every epoch would cost more than the training (the decode test covers the streamed path).
CFG = TrainConfig(model="mode-tiny", batch_size=BATCH, lr=3e-3, total_samples=200 * BATCH,
                  warmup_samples=20 * BATCH, precision="fp32", augment=False, shuffle_buffer=256,
                  cache_inputs=True, checkpoint_every_steps=20, keep_checkpoints=2,
                  log_every_steps=5, num_workers=1, cpus_per_worker=0.5, threads_per_worker=2,
                  seed=0)
SEED_END = 100 * BATCH      # the "seed" run stops at step 100
CRASH_AT = 50               # ... its first worker killed (SIGKILL) after step 50 (checkpoint: step 40)
EXPERT_END = 150 * BATCH    # the "expert" continues from the seed for 50 steps


@pytest.fixture(scope="module")
def runs(ray_local, tiny_world, tmp_path_factory, s3_endpoint):
    """A seed run of 100 steps and an expert started from its final checkpoint. The seed keeps
    its checkpoints in a local run directory, the expert in one on S3. (A seed run whose worker
    is killed: ``killed``, in make test-reliability.)"""
    from pipeline.core.rundir import RunDir
    from pipeline.data.ingest import good_rows, read_samples
    from pipeline.training.train import train

    rows = good_rows(read_samples(str(tiny_world / "train"), DataConfig(), StorageConfig(),
                                  decode_images=False))
    run = RunDir(str(tmp_path_factory.mktemp("run")), StorageConfig())
    out = {"run": run, "rows": rows, "n_rows": rows.count()}
    out["seed"] = train("seed", rows, CFG, run.stage_uri("checkpoints"), SEED_END)
    out["s3"] = StorageConfig(s3_endpoint_url=s3_endpoint)
    out["run_s3"] = RunDir("s3://mode/train-test", out["s3"])
    out["expert"] = train("expert", rows, CFG, out["run_s3"].stage_uri("checkpoints"), EXPERT_END,
                          init_checkpoint=out["seed"].checkpoint, storage=out["s3"])
    return out


def test_decoding_in_the_worker_gives_the_tasks_inputs(ray_local, tiny_world):
    """train.decode_in_worker moves the decode from Ray Data tasks into the Train worker: the
    same rows give the same tensors, and carry their expert_id along. Matched by key
    (``key_hash``): Ray Data's map tasks may hand their blocks on in the order they finish."""
    from pipeline.data.ingest import good_rows, read_samples
    from pipeline.training.train import model_inputs
    from pipeline.training.train_loop import _streamed_batches

    rows = good_rows(read_samples(str(tiny_world / "train"), DataConfig(), StorageConfig(),
                                  decode_images=False)).limit(100) \
        .add_column("expert_id", lambda df: df["key"].map(len).astype("int64") % 4).materialize()
    cfg = dataclasses.replace(CFG, shuffle_buffer=0)
    both = []
    for in_worker in (False, True):
        shard = rows if in_worker else model_inputs(rows, cfg.model, cfg.augment)
        batches = list(_streamed_batches(shard, dataclasses.replace(cfg, decode_in_worker=in_worker),
                                         BATCH, torch.device("cpu"), 0, cfg.seed))
        got = {k: torch.cat([b[k] for b in batches]) for k in ("image", "text", "key_hash", "expert_id")}
        by_key = torch.argsort(got["key_hash"])
        both.append({k: v[by_key] for k, v in got.items()})
    assert len(both[0]["text"]) == 100     # cache_inputs: the partial last batch comes too
    for k in ("key_hash", "image", "text", "expert_id"):
        assert both[0][k].dtype == both[1][k].dtype and torch.equal(both[0][k], both[1][k])


DP_STEPS, DP_BATCH = 8, 16


def _fixed_batches(rank: int, world: int, wrap=lambda model: model) -> list[float]:
    """DP_STEPS steps of the training loop's maths (``create``, ``make_optimizer``,
    ``clip_loss``, ``train_step``) on seeded global batches of DP_BATCH, rank ``rank`` of
    ``world`` taking its contiguous share of each; the global batch's loss at every step (the
    mean of the ranks' losses)."""
    from pipeline.training.model import create
    from pipeline.training.train_loop import _autocast, clip_loss, make_optimizer, train_step

    torch.set_num_threads(1)
    torch.manual_seed(1)
    model, *_ = create("mode-tiny")
    model = wrap(model)
    core = model.module if hasattr(model, "module") else model
    optimizer = make_optimizer(core, 3e-3, 0.1)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    loss_fn = clip_loss(rank, world)
    share = slice(rank * DP_BATCH // world, (rank + 1) * DP_BATCH // world)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(DP_STEPS):
        images = torch.randn(DP_BATCH, 3, 32, 32, generator=g)
        texts = torch.randint(0, 400, (DP_BATCH, 16), generator=g)
        optimizer.zero_grad(set_to_none=True)
        loss = train_step(model, loss_fn, images[share], texts[share], scaler,
                          lambda: _autocast("fp32", torch.device("cpu")))
        optimizer.step()
        if world > 1:
            torch.distributed.all_reduce(loss)
            loss /= world
        losses.append(loss.item())
    return losses


def _two_rank_worker(config):
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    return _fixed_batches(ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.prepare_model)


@pytest.mark.trains
def test_two_gloo_workers_follow_one_worker_on_the_same_global_batches(ray_local, tmp_path):
    """Data parallel training proven on CPU before it runs on GPUs: two Ray Train workers
    (TorchTrainer, gloo), each fed half of every global batch, give the loss curve of one
    worker on the whole batch, through the loop's own optimiser, loss and step. The losses
    agree to 1e-5 relative over 8 steps: the all-reduce sums the ranks' gradients in another
    order, so the weights part by float rounding; Adam can turn a gradient that is zero but for
    rounding into a step of about lr, but only where the loss does not depend on the weight to
    first order, so the loss moves by rounding only. A real defect shows: with open_clip's
    gather without grad (each rank's gradient missing the other's rows) the curve was 7% off."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    one = _fixed_batches(0, 1)
    result = TorchTrainer(_two_rank_worker, scaling_config=ScalingConfig(
        num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(name="dp", storage_path=str(tmp_path))).fit()
    two = result.return_value
    assert len(two) == DP_STEPS and one[-1] < one[0] - 0.1     # it learns something
    np.testing.assert_allclose(two, one, rtol=1e-5)


def _kept(run, name):
    found = list_checkpoints(run.fs, run.stage_path("checkpoints", name), run.scheme)
    return [uri.rsplit("/", 1)[1] for uri in found]


@pytest.fixture(scope="module")
def killed(ray_local, tiny_world, tmp_path_factory):
    """The seed run of ``runs``, its worker killed at step 50: it restarts (train.max_failures=1)
    from its step-40 checkpoint."""
    from pipeline.core.rundir import RunDir
    from pipeline.data.ingest import good_rows, read_samples
    from pipeline.training.train import train

    rows = good_rows(read_samples(str(tiny_world / "train"), DataConfig(), StorageConfig(),
                                  decode_images=False))
    run = RunDir(str(tmp_path_factory.mktemp("killed")), StorageConfig())
    return run, train("seed", rows, dataclasses.replace(CFG, max_failures=1),
                      run.stage_uri("checkpoints"), SEED_END, crash_at_step=CRASH_AT)


@pytest.mark.reliability
def test_a_killed_worker_restarts_at_the_checkpointed_step(killed, tmp_path):
    """Rank 0 is killed with SIGKILL after step 50 (a real process death: no exception, no
    cleanup); with train.max_failures=1 Ray Train starts a new worker process, which resumes
    from the step-40 checkpoint and ends at exactly the planned step and samples."""
    run, r = killed
    assert r.restarts == 1 and [st["step"] for st in r.starts] == [0, 40]
    assert r.starts[0]["pid"] != r.starts[1]["pid"]
    assert (r.start_step, r.start_samples) == (40, 40 * BATCH)
    assert r.steps_run == 60  # steps 41..100; the 40 before the checkpoint are not redone
    assert (r.step, r.samples_seen) == (100, SEED_END)
    assert r.checkpoint.endswith("/checkpoints/seed/step_00000100")
    # the log carries over from the checkpoint: the lost steps 41-50 are logged once, afresh
    assert [line["step"] for line in r.history] == list(range(5, 101, 5))
    assert _kept(run, "seed") == ["step_00000080", "step_00000100"]
    # each worker group left an event file; merged, they hold every log line once: the failed
    # group copied only the lines up to its step-40 checkpoint, so the lines 45 and 50 it logged
    # before it was killed are not drawn twice
    files, scalars = _scalars(run.fs, run.stage_path("checkpoints", "seed", "tensorboard"), tmp_path)
    assert files == 2
    _same_as_history(scalars, r)


def test_a_checkpoint_cut_short_is_found_and_the_one_before_is_resumed(tmp_path):
    """A crash during an upload leaves the latest checkpoint file shorter than what its
    integrity.json recorded: a resume finds it before loading and takes the previous one."""
    from ray.train import Checkpoint

    from pipeline.training.checkpoint_io import DamagedCheckpoint, step_dir_name, write_dir
    from pipeline.training.train_loop import _resume

    run = tmp_path / "run"
    for step in (20, 40):
        (run / step_dir_name(step)).mkdir(parents=True)
        write_dir(str(run / step_dir_name(step)), {"step": step, "w": torch.ones(1000) * step},
                  [{"step": step}])
    config = {"run_uri": str(run), "storage": {}, "name": "r"}
    latest = run / step_dir_name(40)
    state, history, registered = _resume(Checkpoint.from_directory(str(latest)), config, rank=1)
    assert state["step"] == 40 and history == [{"step": 40}] and registered
    # Ray registered step 20 only (the worker died before its step-40 report was taken in):
    # the newer, whole checkpoint is the one resumed
    state, _, registered = _resume(Checkpoint.from_directory(str(run / step_dir_name(20))),
                                   config, rank=1)
    assert state["step"] == 40 and not registered
    data = (latest / "checkpoint.pt").read_bytes()
    (latest / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(DamagedCheckpoint, match="cut short"):
        read_checkpoint(str(latest), StorageConfig())
    state, history, _ = _resume(Checkpoint.from_directory(str(latest)), config, rank=1)
    assert state["step"] == 20 and torch.equal(state["w"], torch.ones(1000) * 20)
    # the same length, other bytes: the hash tells
    (latest / "checkpoint.pt").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(DamagedCheckpoint, match="SHA-256"):
        read_checkpoint(str(latest), StorageConfig())
    # a directory whose upload stopped before its checkpoint file: incomplete, skipped
    (latest / "checkpoint.pt").unlink()
    state, _, _ = _resume(Checkpoint.from_directory(str(latest)), config, rank=1)
    assert state["step"] == 20
    first = run / step_dir_name(20) / "checkpoint.pt"
    first.write_bytes(first.read_bytes()[:100])
    with pytest.raises(DamagedCheckpoint, match="no intact checkpoint"):
        _resume(Checkpoint.from_directory(str(latest)), config, rank=1)


def test_a_rerun_at_its_end_registers_a_checkpoint_ray_never_took_in(runs, tmp_path):
    """A worker killed after writing its final checkpoint but before Ray Train took in its
    report leaves Ray's latest registered checkpoint at the one before. A rerun resumes from the
    newer one (``_resume``), trains no step, and reports it once: the result is the final
    checkpoint, and the prune that follows keeps it (taking the registered one instead would
    report a checkpoint the prune may already have deleted). The kill is made here by taking
    the last report out of Ray's checkpoint-manager snapshot, as it stands when the report
    never arrived."""
    from pipeline.training.train import train

    storage = tmp_path / "checkpoints"
    shutil.copytree(runs["run"].stage_path("checkpoints", "seed"), storage / "seed")
    snapshot_file = storage / "seed" / "checkpoint_manager_snapshot.json"
    snapshot = json.loads(snapshot_file.read_text())
    assert [r["checkpoint_dir_name"] for r in snapshot["checkpoint_results"]] == \
        ["step_00000080", "step_00000100"]
    snapshot["checkpoint_results"].pop()
    snapshot["checkpoint_report_indices"].pop()
    snapshot["latest_checkpoint_result"] = snapshot["checkpoint_results"][-1]
    snapshot_file.write_text(json.dumps(snapshot))

    r = train("seed", runs["rows"], CFG, str(storage), SEED_END)
    assert (r.start_step, r.steps_run, r.step, r.samples_seen) == (100, 0, 100, SEED_END)
    assert r.checkpoint == str(storage / "seed" / "step_00000100")
    assert sorted(p.name for p in (storage / "seed").glob("step_*")) == \
        ["step_00000080", "step_00000100"]
    after = json.loads(snapshot_file.read_text())
    assert after["latest_checkpoint_result"]["checkpoint_dir_name"] == "step_00000100"


def test_cached_inputs_hold_every_row(runs):
    r = runs["seed"]
    assert r.restarts == 0 and runs["expert"].restarts == 0
    # every good row, the last partial batch too, and training went on past the first epoch
    assert r.cached_rows == runs["n_rows"]
    assert r.steps_run * BATCH > runs["n_rows"]
    assert r.first_batches is None      # ingest's rows carry no expert_id: no mix to record


def test_loss_falls(runs):
    losses = [line["loss"] for line in runs["seed"].history]
    assert abs(losses[0] - math.log(BATCH)) < 0.5  # about chance at the start
    assert np.mean(losses[-3:]) < losses[0] - 0.5, losses


def test_expert_continues_the_seed(runs):
    r = runs["expert"]
    assert (r.start_step, r.start_samples, r.steps_run) == (100, SEED_END, 50)
    assert (r.step, r.samples_seen) == (150, EXPERT_END)
    assert r.history[0]["step"] == 105  # its own log, not the seed's
    for line in r.history:  # the seed's schedule goes on: no new warmup
        assert line["lr"] == pytest.approx(lr_at(line["samples_seen"], CFG.lr, CFG.warmup_samples,
                                                 CFG.total_samples))
    assert r.checkpoint == "s3://mode/train-test/checkpoints/expert/step_00000150"
    assert _kept(runs["run_s3"], "expert") == ["step_00000140", "step_00000150"]
    seed = read_checkpoint(runs["seed"].checkpoint, StorageConfig())
    expert = read_checkpoint(r.checkpoint, runs["s3"])
    assert expert["model_name"] == "mode-tiny" and expert["samples_seen"] == EXPERT_END
    assert seed["optimizer"]["state"][0]["step"] + 50 == expert["optimizer"]["state"][0]["step"]
    model, _, tokenizer = load_model(r.checkpoint, runs["s3"])
    assert torch.equal(model.logit_scale, expert["model"]["logit_scale"])
    assert not torch.equal(expert["model"]["visual.proj"], seed["model"]["visual.proj"])


def _scalars(fs, folder: str, tmp_path) -> tuple[int, dict[str, list[tuple[int, float]]]]:
    """How many event files a run's ``tensorboard/`` folder holds, and their scalars by tag as
    (step, value), read back by TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fs.invalidate_cache(folder)   # the worker wrote there through a handle of its own
    files = fs.ls(folder, detail=False)
    for f in files:
        fs.get_file(f, str(tmp_path / f.rsplit("/", 1)[1]))
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0}).Reload()
    return len(files), {tag: sorted((e.step, e.value) for e in acc.Scalars(tag))
                        for tag in acc.Tags()["scalars"]}


@pytest.mark.parametrize("name", ["seed", "expert"])
def test_tensorboard_events_are_the_history(runs, name, tmp_path):
    """A worker group leaves an event file beside the checkpoints (locally and on S3) holding
    every log line once. (Two groups, the first killed: the killed-worker test.)"""
    run, result = (runs["run"], runs["seed"]) if name == "seed" else (runs["run_s3"], runs["expert"])
    files, scalars = _scalars(run.fs, run.stage_path("checkpoints", result.name, "tensorboard"),
                              tmp_path)
    assert files == len(result.starts) == 1
    _same_as_history(scalars, result)


def _same_as_history(scalars: dict, result) -> None:
    keys = ("loss", "lr", "samples_per_s", "data_wait")
    assert set(scalars) == {f"train/{k}" for k in keys}
    for key in keys:
        steps, values = zip(*scalars[f"train/{key}"], strict=True)
        assert list(steps) == [line["samples_seen"] for line in result.history], key
        assert list(values) == pytest.approx([line[key] for line in result.history], rel=1e-6), key


def test_curves_plot_every_run_with_a_history(runs):
    from pipeline.training.curves import plot

    seed = {"kind": "seed", "history": runs["seed"].history}
    expert = {"kind": "expert", "expert_id": 0, "history": runs["expert"].history}
    png = plot({"seed": seed, "expert-0": expert})
    assert png.startswith(b"\x89PNG")
    # a run without a history adds nothing; one with a history changes the figure
    assert plot({"seed": seed, "expert-0": expert, "dense-matched": {"kind": "dense-matched"}}) == png
    assert plot({"seed": seed}) != png
    # every kind has its place and line
    from pipeline.training.curves import ORDER, STYLE
    from pipeline.training.runs import KINDS
    assert set(ORDER) == set(STYLE) == set(KINDS)
    assert plot({"seed": seed, "full-1": {"kind": "full", "history": runs["expert"].history}}) != \
        plot({"seed": seed})
    with pytest.raises(ValueError, match="no run has a training history"):
        plot({"dense-matched": {"kind": "dense-matched", "history": []}})


# ----------------------------------------------------------------------------- start-up cost
def _python(code: str, **env: str) -> str:
    import os
    import subprocess
    import sys
    from pathlib import Path

    base = {k: v for k, v in os.environ.items() if k != "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"}
    out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True,
                         text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


def test_train_module_imports_neither_torch_nor_open_clip():
    """Ray Train's controller and Ray Data's coordinator unpickle pipeline.training.train's functions;
    torch and open_clip (8 s of CPU per process) must come only with the worker loop."""
    heavy = "print(sorted(m for m in ('torch', 'open_clip') if m in sys.modules))"
    light = "pipeline.training.train, pipeline.training.checkpoints, pipeline.core.stages, pipeline.data.training_data"
    # nor the trainer of a one-worker run (pipeline.training.train._trainer_class): its controller
    # unpickles it
    assert _python(f"import sys, {light}; pipeline.training.train._trainer_class(1); " + heavy) == "[]"
    # and the worker side does bring them (the check above is not vacuous)
    assert _python("import sys, pipeline.training.train_loop; " + heavy) == "['open_clip', 'torch']"


@pytest.mark.parametrize("preset, expected", [(None, "1"), ("3", "3")])
def test_local_ray_gets_one_parquet_footer_actor_unless_told(preset, expected):
    """A local Ray's driver and workers see RAY_DATA_PARQUET_FOOTER_NUM_ACTORS=1 (Ray Data's
    default of 32 processes per read swamps a laptop); a value the user set is kept. And the
    local Ray a job starts serves no dashboard (docs/cluster.md, "Security")."""
    code = ("import os, ray; from pipeline.core.config import RayConfig; "
            "from pipeline.core.raycluster import init_ray; init_ray(RayConfig(), num_cpus=1); "
            "worker = ray.get(ray.remote(lambda: os.environ.get('RAY_DATA_PARQUET_FOOTER_NUM_ACTORS'))"
            ".remote()); print(os.environ['RAY_DATA_PARQUET_FOOTER_NUM_ACTORS'], worker, "
            "ray._private.worker._global_node.webui_url or 'no-dashboard')")
    env = {"RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": preset} if preset else {}
    assert _python(code, **env) == f"{expected} {expected} no-dashboard"
