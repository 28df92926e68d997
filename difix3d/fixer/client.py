"""The one interface every caller fixes images through: in-process here, the Ray pool (difix3d.pool) elsewhere."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol, runtime_checkable

import numpy as np

from difix3d.fixer.runner import FixerRunner


@runtime_checkable
class FixerClient(Protocol):
    """``fix``: uint8 ``[B, H, W, 3]`` (+ optional refs of the same shape) -> fixed uint8 ``[B, H, W, 3]``;
    ``submit``: the same, as a Future, so callers overlap fixing with their own work. Both clients also tell
    ``checkpoint``, the URI of the weights they run (None where not known), which runs record."""

    def fix(self, images: np.ndarray, refs: np.ndarray | None = None) -> np.ndarray: ...

    def submit(self, images: np.ndarray, refs: np.ndarray | None = None) -> Future: ...


class LocalFixerClient:
    """A :class:`FixerClient` over an in-process :class:`FixerRunner`; ``submit`` runs on one background thread
    (the model is one device's worth of work: more threads would only queue on its lock)."""

    def __init__(self, runner: FixerRunner):
        self.runner = runner
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="difix-fixer")

    @property
    def checkpoint(self) -> str | None:
        """The URI the runner was loaded from (None: built from a model object)."""
        return self.runner.checkpoint

    def fix(self, images: np.ndarray, refs: np.ndarray | None = None) -> np.ndarray:
        images = np.asarray(images)
        out = self.runner.fix(images, None if refs is None else np.asarray(refs))
        return out

    def submit(self, images: np.ndarray, refs: np.ndarray | None = None) -> Future:
        return self._executor.submit(self.fix, images, refs)

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    def __enter__(self) -> "LocalFixerClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
