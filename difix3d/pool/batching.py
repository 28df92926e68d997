"""Cross-caller batch forming: per-shape FIFO queues of requests, batches bounded by frames and by waiting time.

Pure Python (no Ray), so its policy is tested directly. Only requests of one image size and the same reference
presence share a batch: the fixer runs one tensor per batch.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any, Deque, Hashable

# (height, width, has_refs)
BatchKey = Hashable


@dataclass(eq=False)
class PendingRequest:
    """One caller's ``submit``: its frames stay in the object store; the router only holds their refs."""

    request_id: str
    key: BatchKey
    frames: int
    inputs: Any  # [images ObjectRef, refs ObjectRef | None], nested so Ray passes them through unresolved
    arrived_at: float = 0.0  # when the router got it (latency counts from here)
    enqueued_at: float = 0.0  # when it was admitted and queued (batching waits count from here)
    admitted: bool = False  # holds its frames' share of the pool's in-flight bound
    replica_deaths: int = 0
    done: bool = False
    answer: Any = field(default=None, repr=False)  # asyncio.Future set by the router


class BatchQueues:
    """FIFO queues per batch key; ``next_batch`` takes the oldest key whose batch is full or has waited long enough."""

    def __init__(self):
        self._queues: dict[BatchKey, Deque[PendingRequest]] = {}
        self.frames = 0  # queued frames over all keys

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def push(self, request: PendingRequest, front: bool = False) -> None:
        """Queue a request; ``front`` for retries, so a batch that lost its replica goes next."""
        q = self._queues.setdefault(request.key, collections.deque())
        (q.appendleft if front else q.append)(request)
        self.frames += request.frames

    def remove(self, request: PendingRequest) -> bool:
        q = self._queues.get(request.key)
        if q is None or request not in q:
            return False
        q.remove(request)
        self.frames -= request.frames
        return True

    def next_batch(self, now: float, max_batch_size: int, max_wait_s: float,
                   require_full: bool = False) -> list[PendingRequest] | None:
        """Pop a batch: whole requests of one key, at most ``max_batch_size`` frames (a larger request goes alone).

        A key is ready when its queued frames fill a batch or its oldest request has waited ``max_wait_s``
        (never, with ``require_full``: used to fill a busy replica's second slot only with full batches).
        """
        for key, q in sorted(((k, q) for k, q in self._queues.items() if q), key=lambda kq: kq[1][0].enqueued_at):
            queued = sum(r.frames for r in q)
            full = queued >= max_batch_size
            if not (full or (not require_full and now - q[0].enqueued_at >= max_wait_s)):
                continue
            batch = [q.popleft()]
            frames = batch[0].frames
            while q and frames + q[0].frames <= max_batch_size:
                frames += q[0].frames
                batch.append(q.popleft())
            self.frames -= frames
            return batch
        return None

    def next_deadline(self, max_wait_s: float) -> float | None:
        """When the oldest queued request's wait runs out (None when nothing is queued)."""
        heads = [q[0].enqueued_at for q in self._queues.values() if q]
        return min(heads) + max_wait_s if heads else None
