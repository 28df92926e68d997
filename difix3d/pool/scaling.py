"""When the pool grows or shrinks: pure policy (no Ray), fed by the router's control loop."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ScaleDecision:
    start: int = 0  # replicas to start now
    stop: object = None  # id of one idle replica to stop, or None
    needed_for_min: int = 0  # how many of ``start`` bring the pool back to min_replicas (started even without free resources)


class ScalePolicy:
    """Keep ``min..max`` replicas; add one when the queue stays deep, remove one that stays idle.

    One change at a time (no start while another replica is starting, one stop per check), so a burst does not
    start every replica at once and a brief lull does not tear the pool down.
    """

    def __init__(self, min_replicas: int, max_replicas: int, queue_frames_per_replica: int, up_after_s: float,
                 down_idle_s: float):
        self.min, self.max = min_replicas, max_replicas
        self.queue_frames_per_replica = queue_frames_per_replica
        self.up_after_s, self.down_idle_s = up_after_s, down_idle_s
        self._deep_since: float | None = None

    def decide(self, now: float, queued_frames: int, live: int, starting: int,
               idle_since: dict[object, float]) -> ScaleDecision:
        """``idle_since``: for each live replica with nothing in flight, since when it has been idle."""
        total = live + starting
        if total < self.min:
            return ScaleDecision(start=self.min - total, needed_for_min=self.min - total)
        if total == 0 and queued_frames > 0:  # min_replicas=0 and work arrived: scale from zero
            return ScaleDecision(start=1)
        deep = queued_frames > self.queue_frames_per_replica * max(live, 1)
        if not deep:
            self._deep_since = None
        elif self._deep_since is None:
            self._deep_since = now
        if deep and starting == 0 and total < self.max and now - self._deep_since >= self.up_after_s:
            self._deep_since = now  # the next replica must wait for the queue to stay deep again
            return ScaleDecision(start=1)
        if live > self.min and starting == 0 and queued_frames == 0:
            idle = [(t, rid) for rid, t in idle_since.items() if now - t >= self.down_idle_s]
            if idle:
                return ScaleDecision(stop=min(idle, key=lambda x: x[0])[1])
        return ScaleDecision()
