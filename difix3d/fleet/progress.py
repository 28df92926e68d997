"""The driver's progress line: scenes done/failed/in flight, frames fixed per second and an ETA."""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm


class FleetProgress:
    """A tqdm bar over the scenes this run has to do; with ``enabled=False`` one log line per finished scene."""

    def __init__(self, total: int, enabled: bool = True, already_done: int = 0):
        self.total = total
        self.start = time.time()
        self.done = self.failed = self.in_flight = self.frames = 0
        self.pool: tuple[int, float] | None = None  # (frames fixed, frames/s) reported by a shared pool
        self.already_done = already_done
        self.enabled = enabled
        self.bar = tqdm(total=total, desc="scenes", unit="scene", file=sys.stderr, dynamic_ncols=True,
                        disable=not enabled)

    def started(self, n_in_flight: int, pool: tuple[int, float] | None = None) -> None:
        self.in_flight = n_in_flight
        if pool is not None:
            self.pool = pool
        self._refresh()

    def finished(self, scene_id: str, ok: bool, frames: int, n_in_flight: int, message: str = "") -> None:
        self.in_flight = n_in_flight
        self.frames += frames
        if ok:
            self.done += 1
        else:
            self.failed += 1
        self.bar.update(1)
        self._refresh()
        if not self.enabled:
            state = "done" if ok else "FAILED"
            print(f"[fleet] {scene_id} {state} {message} | {self.line()}", flush=True)

    def retrying(self, scene_id: str, message: str) -> None:
        (self.bar.write if self.enabled else print)(f"[fleet] {scene_id} failed, retrying: {message}")

    def frames_per_s(self) -> float:
        """The pool's live rate when it reports one, else frames of finished scenes over the run's time."""
        if self.pool is not None:
            return self.pool[1]
        return self.frames / max(1e-6, time.time() - self.start)

    def eta_s(self) -> float | None:
        finished = self.done + self.failed
        if finished == 0:
            return None
        return (time.time() - self.start) / finished * (self.total - finished)

    def line(self) -> str:
        eta = self.eta_s()
        return (f"done {self.done + self.already_done} failed {self.failed} in flight {self.in_flight} "
                f"of {self.total + self.already_done} | {self.frames_per_s():.2f} frames fixed/s | "
                f"ETA {'?' if eta is None else f'{eta:.0f}s'}")

    def _refresh(self) -> None:
        if self.enabled:
            self.bar.set_postfix_str(f"done={self.done} failed={self.failed} running={self.in_flight} "
                                     f"fixed/s={self.frames_per_s():.2f}", refresh=True)

    def close(self) -> None:
        self.bar.close()
