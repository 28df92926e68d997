"""The pool's pure policies, without Ray: batch forming, scaling decisions, stats, request checks, config."""

import numpy as np
import pytest

from difix3d.pool import PoolConfig, request_key
from difix3d.pool.batching import BatchQueues, PendingRequest
from difix3d.pool.scaling import ScalePolicy
from difix3d.pool.stats import PoolStats


def _req(i, frames=1, key=(32, 48, False), t=0.0):
    return PendingRequest(f"r{i}", key, frames, None, enqueued_at=t)


def test_batches_fill_to_max_frames_with_whole_requests_of_one_key():
    q = BatchQueues()
    for i, f in enumerate([2, 1, 2, 1]):
        q.push(_req(i, f, t=i * 1e-3))
    q.push(_req(9, 1, key=(64, 64, False), t=0.0005))
    assert q.frames == 7
    batch = q.next_batch(now=0.0, max_batch_size=4, max_wait_s=1.0)  # full without waiting
    assert [r.request_id for r in batch] == ["r0", "r1"]  # 2 + 1 frames; r2 (2 more) would make 5 > 4
    assert q.frames == 4


def test_partial_batch_waits_for_max_wait_then_goes_oldest_key_first():
    q = BatchQueues()
    q.push(_req(0, key=(32, 48, True), t=1.0))
    q.push(_req(1, key=(32, 48, False), t=1.002))
    assert q.next_batch(now=1.005, max_batch_size=4, max_wait_s=0.010) is None
    assert q.next_deadline(0.010) == pytest.approx(1.010)
    assert [r.request_id for r in q.next_batch(now=1.011, max_batch_size=4, max_wait_s=0.010)] == ["r0"]
    # a busy replica's second slot only takes full batches
    assert q.next_batch(now=5.0, max_batch_size=4, max_wait_s=0.010, require_full=True) is None
    assert [r.request_id for r in q.next_batch(now=5.0, max_batch_size=4, max_wait_s=0.010)] == ["r1"]
    assert q.frames == 0 and q.next_deadline(0.01) is None


def test_oversized_request_forms_a_batch_alone_and_retries_go_first():
    q = BatchQueues()
    q.push(_req(0, frames=9))
    q.push(_req(1, frames=1))
    assert [r.request_id for r in q.next_batch(0.0, 4, 1.0)] == ["r0"]
    q.push(_req(2, frames=1), front=True)
    assert [r.request_id for r in q.next_batch(0.0, 1, 1.0)] == ["r2"]
    assert q.remove(q._queues[(32, 48, False)][0]) and q.frames == 0


def test_scale_policy_min_up_on_deep_queue_down_when_idle():
    p = ScalePolicy(min_replicas=1, max_replicas=3, queue_frames_per_replica=4, up_after_s=1.0, down_idle_s=5.0)
    d = p.decide(0.0, queued_frames=0, live=0, starting=0, idle_since={})
    assert d.start == 1 and d.needed_for_min == 1
    assert p.decide(0.0, 10, live=1, starting=0, idle_since={}).start == 0  # deep, but not for long yet
    assert p.decide(0.5, 10, live=1, starting=0, idle_since={}).start == 0
    assert p.decide(1.1, 10, live=1, starting=0, idle_since={}).start == 1
    assert p.decide(2.5, 10, live=1, starting=1, idle_since={}).start == 0  # one start at a time
    assert p.decide(3.0, 10, live=3, starting=0, idle_since={}).start == 0  # at max
    d = p.decide(10.0, 0, live=3, starting=0, idle_since={"a": 9.0, "b": 2.0, "c": 4.0})
    assert d.stop == "b" and d.start == 0  # the longest idle
    assert p.decide(10.0, 0, live=1, starting=0, idle_since={"a": 0.0}).stop is None  # never below min


def test_scale_from_zero_when_work_arrives():
    p = ScalePolicy(0, 2, 4, 1.0, 5.0)
    assert p.decide(0.0, 0, 0, 0, {}).start == 0
    assert p.decide(0.0, 1, 0, 0, {}).start == 1


