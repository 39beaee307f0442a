"""The resource plan per node (pipeline/training/resources.py), the launcher's refusal, and the watchdog
that says when a run stops making progress."""

import time

import pytest

from pipeline.core import console
from pipeline.core.config import ConfigError, load_config
from pipeline.training import checkpoints
from pipeline.training.resources import check, place
from pipeline.training.train import worker_resources

HEAD = {"CPU": 0.0}
ONE_CPU = {"CPU": 1.0}


def test_half_cpu_workers_on_one_cpu_nodes_leave_no_node_for_a_whole_cpu_data_task():
    """The hang found by hand on a head and two 1-CPU nodes: 1 CPU free in total, none whole
    on a node, once Ray spreads the two workers."""
    nodes = [HEAD, ONE_CPU, ONE_CPU]
    plan = check(nodes, {"CPU": 0.5}, 1, 2, data_cpus=1.0)
    assert not plan.fits and "spread over the nodes" in plan.reason
    # half-CPU reads would fit, but Ray Data lists a read's files in a task of a whole CPU
    listing = check(nodes, {"CPU": 0.5}, 1, 2, data_cpus=0.5)
    assert not listing.fits and "whole CPU Ray Data's file listing asks for" in listing.reason
    # so lower data_cpus is no fix, nor is 0 CPUs for a worker that reserves nothing else (Ray
    # refuses a bundle of zeros): one run at a time is
    for refused in (plan, listing):
        assert refused.remedies == ("train.max_concurrent=1",)
        assert refused.reason.endswith(": set train.max_concurrent=1, or add nodes")
    assert check(nodes, {"CPU": 0.5}, 1, 1, data_cpus=1.0).fits
    assert not check(nodes, {"CPU": 0.0}, 1, 2, data_cpus=1.0).fits
    # packed instead, one node keeps its CPU: both placements must work, so this is not enough
    assert place([{"CPU": 0.5}] * 2, nodes, spread=False)[2] == ONE_CPU


def test_one_laptop_node_fits_three_runs_and_one_data_task_at_a_time():
    plan = check([{"CPU": 2.0}], {"CPU": 0.3}, 1, 3, data_cpus=1.0)
    assert plan.fits and plan.data_slots == 1 and "room for 1 data task" in plan.reason


def test_custom_resources_pin_one_worker_per_node_and_count_against_the_runs():
    nodes = [HEAD, {"CPU": 1.0, "accel": 1.0}, {"CPU": 1.0, "accel": 1.0}]
    worker = {"CPU": 0.0, "accel": 1.0}      # like Ray Train's GPU workers: no CPU reserved
    plan = check(nodes, worker, 1, 2, data_cpus=0.5)
    assert plan.fits and plan.data_slots == 4
    too_many = check(nodes, worker, 1, 3, data_cpus=0.5)
    assert not too_many.fits and "do not fit on the nodes" in too_many.reason
    assert "2 x {CPU: 1, accel: 1}" in too_many.reason and too_many.remedies == ("train.max_concurrent=2",)
    # a worker that reserves a custom resource may reserve no CPU
    assert check(nodes, {"CPU": 0.5, "accel": 1.0}, 1, 2, data_cpus=1.0).remedies == \
        ("train.max_concurrent=1", "train.cpus_per_worker=0")


def test_worker_resources_come_from_config_and_refuse_cpu_and_gpu():
    cfg = load_config("demo", ["train.worker_resources=accel=1,spot=0.5", "train.use_gpu=true"])
    assert worker_resources(cfg.train) == {"CPU": 0.3, "GPU": 1.0, "accel": 1.0, "spot": 0.5}
    for bad in ("GPU=1", "accel", "accel=-1"):
        with pytest.raises(ConfigError, match="train.worker_resources"):
            load_config("demo", [f"train.worker_resources={bad}"])


def test_the_launcher_refuses_runs_that_cannot_all_progress_before_starting_any(ray_local):
    # the test run's local Ray: one node of 2 CPUs
    cfg = load_config("demo", ["train.cpus_per_worker=1", "train.data_cpus=1"]).train
    with pytest.raises(checkpoints.ResourcePlanError, match=r"refused: .* no node keeps the 1 CPU"):
        checkpoints.resource_plan(cfg, runs=2)
    assert "fit, with room for 1 data task" in checkpoints.resource_plan(cfg, runs=1)


def test_the_watchdog_names_a_run_without_steps_and_what_the_cluster_waits_for(ray_local):
    from pipeline.core import raycluster

    # Ray's cluster status lists the node a few seconds after Ray starts (this test may be the
    # first to use it): what the watchdog reports is the status of a running cluster
    deadline = time.monotonic() + 60
    while "no node" in raycluster.pending() and time.monotonic() < deadline:
        time.sleep(0.5)
    lines = []
    watch = checkpoints.Watchdog(0.2, lines.append)
    console.beats()                         # the job's console actor exists, as under launch
    watch.started("expert-7")
    assert watch.check(["expert-7"]) == []
    time.sleep(0.3)
    assert watch.check(["expert-7"]) == ["expert-7"]
    assert "[expert-7] no progress for 0 s (before its first step)" in lines[0]
    assert "free per node: {CPU: " in lines[0]
    assert watch.check(["expert-7"]) == []          # said once per period, not every poll
    console.Heartbeat("expert-7")(3)
    time.sleep(0.1)
    assert watch.check(["expert-7"]) == []          # it moved
    time.sleep(0.3)
    assert watch.check(["expert-7"]) == ["expert-7"] and "at step 3" in lines[-1]
