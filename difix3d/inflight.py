"""How many Ray tasks a job keeps in flight, re-read as an autoscaling cluster grows or shrinks (fleet and curation)."""

from __future__ import annotations

import logging
import time
from typing import Callable

log = logging.getLogger(__name__)


class InFlightBound:
    """``limit(resources)``, re-read from the cluster's resources every ``every_s``: an autoscaler adds nodes for
    queued tasks, so a bound sized once at submit would keep a job started on one node at that node's size.
    ``fixed`` (a user's cap) is never re-read. ``cluster`` holds the latest reading (kept current under a fixed cap
    too), for callers that place their next task by what the cluster has now."""

    def __init__(self, limit: Callable[[dict[str, float]], int], resources: Callable[[], dict[str, float]],
                 initial: dict[str, float], every_s: float = 15.0, clock: Callable[[], float] = time.monotonic,
                 fixed: int | None = None, job: str = "job", what: str = "tasks"):
        self.limit_of, self.resources, self.every_s, self.clock = limit, resources, every_s, clock
        self.fixed, self.job, self.what = fixed, job, what
        self.limit = fixed if fixed is not None else limit(initial)
        self.cluster = dict(initial)
        self.checked_at = clock()

    def current(self) -> int:
        if self.clock() - self.checked_at < self.every_s:
            return self.limit
        self.checked_at = self.clock()
        try:
            self.cluster = dict(self.resources())
            if self.fixed is not None:
                return self.limit
            limit = self.limit_of(self.cluster)
        except Exception:  # noqa: BLE001 - a GCS hiccup keeps the last bound
            return self.limit
        if limit != self.limit:
            log.info("%s: cluster resources changed; %s in flight %d -> %d", self.job, self.what, self.limit, limit)
            self.limit = limit
        return self.limit
