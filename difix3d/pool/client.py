"""The pool's caller side: ``start_pool`` / ``get_pool`` / ``shutdown_pool`` and ``PoolClient``, the Ray pool's
implementation of the project's ``FixerClient`` protocol (``fix``, ``submit -> Future``)."""

from __future__ import annotations

import dataclasses
import threading
import uuid
from concurrent.futures import Future
from typing import Any

import numpy as np
import ray

from difix3d.errors import Difix3DError

from .config import PoolConfig
from .errors import PoolUnavailableError
from .router import PoolRouter

DEFAULT_NAME = PoolConfig.name
DEFAULT_NAMESPACE = PoolConfig.namespace

# Routers this process started. A named actor that is not detached is destroyed once its creator drops the last
# handle, so the starting process keeps one until ``shutdown_pool``.
_STARTED: dict[tuple[str, str], Any] = {}


class PoolClient:
    """A handle on a named pool: picklable (Ray tasks and actors receive it), resolves the router by name.

    ``submit`` puts the frames in the object store and returns a ``concurrent.futures.Future`` of uint8
    ``[B, H, W, 3]``; it blocks while the pool already holds ``max_inflight_frames`` (and, if set here, while this
    client holds ``max_inflight_frames`` of its own), so a flooding caller slows down.

    ``checkpoint``: the URI the pool's replicas load (asked of the router when not given), which runs record.
    """

    def __init__(self, name: str = DEFAULT_NAME, namespace: str = DEFAULT_NAMESPACE,
                 max_inflight_frames: int | None = None, checkpoint: str | None = None):
        self.name, self.namespace = name, namespace
        self.max_inflight_frames = max_inflight_frames
        self._checkpoint = checkpoint
        self._init_local()

    def _init_local(self):
        self._router_handle = None
        self._inflight = 0
        self._cond = threading.Condition()

    def __getstate__(self):
        return {"name": self.name, "namespace": self.namespace, "max_inflight_frames": self.max_inflight_frames,
                "_checkpoint": self._checkpoint}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_local()

    def __repr__(self):
        return f"PoolClient(name={self.name!r}, namespace={self.namespace!r})"

    # ------------------------------------------------------------------ FixerClient protocol
    def fix(self, images: np.ndarray, refs: np.ndarray | None = None) -> np.ndarray:
        """Blocking form of :meth:`submit`: uint8 ``[B, H, W, 3]``."""
        return self.submit(images, refs).result()

    def submit(self, images: np.ndarray, refs: np.ndarray | None = None) -> Future:
        """Send uint8 ``[B, H, W, 3]`` frames (+ references of the same shape); the future resolves to the fixed
        frames, or raises ``PoolRequestError`` (a ``ValueError``) for input the fixer rejects."""
        future: Future = Future()
        try:
            key, frames = request_key(images, refs)
        except ValueError as e:
            future.set_exception(e)
            return future
        self._acquire(frames)
        try:
            router = self._router()
            request_id = uuid.uuid4().hex
            inputs = [ray.put(images), None if refs is None else ray.put(refs)]
            answer = router.fix.remote(request_id, key, frames, inputs)
            ray.get(router.admitted.remote(request_id))  # backpressure: wait while the pool is full
        except BaseException:
            self._release(frames)
            raise
        answer.future().add_done_callback(lambda f: self._on_answer(f, future, frames))
        return future

    @property
    def checkpoint(self) -> str:
        """The fixer checkpoint URI the pool runs (its config's; one call to the router the first time)."""
        if self._checkpoint is None:
            self._checkpoint = ray.get(self._router().get_config.remote())["checkpoint"]
        return self._checkpoint

    def stats(self) -> dict:
        """The pool's figures: queue depth, in-flight frames, batch-size histogram, latency p50/p95/p99, frames/s,
        replicas, fault counters."""
        return ray.get(self._router().stats_snapshot.remote())

    def close(self) -> None:
        """Nothing to release: the pool is shared and outlives its clients (``shutdown_pool`` ends it)."""

    def replica_handles(self) -> list:
        """Actor handles of the live replicas (tests kill one to check fault handling)."""
        return ray.get(self._router().replica_handles.remote())

    # ------------------------------------------------------------------ helpers
    def _router(self):
        if self._router_handle is None:
            self._router_handle = _get_router(self.name, self.namespace)
        return self._router_handle

    def _on_answer(self, answer: Future, future: Future, frames: int) -> None:
        """First hop: the router's answer ``[ObjectRef]``; second hop: the frames themselves (no thread blocks)."""
        try:
            out_ref = answer.result()[0]
        except Exception as e:
            self._release(frames)
            future.set_exception(_unwrap(e))
            return

        def done(f: Future) -> None:
            self._release(frames)
            try:
                future.set_result(np.array(f.result()))  # writable copy: the object-store view is read-only
            except Exception as e:
                future.set_exception(_unwrap(e))

        out_ref.future().add_done_callback(done)

    def _acquire(self, frames: int) -> None:
        if self.max_inflight_frames is None:
            return
        with self._cond:
            self._cond.wait_for(lambda: self._inflight == 0 or self._inflight + frames <= self.max_inflight_frames)
            self._inflight += frames

    def _release(self, frames: int) -> None:
        if self.max_inflight_frames is None:
            return
        with self._cond:
            self._inflight -= frames
            self._cond.notify_all()


