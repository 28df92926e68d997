"""The pool's router: one named async actor that admits requests, batches them across callers and dispatches the
batches to replica actors, replacing replicas that die and scaling between min and max.

Why a hand-written router and not Ray Serve or ActorPool: DESIGN.md, "Fixing pool".
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayActorError
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from .batching import BatchQueues, PendingRequest
from .config import PoolConfig
from .errors import PoolFixError, PoolRequestError, PoolUnavailableError
from .replica import FixerReplica
from .scaling import ScalePolicy
from .stats import PoolStats

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Replica:
    rid: int
    name: str
    actor: Any
    ready: bool = False
    inflight_batches: int = 0
    idle_since: float = field(default_factory=time.monotonic)
    info: dict = field(default_factory=dict)
    checked_at: float = field(default_factory=time.monotonic)
    bundle: int | None = None  # index in the router's placement group, for the replicas it reserves


class ReplicaHung(Exception):
    """A replica kept a batch past ``batch_timeout_s``: handled as its death."""


class PoolRouter:
    """Async actor (``max_concurrency`` high: every waiting request is one coroutine). Pixels never pass through
    it: requests carry ObjectRefs of the caller's frames, and answers are ObjectRefs of the replica's outputs."""

    def __init__(self, config: dict):
        self.config = PoolConfig(**config)
        c = self.config
        self.queues = BatchQueues()
        self.requests: dict[str, PendingRequest] = {}  # admitted or waiting for admission, not yet answered
        self.replicas: dict[int, _Replica] = {}
        self.stats = PoolStats(c.name, c.stats_window_s)
        self.policy = ScalePolicy(c.min_replicas, c.max_replicas, c.scale_up_queue_frames, c.scale_up_after_s,
                                  c.scale_down_idle_s)
        self.inflight_frames = 0
        self._admission: collections.deque = collections.deque()  # (request, asyncio.Future) in arrival order
        self._admitted: dict[str, asyncio.Event] = {}  # request id -> set when admitted (``admitted()`` waits)
        self._incarnation = uuid.uuid4().hex[:6]  # replica names stay unique if the router itself restarts
        self._next_rid = 0
        self._start_failures = 0
        self._next_start_at = 0.0
        self.last_replica_error: str | None = None
        self._wake: asyncio.Event | None = None
        self._tasks: list[asyncio.Task] = []
        self._closed = False
        self._no_replica_since: float | None = None  # when the last ready replica went away (None: one is ready)
        self._placement_group = None  # reserves min_replicas replicas' resources (PoolConfig.reserve_min_replicas)

    # ------------------------------------------------------------------ public methods (called through Ray)
    async def fix(self, request_id: str, key: tuple, frames: int, inputs: list) -> list:
        """Answer one request: ``[ObjectRef of uint8 [B, H, W, 3]]`` (nested, so the router never reads it).

        A request id seen before (a retry after the router restarted, or a duplicate) waits for the same answer:
        each request is answered exactly once.
        """
        self._ensure_started()
        req = self.requests.get(request_id)
        if req is None:
            req = PendingRequest(request_id, tuple(key), int(frames), inputs, arrived_at=time.monotonic())
            req.answer = asyncio.get_running_loop().create_future()
            self.requests[request_id] = req
            try:
                await self._admit(req)
            except asyncio.CancelledError:  # the caller died or gave up while it waited: nobody wants the answer
                self._drop_unqueued(req)
                raise
            if not req.done:  # answered while it waited for admission (shutdown, pool unavailable)
                req.enqueued_at = time.monotonic()
                self.queues.push(req)
                self._wake.set()
        return [await asyncio.shield(req.answer)]

    async def admitted(self, request_id: str) -> None:
        """Returns once ``fix(request_id, ...)`` was admitted: what a caller's ``submit`` blocks on (backpressure)."""
        req = self.requests.get(request_id)
        if req is None or req.admitted:  # admitted, answered, or (never seen) nothing to wait for
            return
        await self._admitted.setdefault(request_id, asyncio.Event()).wait()

    async def wait_ready(self, timeout_s: float) -> dict:
        """Wait until ``min_replicas`` replicas loaded their checkpoint; raise the replicas' error if they cannot."""
        self._ensure_started()
        deadline = time.monotonic() + timeout_s
        while sum(r.ready for r in self.replicas.values()) < self.config.min_replicas:
            if self._start_failures and self.last_replica_error:
                raise PoolUnavailableError(f"pool {self.config.name!r}: a replica could not start: "
                                           f"{self.last_replica_error}")
            if time.monotonic() > deadline:
                raise PoolUnavailableError(f"pool {self.config.name!r}: {self.config.min_replicas} replica(s) not "
                                           f"ready after {timeout_s:.0f} s (cluster resources: "
                                           f"{ray.available_resources()})")
            await asyncio.sleep(0.05)
        return await self.stats_snapshot()

    async def stats_snapshot(self) -> dict:
        """Queue depth, in-flight frames, batch sizes, latency percentiles, frames/s, replicas, fault counters."""
        snap = self.stats.snapshot()
        snap.update({
            "pool": self.config.name,
            "queue_frames": self.queues.frames,
            "queue_requests": len(self.queues),
            "waiting_admission": len(self._admission),
            "inflight_frames": self.inflight_frames,
            "max_inflight_frames": self.config.max_inflight_frames,
            "replicas": sum(r.ready for r in self.replicas.values()),
            "replicas_starting": sum(not r.ready for r in self.replicas.values()),
            "replica_names": [r.name for r in self.replicas.values() if r.ready],
            "last_replica_error": self.last_replica_error,
        })
        return snap

    async def replica_handles(self) -> list:
        """Actor handles of the live replicas (for tests and operators)."""
        return [r.actor for r in self.replicas.values() if r.ready]

    async def get_config(self) -> dict:
        return self.config.to_dict()

    async def shutdown(self) -> None:
        """Stop every replica; requests still open fail with PoolUnavailableError."""
        self._closed = True
        for t in self._tasks:
            t.cancel()
        for r in list(self.replicas.values()):
            ray.kill(r.actor, no_restart=True)
        self.replicas.clear()
        if self._placement_group is not None:
            ray.util.remove_placement_group(self._placement_group)
            self._placement_group = None
        for req in list(self.requests.values()):
            self._answer(req, error=PoolUnavailableError(f"pool {self.config.name!r} was shut down"))

    # ------------------------------------------------------------------ admission (backpressure)
    async def _admit(self, req: PendingRequest) -> None:
        if not self._admission and self._fits(req.frames):
            self._take(req)
            return
        waiter = asyncio.get_running_loop().create_future()
        self._admission.append((req, waiter))
        await waiter

    def _drop_unqueued(self, req: PendingRequest) -> None:
        """Forget a request cancelled before it was queued; give back its frames if it had been admitted. (Left in
        the admission line, it was admitted later for no one: its frames were never released, and the pool stopped
        admitting anything.)"""
        if req.done:
            return
        req.done = True
        self.requests.pop(req.request_id, None)
        self._admission = collections.deque((r, w) for r, w in self._admission if r is not req)
        self._wake_admitted(req.request_id)
        if req.admitted:
            self._release(req.frames)

    def _fits(self, frames: int) -> bool:
        # a request larger than the bound is admitted alone, or it would never be
        return self.inflight_frames + frames <= self.config.max_inflight_frames or self.inflight_frames == 0

    def _take(self, req: PendingRequest) -> None:
        req.admitted = True
        self.inflight_frames += req.frames
        self.stats.inflight(self.inflight_frames)
        self._wake_admitted(req.request_id)

    def _wake_admitted(self, request_id: str) -> None:
        event = self._admitted.pop(request_id, None)
        if event is not None:
            event.set()

    def _release(self, frames: int) -> None:
        self.inflight_frames -= frames
        while self._admission and self._fits(self._admission[0][0].frames):
            req, waiter = self._admission.popleft()
            if waiter.done():  # its fix() was cancelled: _drop_unqueued forgets it
                continue
            self._take(req)
            waiter.set_result(None)
        self.stats.inflight(self.inflight_frames)

    def _answer(self, req: PendingRequest, result: Any = None, error: Exception | None = None) -> None:
        """Answer a request exactly once and give its frames' share of the in-flight bound back."""
        if req.done:
            return
        req.done = True
        self.requests.pop(req.request_id, None)
        if not req.admitted:  # answered while waiting for admission (shutdown, pool unavailable)
            for r, waiter in self._admission:
                if r is req and not waiter.done():
                    waiter.set_result(None)  # its fix() coroutine goes on to return the answer
            self._admission = collections.deque((r, w) for r, w in self._admission if r is not req)
            self._wake_admitted(req.request_id)  # do not leave its caller blocked
        if error is not None:
            req.answer.set_exception(error)
        else:
            req.answer.set_result(result)
        self.stats.answered(time.monotonic() - req.arrived_at, req.frames, ok=error is None)
        if req.admitted:
            self._release(req.frames)

    # ------------------------------------------------------------------ dispatch
    def _ensure_started(self) -> None:
        if self._wake is None:
            self._wake = asyncio.Event()
            self._tasks = [asyncio.ensure_future(self._dispatch_loop()), asyncio.ensure_future(self._control_loop())]

    async def _dispatch_loop(self) -> None:
        c = self.config
        while not self._closed:
            self._wake.clear()
            while self._dispatch_one():
                pass
            deadline = self.queues.next_deadline(c.max_wait_ms / 1e3)
            now = time.monotonic()
            # a head already overdue that could not go out waits for an event (a batch done, a replica ready, a new
            # request: each sets _wake), not a deadline, or this loop would spin
            timeout = None if deadline is None or deadline <= now else deadline - now + 1e-4
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except asyncio.TimeoutError:
                pass

    def _dispatch_one(self) -> bool:
        """Send one batch to the least busy ready replica; False when no batch or no replica slot is ready."""
        c = self.config
        free = [r for r in self.replicas.values() if r.ready and r.inflight_batches < c.max_batches_per_replica]
        if not free or not self.queues.frames:
            return False
        replica = min(free, key=lambda r: r.inflight_batches)
        batch = self.queues.next_batch(time.monotonic(), c.max_batch_size, c.max_wait_ms / 1e3,
                                       require_full=replica.inflight_batches > 0)
        if batch is None:
            return False
        replica.inflight_batches += 1
        asyncio.ensure_future(self._run_batch(replica, batch))
        return True

    async def _run_batch(self, replica: _Replica, batch: list[PendingRequest]) -> None:
        frames = sum(r.frames for r in batch)
        try:
            refs = replica.actor.fix_batch.options(num_returns=len(batch) + 1).remote([r.inputs for r in batch])
            status = await self._batch_status(refs[0])
        except (RayActorError, ReplicaHung) as e:  # the replica died or hangs: its batch goes to another one
            self._replica_died(replica, e)
            for req in reversed(batch):
                req.replica_deaths += 1
                if req.replica_deaths >= self.config.max_attempts:
                    self._answer(req, error=PoolFixError(
                        f"request {req.request_id}: {req.replica_deaths} replicas died while fixing it (last: {e})"))
                else:
                    self.stats.counts["requeued"] += 1
                    self.queues.push(req, front=True)
            return
        except Exception as e:  # fix_batch itself broke (not one request): every member gets the error
            for req in batch:
                self._answer(req, error=PoolFixError(f"request {req.request_id}: {type(e).__name__}: {e}"))
            return
        finally:
            replica.inflight_batches -= 1
            replica.idle_since = time.monotonic()
            self._wake.set()
        self.stats.batch(frames, status["compute_s"])
        for req, err, out in zip(batch, status["errors"], refs[1:]):
            if err is None:
                self._answer(req, result=out)
            else:
                is_value_error, message = err
                cls = PoolRequestError if is_value_error else PoolFixError
                shape = f"{req.frames}x{req.key[0]}x{req.key[1]}" + (" with refs" if req.key[2] else "")
                self._answer(req, error=cls(f"request {req.request_id} ({shape}): {message}"))

    async def _batch_status(self, ref) -> dict:
        timeout = self.config.batch_timeout_s
        if timeout <= 0:
            return await ref
        try:
            return await asyncio.wait_for(ref, timeout)
        except asyncio.TimeoutError:
            raise ReplicaHung(f"no answer to a batch in {timeout:g} s (batch_timeout_s): the replica is stopped "
                              "as hung") from None

    def _replica_died(self, replica: _Replica, error: Exception) -> None:
        if self.replicas.pop(replica.rid, None) is not None:
            self.stats.counts["replica_deaths"] += 1
            log.warning("pool %s: replica %s died (%s); its batches are re-queued", self.config.name, replica.name,
                        error)
            ray.kill(replica.actor, no_restart=True)

    # ------------------------------------------------------------------ replicas and scaling
    async def _control_loop(self) -> None:
        while not self._closed:
            try:
                self._control_step()
            except Exception:  # the loop must outlive any one bad step
                log.exception("pool %s: control step failed", self.config.name)
            await asyncio.sleep(self.config.control_period_s)

    def _control_step(self) -> None:
        now = time.monotonic()
        live = [r for r in self.replicas.values() if r.ready]
        starting = len(self.replicas) - len(live)
        idle = {r.rid: r.idle_since for r in live if r.inflight_batches == 0}
        decision = self.policy.decide(now, self.queues.frames + sum(q.frames for q, _ in self._admission),
                                      len(live), starting, idle)
        if decision.start and now >= self._next_start_at:
            for i in range(decision.start):
                if i >= decision.needed_for_min and not self._resources_free():
                    break
                self._start_replica()
        if decision.stop is not None and decision.stop in self.replicas:
            stop = decision.stop
            if self.replicas[stop].bundle is not None:  # keep the reserved share busy: stop an unreserved one
                stop = next((rid for rid in idle if self.replicas[rid].bundle is None), stop)
            r = self.replicas.pop(stop)
            self.stats.counts["replicas_stopped"] += 1
            log.info("pool %s: stopping idle replica %s", self.config.name, r.name)
            ray.kill(r.actor, no_restart=True)
        for r in live:
            if r.inflight_batches == 0 and now - r.checked_at >= self.config.health_check_s:
                r.checked_at = now
                asyncio.ensure_future(self._health_check(r))
        self._fail_if_unavailable(now, bool(live))
        self.stats.gauges(self.queues.frames, len(live))

    def _fail_if_unavailable(self, now: float, any_ready: bool) -> None:
        """Answer every open request with PoolUnavailableError once no replica has been ready for
        ``unavailable_timeout_s``; callers (a fleet scene task) then fail and retry instead of waiting forever."""
        if any_ready or not self.requests:  # the clock runs only while someone waits (scale-from-zero is not late)
            self._no_replica_since = None
            return
        if self._no_replica_since is None:
            self._no_replica_since = now
            return
        waited = now - self._no_replica_since
        if waited < self.config.unavailable_timeout_s or not self.requests:
            return
        error = PoolUnavailableError(
            f"pool {self.config.name!r}: no replica ready for {waited:.0f} s (last replica error: "
            f"{self.last_replica_error or 'none'}; cluster resources free: {ray.available_resources()})")
        log.error("%s; failing %d open request(s)", error, len(self.requests))
        self.queues = BatchQueues()
        for req in list(self.requests.values()):
            self._answer(req, error=error)

    async def _health_check(self, replica: _Replica) -> None:
        try:
            await replica.actor.ready.remote()
        except RayActorError as e:
            self._replica_died(replica, e)

    def _resources_free(self) -> bool:
        if self.config.scale_beyond_free_resources:
            return True
        free = ray.available_resources()
        return (free.get("CPU", 0.0) >= self.config.num_cpus_per_replica
                and free.get("GPU", 0.0) >= (self.config.num_gpus_per_replica or 0.0))

    def _reserved_bundle(self) -> int | None:
        """A free bundle of the pool's placement group (created on first use), or None: not reserving, or every
        reserved share is taken and this replica is one the pool scales up into free resources."""
        c = self.config
        bundle = {k: v for k, v in (("CPU", c.num_cpus_per_replica), ("GPU", c.num_gpus_per_replica or 0.0)) if v}
        if not c.reserve_min_replicas or c.min_replicas < 1 or not bundle:
            return None
        if self._placement_group is None:
            from ray.util import get_placement_group, placement_group, remove_placement_group

            name = f"{c.name}-replicas"
            try:  # a router that restarted: its predecessor's group (and the replicas in it) is gone with it
                remove_placement_group(get_placement_group(name))
            except ValueError:
                pass
            # PACK: replicas fill a node's GPUs before spreading; pending until the (autoscaling) cluster fits it
            self._placement_group = placement_group([bundle] * c.min_replicas, strategy="PACK", name=name)
        taken = {r.bundle for r in self.replicas.values()}
        return next((i for i in range(c.min_replicas) if i not in taken), None)

    def _start_replica(self) -> None:
        c = self.config
        rid = self._next_rid
        self._next_rid += 1
        name = f"{c.name}-replica-{self._incarnation}-{rid}"
        bundle = self._reserved_bundle()
        placement = {} if bundle is None else {"scheduling_strategy": PlacementGroupSchedulingStrategy(
            placement_group=self._placement_group, placement_group_bundle_index=bundle)}
        actor = ray.remote(FixerReplica).options(
            name=name, namespace=c.namespace, num_cpus=c.num_cpus_per_replica, num_gpus=c.num_gpus_per_replica or 0,
            max_restarts=0,  # the router replaces dead replicas itself and re-queues their batches at once
            max_concurrency=1, **placement,
        ).remote(c.checkpoint, c.device, c.dtype, c.compile, c.compile_mode)
        replica = _Replica(rid, name, actor, bundle=bundle)
        self.replicas[rid] = replica
        self.stats.counts["replicas_started"] += 1
        asyncio.ensure_future(self._await_ready(replica))

    async def _await_ready(self, replica: _Replica) -> None:
        try:
            replica.info = await replica.actor.ready.remote()
        except Exception as e:
            self.replicas.pop(replica.rid, None)
            self._start_failures += 1
            self.stats.counts["replica_start_failures"] += 1
            self.last_replica_error = f"{type(e).__name__}: {e}"
            self._next_start_at = time.monotonic() + min(30.0, 2.0 ** self._start_failures)  # back off
            log.error("pool %s: replica %s failed to start: %s", self.config.name, replica.name, e)
            return
        if replica.rid not in self.replicas:  # stopped while loading
            ray.kill(replica.actor, no_restart=True)
            return
        replica.ready = True
        replica.idle_since = time.monotonic()
        self._start_failures = 0
        self._wake.set()
