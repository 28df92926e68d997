"""The fixing pool on the session's local Ray with the bundled tiny fixer: concurrent callers get the runner's own
outputs, a bad request fails alone, a killed replica loses nothing, backpressure holds, the pool scales."""

import math
import sys
import threading
import time

import numpy as np
import pytest

pytest.importorskip("difix3d.fixer.runner")

import ray  # noqa: E402
import ray.cloudpickle  # noqa: E402

from difix3d import pool  # noqa: E402
from difix3d.fixer import FixerRunner, default_checkpoint  # noqa: E402

H, W = 32, 48
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import this test module


def _frames(seed: int, b: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (b, H, W, 3), dtype=np.uint8)  # [B, H, W, 3]


def _request(seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Mixed batch sizes; every third request carries reference views."""
    images = _frames(seed, 1 + seed % 2)
    return images, (_frames(seed + 1000, len(images)) if seed % 3 == 0 else None)


@pytest.fixture(scope="module")
def runner():
    return FixerRunner.from_checkpoint(default_checkpoint(), device="cpu")


@pytest.fixture(scope="module")
def shared_pool(ray_local):
    """Two CPU replicas; killed at module end."""
    client = pool.start_pool(default_checkpoint(), name="test-pool-shared", min_replicas=2, max_replicas=2,
                             num_cpus_per_replica=0.5, max_batch_size=4, max_wait_ms=50, max_inflight_frames=64,
                             health_check_s=0.5)
    yield client
    assert pool.shutdown_pool("test-pool-shared")


@ray.remote(num_cpus=0.25)
def _caller(client, seeds):
    """A scene task: submits all its requests, then collects them (the client arrived pickled)."""
    futures = [client.submit(*_request(s)) for s in seeds]
    return [f.result() for f in futures]


@ray.remote(num_cpus=0.25)
def _caller_by_name(name, seeds):
    """A task that was handed nothing but the pool's name."""
    client = pool.get_pool(name)
    return [client.fix(*_request(s)) for s in seeds]


def _expected(runner, seed):
    images, refs = _request(seed)
    return runner.fix(images, refs)


def _assert_close(out, expected):
    # batched vs one-by-one CPU kernels may round a few pixels differently: at most 1 of 255, and rarely
    assert out.dtype == np.uint8 and out.shape == expected.shape
    diff = np.abs(out.astype(int) - expected.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


def test_concurrent_callers_get_the_runners_outputs(shared_pool, runner):
    before = shared_pool.stats()
    seeds = [list(range(i * 6, i * 6 + 6)) for i in range(2)]
    results = ray.get([_caller.remote(shared_pool, s) for s in seeds] +
                      [_caller_by_name.remote("test-pool-shared", [100, 101])])
    for group, outs in zip(seeds + [[100, 101]], results):
        for seed, out in zip(group, outs):
            _assert_close(out, _expected(runner, seed))
    stats = shared_pool.stats()
    assert stats["requests_ok"] - before["requests_ok"] == 14
    assert stats["replicas"] == 2 and stats["queue_frames"] == 0 and stats["inflight_frames"] == 0
    assert max(stats["batch_size_histogram"]) > 1  # callers' requests were batched together
    assert stats["latency_p50_ms"] > 0 and stats["frames_per_s"] > 0


def test_every_client_of_a_pool_tells_its_checkpoint(shared_pool):
    from difix3d.recon.view_fixers import as_view_fixer

    joined = pool.get_pool("test-pool-shared")  # knows nothing but the name: asks the router
    for client in (shared_pool, joined, ray.cloudpickle.loads(ray.cloudpickle.dumps(shared_pool))):
        assert client.checkpoint == default_checkpoint()
    assert as_view_fixer(joined).describe()["checkpoint"] == "bundled"  # as the in-process bundled fixer records


def test_bad_requests_fail_alone_with_the_fixers_message(shared_pool, runner):
    good = [shared_pool.submit(*_request(s)) for s in range(3)]
    nan = shared_pool.submit(np.full((1, H, W, 3), np.nan, np.float32))  # same size: may share a batch
    more = [shared_pool.submit(*_request(s)) for s in range(3, 6)]
    with pytest.raises(pool.PoolRequestError, match="uint8") as err:
        nan.result(timeout=60)
    assert isinstance(err.value, ValueError) and "1x32x48" in str(err.value)
    for s, f in enumerate(good + more):
        _assert_close(f.result(timeout=60), _expected(runner, s))
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):  # structure is checked before anything is sent
        shared_pool.submit(np.zeros((H, W, 3), np.uint8)).result()


def test_killed_replica_loses_nothing_and_answers_each_request_once(shared_pool, runner):
    before = shared_pool.stats()
    futures = [shared_pool.submit(*_request(s)) for s in range(12)]
    futures[0].result(timeout=60)  # mid-stream
    victim = shared_pool.replica_handles()[0]
    ray.kill(victim, no_restart=False)
    for s, f in enumerate(futures):
        _assert_close(f.result(timeout=120), _expected(runner, s))
    deadline = time.monotonic() + 30
    while True:  # the death is seen by a batch or a ping, and a replacement starts
        stats = shared_pool.stats()
        if stats["replica_deaths"] > before["replica_deaths"] and stats["replicas"] + stats["replicas_starting"] == 2:
            break
        assert time.monotonic() < deadline, stats
        time.sleep(0.1)
    assert stats["replica_deaths"] - before["replica_deaths"] == 1
    assert stats["requests_ok"] - before["requests_ok"] == 12  # each answered exactly once
    assert stats["requests_failed"] == before["requests_failed"]
    assert stats["replicas_started"] - before["replicas_started"] == 1


def test_backpressure_bounds_inflight_and_pool_scales_up_then_down(ray_local, runner):
    client = pool.start_pool(default_checkpoint(), name="test-pool-scaling", min_replicas=1, max_replicas=2,
                             num_cpus_per_replica=0.5, max_batch_size=2, max_wait_ms=5, max_inflight_frames=6,
                             scale_up_queue_frames=1, scale_up_after_s=0.2, scale_down_idle_s=1.5,
                             control_period_s=0.05)
    try:
        assert client.stats()["replicas"] == 1
        outputs, errors = {}, []

        def flood(offset):
            try:
                futures = {s: client.submit(_frames(s, 1)) for s in range(offset, offset + 25)}
                outputs.update({s: f.result(timeout=120) for s, f in futures.items()})
            except Exception as e:  # surfaced by the assert below
                errors.append(e)

        threads = [threading.Thread(target=flood, args=(k * 100,)) for k in range(2)]
        for t in threads:
            t.start()
        peak_replicas = 0
        while any(t.is_alive() for t in threads):
            stats = client.stats()
            assert stats["inflight_frames"] <= 6
            peak_replicas = max(peak_replicas, stats["replicas"] + stats["replicas_starting"])
            time.sleep(0.05)
        assert not errors and len(outputs) == 50
        for s in (0, 24, 100, 124):
            _assert_close(outputs[s], runner.fix(_frames(s, 1)))
        stats = client.stats()
        assert stats["max_inflight_frames_seen"] <= 6 and stats["waiting_admission"] == 0
        assert peak_replicas == 2 and stats["replicas_started"] == 2  # the deep queue asked for one more, not more
        deadline = time.monotonic() + 90
        while (s := client.stats())["replicas_stopped"] < 1 or s["replicas"] + s["replicas_starting"] > 1:
            # once the new replica is up and both idle, one is stopped: back to min_replicas
            assert time.monotonic() < deadline, client.stats()
            time.sleep(0.1)
        _assert_close(client.fix(_frames(7, 1)), runner.fix(_frames(7, 1)))  # still serving
    finally:
        pool.shutdown_pool("test-pool-scaling")


def test_pool_errors_name_the_problem(ray_local, tmp_path):
    with pytest.raises(pool.PoolUnavailableError, match="no fixing pool named 'nope'"):
        pool.get_pool("nope")
    assert pool.shutdown_pool("nope") is False
    with pytest.raises(pool.PoolUnavailableError, match="missing-ckpt.*does not exist"):  # checked before any replica
        pool.start_pool(str(tmp_path / "missing-ckpt"), name="test-pool-bad")
    corrupt = tmp_path / "corrupt-ckpt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text("{not json")
    with pytest.raises(pool.PoolUnavailableError, match="could not start") as err:  # the replica's own error
        pool.start_pool(str(corrupt), name="test-pool-bad", num_cpus_per_replica=0.5, ready_timeout_s=120)
    assert "corrupt-ckpt" in str(err.value)
    with pytest.raises(pool.PoolUnavailableError, match="no fixing pool"):  # the failed pool was cleaned up
        pool.get_pool("test-pool-bad")


@ray.remote(max_retries=0)
def _scene_like(client, fixes):
    """A scene task holding CPUs while it fixes a frame now and then."""
    for s in range(fixes):
        client.fix(_frames(s, 1))
        time.sleep(0.2)
    return fixes


def test_a_dead_replicas_share_stays_reserved_for_its_replacement(ray_local):
    """Tasks take every free CPU and one more waits. When the replica dies, the waiting task must not take its
    CPU (the replacement would wait forever, and with it every caller): the pool holds it in a placement group."""
    client = pool.start_pool(default_checkpoint(), name="test-pool-reserved", min_replicas=1, max_replicas=1,
                             num_cpus_per_replica=1, health_check_s=0.2)
    try:
        free = ray.available_resources().get("CPU", 0.0)
        assert free > 0
        running = math.ceil(free)  # tasks of at most 1 CPU fill what is free; one more waits, and would fit the
        share = free / running     # replica's CPU the moment it is freed
        tasks = [_scene_like.options(num_cpus=share).remote(client, 10) for _ in range(running + 1)]
        deadline = time.monotonic() + 60
        while client.stats()["frames_ok"] < 2:  # the first task is fixing
            assert time.monotonic() < deadline
            time.sleep(0.1)
        ray.kill(client.replica_handles()[0], no_restart=True)
        ready, _ = ray.wait(tasks, num_returns=len(tasks), timeout=90)
        stats = client.stats()
        assert len(ready) == len(tasks), stats
        assert set(ray.get(ready)) == {10} and stats["replica_deaths"] == 1 and stats["replicas"] == 1
        groups = [g for g in ray.util.placement_group_table().values()
                  if g["name"] == "test-pool-reserved-replicas" and g["state"] == "CREATED"]
        assert len(groups) == 1 and list(groups[0]["bundles"].values()) == [{"CPU": 1.0}]  # held across the death
    finally:
        pool.shutdown_pool("test-pool-reserved")


def test_requests_fail_when_no_replica_can_be_ready(ray_local):
    """A pool whose replicas can never be placed answers its callers with PoolUnavailableError, not silence."""
    client = pool.start_pool(default_checkpoint(), name="test-pool-unplaceable", min_replicas=0, max_replicas=1,
                             num_cpus_per_replica=64, unavailable_timeout_s=1.0)
    try:
        t0 = time.monotonic()
        with pytest.raises(pool.PoolUnavailableError, match="no replica ready"):
            client.fix(_frames(0, 1))
        assert time.monotonic() - t0 < 30
    finally:
        pool.shutdown_pool("test-pool-unplaceable")


def test_starting_a_running_pool_again_joins_it(ray_local):
    first = pool.start_pool(default_checkpoint(), name="test-pool-join", num_cpus_per_replica=0.5)
    try:
        again = pool.start_pool(default_checkpoint(), name="test-pool-join", num_cpus_per_replica=0.5)
        for client in (again, first):  # the creator's handle was kept: the router lives on
            assert client.fix(_frames(0, 1)).shape == (1, H, W, 3)
        assert first.stats()["replicas_started"] == 1
    finally:
        assert pool.shutdown_pool("test-pool-join")


def test_a_replica_that_hangs_is_replaced_and_its_batch_answered(ray_local, runner):
    """A stuck kernel keeps a replica alive and ready: without batch_timeout_s its callers waited forever."""
    import os
    import signal

    client = pool.start_pool(default_checkpoint(), name="test-pool-hang", min_replicas=1, max_replicas=1,
                             num_cpus_per_replica=0.5, batch_timeout_s=3.0, control_period_s=0.05)
    try:
        pid = ray.get(client.replica_handles()[0].ready.remote())["pid"]
        client.fix(*_request(0))  # warm
        os.kill(pid, signal.SIGSTOP)  # alive, but answers nothing
        t0 = time.monotonic()
        _assert_close(client.fix(*_request(1)), _expected(runner, 1))
        assert time.monotonic() - t0 < 60
        stats = client.stats()
        assert stats["replica_deaths"] == 1 and stats["requests_failed"] == 0
    finally:
        pool.shutdown_pool("test-pool-hang")