def start_pool(checkpoint: str, name: str = DEFAULT_NAME, *, config: PoolConfig | None = None,
               ready_timeout_s: float = 600.0, **overrides: Any) -> PoolClient:
    """Start (or join, if one of that name runs with the same checkpoint) a fixing pool; returns its client once
    ``min_replicas`` replicas loaded the checkpoint. ``overrides``: any :class:`PoolConfig` field, e.g.
    ``min_replicas=1, max_replicas=4, num_gpus_per_replica=0.5, max_batch_size=4, max_wait_ms=10``."""
    base = config or PoolConfig()
    cfg = dataclasses.replace(base, checkpoint=_absolute_checkpoint(str(checkpoint)), name=name, **overrides)
    check_checkpoint_exists(cfg.checkpoint)
    if cfg.num_gpus_per_replica is None:
        cfg.num_gpus_per_replica = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    router = ray.remote(PoolRouter).options(
        name=cfg.name, namespace=cfg.namespace, get_if_exists=True,
        lifetime="detached" if cfg.detached else None,
        num_cpus=0,  # asyncio bookkeeping only: it must not take a CPU slot from replicas or scene tasks
        max_concurrency=100_000,  # every waiting request is one coroutine
        max_restarts=-1, max_task_retries=-1,  # a restarted router re-runs callers' requests (same request ids)
    ).remote(cfg.to_dict())
    running = ray.get(router.get_config.remote())
    if running["checkpoint"] != cfg.checkpoint:
        raise PoolUnavailableError(f"a pool named {name!r} already runs checkpoint {running['checkpoint']!r}, "
                                   f"not {cfg.checkpoint!r}; shut it down first or choose another name")
    # keep the creator's handle: for a pool this process started, replacing it with a joined handle destroys the router;
    # a handle kept from a router that is gone (shut down elsewhere) is replaced
    held = _STARTED.get((cfg.name, cfg.namespace))
    if held is None or held._actor_id != router._actor_id:
        _STARTED[(cfg.name, cfg.namespace)] = router
    try:
        ray.get(router.wait_ready.remote(ready_timeout_s))
    except ray.exceptions.RayTaskError as e:
        shutdown_pool(cfg.name, cfg.namespace)
        raise _unwrap(e) from None
    return PoolClient(cfg.name, cfg.namespace, checkpoint=cfg.checkpoint)


def get_pool(name: str = DEFAULT_NAME, namespace: str = DEFAULT_NAMESPACE) -> PoolClient:
    """The client of a running pool (from a task, an actor or a driver); raises PoolUnavailableError if none."""
    _get_router(name, namespace)
    return PoolClient(name, namespace)


def shutdown_pool(name: str = DEFAULT_NAME, namespace: str = DEFAULT_NAMESPACE) -> bool:
    """Stop a pool's replicas and router; False if no pool had that name."""
    try:
        router = ray.get_actor(name, namespace=namespace)
    except ValueError:
        _STARTED.pop((name, namespace), None)
        return False
    try:
        ray.get(router.shutdown.remote(), timeout=30)
    except Exception:
        pass  # a router that cannot answer is killed all the same; its replicas die with it (their owner)
    ray.kill(router, no_restart=True)
    _STARTED.pop((name, namespace), None)  # only now: dropping the creator's handle destroys the router
    return True


def request_key(images: Any, refs: Any) -> tuple[tuple, int]:
    """((height, width, has_refs), frames) of a request: what decides which requests may share a batch. Only the
    structure is checked here; values (dtype, NaN) are the fixer's to judge, on the replica."""
    if not isinstance(images, np.ndarray) or images.ndim != 4 or images.shape[-1] != 3 or len(images) == 0:
        raise ValueError(f"images must be a numpy array [B, H, W, 3] with B >= 1, got "
                         f"{getattr(images, 'shape', type(images).__name__)}")
    if refs is not None and (not isinstance(refs, np.ndarray) or refs.shape != images.shape):
        raise ValueError(f"refs must be a numpy array of the images' shape {images.shape}, got "
                         f"{getattr(refs, 'shape', type(refs).__name__)}")
    return (int(images.shape[1]), int(images.shape[2]), refs is not None), int(images.shape[0])


def _absolute_checkpoint(checkpoint: str) -> str:
    """A relative local path made absolute here: replicas (and callers that join the pool) run in other working
    folders. Hub ids stay as they are."""
    from difix3d import storage
    from difix3d.fixer.checkpoint import looks_like_hub_id

    return checkpoint if looks_like_hub_id(checkpoint) else storage.absolute(checkpoint)


def check_checkpoint_exists(checkpoint: str) -> None:
    """Fail in the caller, at once, on a checkpoint path that is not there, rather than in every replica later.
    Hub ids (``stabilityai/sd-turbo``) are not paths and are left to the loader."""
    from difix3d import storage

    from difix3d.fixer.checkpoint import looks_like_hub_id

    looks_like_path = not looks_like_hub_id(checkpoint)
    try:
        exists = storage.exists(checkpoint)
    except Exception:  # an unreachable store: the replicas will report it precisely
        return
    if looks_like_path and not exists:
        raise PoolUnavailableError(f"{checkpoint}: fixer checkpoint does not exist")


def _get_router(name: str, namespace: str):
    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        raise PoolUnavailableError(f"no fixing pool named {name!r} in Ray namespace {namespace!r}; "
                                   f"start one with difix3d.pool.start_pool(checkpoint, name={name!r})") from None


def _unwrap(error: BaseException) -> BaseException:
    """The pool's own error out of Ray's RayTaskError wrapper, so callers catch PoolRequestError / ValueError."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, Difix3DError) else error