def test_stats_percentiles_histogram_and_rate():
    s = PoolStats("t", window_s=60.0)
    for ms in range(1, 101):
        s.answered(ms / 1e3, frames=2, ok=True)
    s.answered(0.5, frames=1, ok=False)
    s.batch(4, 0.1)
    s.batch(4, 0.1)
    s.batch(1, 0.05)
    s.inflight(7)
    s.inflight(3)
    snap = s.snapshot()
    assert snap["latency_p50_ms"] == pytest.approx(50.5, abs=0.01)
    assert snap["latency_p99_ms"] == pytest.approx(99.01, abs=0.01)
    assert snap["batch_size_histogram"] == {1: 1, 4: 2} and snap["mean_batch_size"] == pytest.approx(3.0)
    assert snap["requests_ok"] == 100 and snap["frames_ok"] == 200 and snap["requests_failed"] == 1
    assert snap["max_inflight_frames_seen"] == 7 and snap["frames_per_s"] > 0


def test_request_key_checks_structure_only():
    im = np.zeros((2, 32, 48, 3), np.uint8)
    assert request_key(im, None) == ((32, 48, False), 2)
    assert request_key(im, im.copy()) == ((32, 48, True), 2)
    assert request_key(im.astype(np.float32), None)[1] == 2  # values and dtype are the fixer's to judge
    for bad, refs in [(im[0], None), (np.zeros((0, 32, 48, 3), np.uint8), None), (im, im[:1]), ([1, 2], None)]:
        with pytest.raises(ValueError, match="must be a numpy array"):
            request_key(bad, refs)


def test_config_validates_bounds():
    assert PoolConfig().max_batch_size == 4
    with pytest.raises(ValueError, match="min_replicas"):
        PoolConfig(min_replicas=3, max_replicas=2)
    with pytest.raises(ValueError, match="max_inflight_frames"):
        PoolConfig(max_inflight_frames=0)


def test_a_caller_cancelled_while_waiting_for_admission_does_not_wedge_the_pool():
    """Ray cancels a dead caller's fix() coroutine: the request must leave the admission line, or the next release
    admits it for no one (failing on its cancelled future) and its frames are never given back."""
    import asyncio

    from difix3d.pool.router import PoolRouter

    async def scenario():
        router = PoolRouter(PoolConfig(name="t", max_inflight_frames=1).to_dict())
        router._wake = asyncio.Event()  # no dispatch or control loops: this drives admission alone
        router.inflight_frames = 1  # one frame in flight (a replica is working on it)
        key = request_key(np.zeros((1, 8, 8, 3), np.uint8), None)[0]
        waiting = asyncio.ensure_future(router.fix("b", key, 1, [None, None]))
        await asyncio.sleep(0)
        assert len(router._admission) == 1
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert not router._admission and "b" not in router.requests
        router._release(1)  # the frame in flight is answered
        assert router.inflight_frames == 0
        nxt = asyncio.ensure_future(router.fix("c", key, 1, [None, None]))
        await asyncio.sleep(0)
        assert router.requests["c"].admitted and router.inflight_frames == 1 and len(router.queues) == 1
        nxt.cancel()

    asyncio.run(scenario())


def test_a_caller_cancelled_just_after_admission_gives_its_frames_back():
    import asyncio

    from difix3d.pool.router import PoolRouter

    async def scenario():
        router = PoolRouter(PoolConfig(name="t", max_inflight_frames=1).to_dict())
        router._wake = asyncio.Event()
        router.inflight_frames = 1
        key = request_key(np.zeros((1, 8, 8, 3), np.uint8), None)[0]
        waiting = asyncio.ensure_future(router.fix("b", key, 1, [None, None]))
        await asyncio.sleep(0)
        router._release(1)  # admits b (its frame now counted) ...
        assert router.requests["b"].admitted and router.inflight_frames == 1
        waiting.cancel()  # ... but its caller is gone before fix() resumes
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert router.inflight_frames == 0 and not router.requests

    asyncio.run(scenario())
