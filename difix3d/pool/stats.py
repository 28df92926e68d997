"""The pool's figures: kept in the router for ``stats()`` and exported through ``ray.util.metrics`` (Ray dashboard,
Prometheus)."""

from __future__ import annotations

import collections
import logging
import time

import numpy as np

log = logging.getLogger(__name__)

# batch-size and latency buckets for Ray's histograms
_BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64]
_LATENCY_MS_BOUNDARIES = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000]
# counters since the pool started, always present in ``stats()``
COUNTERS = ("requests_ok", "requests_failed", "frames_ok", "batches", "requeued", "replica_deaths",
            "replicas_started", "replicas_stopped", "replica_start_failures")


class PoolStats:
    """Counters, a batch-size histogram and a sliding window of answers (latency percentiles, frames/s)."""

    def __init__(self, pool_name: str, window_s: float):
        self.pool_name = pool_name
        self.window_s = window_s
        self.started_at = time.monotonic()
        self.batch_sizes: collections.Counter[int] = collections.Counter()  # frames per batch -> batches
        self._answers: collections.deque[tuple[float, float, int]] = collections.deque()  # (t, latency s, frames)
        self.counts = collections.Counter({k: 0 for k in COUNTERS})
        self.replica_busy_s = 0.0
        self.max_inflight_frames_seen = 0
        self._metrics = _RayMetrics(pool_name)

    def batch(self, frames: int, compute_s: float) -> None:
        self.batch_sizes[frames] += 1
        self.counts["batches"] += 1
        self.replica_busy_s += compute_s
        self._metrics.observe("batch_size", frames)

    def answered(self, latency_s: float, frames: int, ok: bool) -> None:
        now = time.monotonic()
        if ok:
            self.counts["requests_ok"] += 1
            self.counts["frames_ok"] += frames
            self._answers.append((now, latency_s, frames))
            self._metrics.observe("latency_ms", latency_s * 1e3)
            self._metrics.inc("frames", frames)
        else:
            self.counts["requests_failed"] += 1
            self._metrics.inc("failed_requests", 1)
        self._trim(now)

    def inflight(self, frames: int) -> None:
        self.max_inflight_frames_seen = max(self.max_inflight_frames_seen, frames)
        self._metrics.set("inflight_frames", frames)

    def gauges(self, queued_frames: int, replicas: int) -> None:
        self._metrics.set("queue_frames", queued_frames)
        self._metrics.set("replicas", replicas)

    def snapshot(self) -> dict:
        """Latency percentiles (ms) and frames/s over the last ``window_s``; counters since the pool started."""
        now = time.monotonic()
        self._trim(now)
        lat = np.array([a[1] for a in self._answers]) * 1e3
        span = max(1e-6, now - max(self.started_at, now - self.window_s))
        pct = {f"latency_p{p}_ms": (float(np.percentile(lat, p)) if lat.size else None) for p in (50, 95, 99)}
        return {
            **pct,
            "frames_per_s": sum(a[2] for a in self._answers) / span,
            "batch_size_histogram": dict(sorted(self.batch_sizes.items())),
            "mean_batch_size": (sum(k * v for k, v in self.batch_sizes.items()) / max(1, sum(self.batch_sizes.values()))),
            "max_inflight_frames_seen": self.max_inflight_frames_seen,
            "replica_busy_s": self.replica_busy_s,
            "uptime_s": now - self.started_at,
            **{k: int(v) for k, v in self.counts.items()},
        }

    def _trim(self, now: float) -> None:
        while self._answers and self._answers[0][0] < now - self.window_s:
            self._answers.popleft()


class _RayMetrics:
    """Ray's Gauge/Histogram/Counter tagged with the pool's name; a metrics failure never stops the pool."""

    def __init__(self, pool_name: str):
        self.tags = {"pool": pool_name}
        self.m = {}
        try:
            from ray.util import metrics

            keys = ("pool",)
            self.m = {
                "queue_frames": metrics.Gauge("difix3d_pool_queue_frames", "Frames waiting for a replica", keys),
                "inflight_frames": metrics.Gauge("difix3d_pool_inflight_frames", "Frames admitted, not answered", keys),
                "replicas": metrics.Gauge("difix3d_pool_replicas", "Live fixer replicas", keys),
                "batch_size": metrics.Histogram("difix3d_pool_batch_size", "Frames per batch", _BATCH_BOUNDARIES, keys),
                "latency_ms": metrics.Histogram("difix3d_pool_latency_ms", "Request latency from admission to answer",
                                                _LATENCY_MS_BOUNDARIES, keys),
                "frames": metrics.Counter("difix3d_pool_frames", "Frames fixed", keys),
                "failed_requests": metrics.Counter("difix3d_pool_failed_requests", "Requests answered with an error",
                                                   keys),
            }
        except Exception as e:  # metrics are optional (e.g. outside a Ray worker)
            log.warning("Ray metrics unavailable for pool %s: %s", pool_name, e)

    def set(self, name, value):
        self._call(name, "set", value)

    def observe(self, name, value):
        self._call(name, "observe", value)

    def inc(self, name, value):
        self._call(name, "inc", value)

    def _call(self, name, method, value):
        metric = self.m.get(name)
        if metric is not None:
            try:
                getattr(metric, method)(value, tags=self.tags)
            except Exception as e:
                log.debug("metric %s: %s", name, e)
