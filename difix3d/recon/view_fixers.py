"""What the progressive loop calls to fix its renders: ``ViewFixer.submit(renders, refs, cameras) -> Future``.

The loop passes the cameras too, so an *oracle* (the synthetic scene's exact ground truth at that camera) can stand
in for the diffusion model: it proves the loop's machinery (poses, references, mixing, masks) independent of any
model's quality. A real fixer (in-process or the Ray pool) only needs images, and ``ClientViewFixer`` adapts the
project's ``FixerClient`` protocol (``submit(images, refs) -> Future``) to this one.
"""

from __future__ import annotations

import abc
import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Sequence

import numpy as np

from difix3d import storage
from difix3d.scene.camera import Camera


class ViewFixer(abc.ABC):
    """Fix rendered views: uint8 ``[B, H, W, 3]`` renders (+ uint8 ``[B, H, W, 3]`` references) → same shape."""

    name: str = "fixer"

    @abc.abstractmethod
    def submit(self, renders: np.ndarray, refs: np.ndarray | None, cameras: Sequence[Camera]) -> Future:
        """Start fixing; the future resolves to uint8 ``[B, H, W, 3]``. Must not block on the fixing itself."""

    def fix(self, renders: np.ndarray, refs: np.ndarray | None, cameras: Sequence[Camera]) -> np.ndarray:
        """Blocking form of :meth:`submit`."""
        return self.submit(renders, refs, cameras).result()

    def describe(self) -> dict:
        """What decides this fixer's answers, recorded in ``config.json`` (a resume under another is refused):
        ``kind``, the class, and ``checkpoint``, the weights where known. Not how they travel (pool or in-process)."""
        return {"kind": type(self).__name__, "checkpoint": None}


class ClientViewFixer(ViewFixer):
    """A ``FixerClient`` (``LocalFixerClient`` or the Ray pool client) as a ViewFixer; cameras are not needed.
    ``checkpoint``: the weights the client runs, recorded by :meth:`describe` in :func:`checkpoint_record`'s spelling;
    None: the client's own ``checkpoint`` attribute (both clients tell theirs; None where not known)."""

    def __init__(self, client: Any, name: str = "difix", checkpoint: str | None = None):
        self.client = client
        self.name = name
        self.checkpoint = checkpoint_record(getattr(client, "checkpoint", None) if checkpoint is None else checkpoint)

    def describe(self) -> dict:
        return {**super().describe(), "checkpoint": self.checkpoint}

    def submit(self, renders: np.ndarray, refs: np.ndarray | None, cameras: Sequence[Camera]) -> Future:
        return self.client.submit(np.ascontiguousarray(renders), None if refs is None else np.ascontiguousarray(refs))


class OracleViewFixer(ViewFixer):
    """Returns the exact ground truth at each camera, e.g. ``OracleViewFixer(StreetScene(seed).render)``.

    ``gt_fn(camera) -> uint8 [H, W, 3]``. With ``workers > 0`` the answers come from a thread pool (so the loop's
    asynchronous path is exercised); with 0 (default) the future is already done when returned, which keeps
    the moment a view joins training deterministic (tests rely on it).
    """

    name = "oracle"

    def __init__(self, gt_fn: Callable[[Camera], np.ndarray], workers: int = 0):
        self.gt_fn = gt_fn
        self._pool = ThreadPoolExecutor(max_workers=workers) if workers > 0 else None

    def submit(self, renders: np.ndarray, refs: np.ndarray | None, cameras: Sequence[Camera]) -> Future:
        if len(cameras) != len(renders):
            raise ValueError(f"oracle fixer: {len(renders)} renders but {len(cameras)} cameras")
        if self._pool is not None:
            return self._pool.submit(self._answer, list(cameras), renders.shape)
        return _done(self._answer(list(cameras), renders.shape))

    def _answer(self, cameras: list[Camera], shape: tuple) -> np.ndarray:
        images = [np.asarray(self.gt_fn(c)) for c in cameras]
        for c, image in zip(cameras, images):
            if image.dtype != np.uint8:  # a cast would turn [0, 1] floats into black targets
                raise ValueError(f"oracle fixer: ground truth of camera {c.name!r} is {image.dtype}, expected uint8 "
                                 "images (0..255)")
        out = np.stack(images)  # [B, H, W, 3]
        if out.shape != tuple(shape):
            raise ValueError(f"oracle fixer: ground truth has shape {out.shape}, renders {tuple(shape)}")
        return out


class IdentityViewFixer(ViewFixer):
    """Returns the renders unchanged: the loop without any fixing (a control, and a smoke test)."""

    name = "identity"

    def submit(self, renders: np.ndarray, refs: np.ndarray | None, cameras: Sequence[Camera]) -> Future:
        return _done(np.array(renders, dtype=np.uint8, copy=True))


def as_view_fixer(fixer: Any) -> ViewFixer:
    """A ViewFixer from what callers hand the loop: a ViewFixer, a FixerClient, or None.

    None: the default fixer pool when one is running on the connected Ray cluster (``difix3d.pool``), else the
    small fixer bundled with difix3d, in this process (``difix3d.fixer.bundled``: the real code path, not a trained
    Difix).
    """
    if isinstance(fixer, ViewFixer):
        return fixer
    if fixer is None:
        pool = _running_pool()
        if pool is not None:
            return ClientViewFixer(pool, name="pool")
        from difix3d.fixer.bundled import default_checkpoint
        from difix3d.fixer.client import LocalFixerClient
        from difix3d.fixer.runner import FixerRunner

        return ClientViewFixer(LocalFixerClient(FixerRunner.from_checkpoint(str(default_checkpoint()))), "bundled")
    if hasattr(fixer, "submit"):
        return ClientViewFixer(fixer, name=getattr(fixer, "name", type(fixer).__name__))
    raise TypeError(f"not a fixer: {type(fixer).__name__} (expected a ViewFixer, a FixerClient or None)")


def checkpoint_record(uri: str | None) -> str | None:
    """How ``config.json`` names a fixer's weights, one spelling per checkpoint so a resume compares like with like:
    ``"bundled"`` for the checkpoint shipped with difix3d (the same fixer wherever difix3d is installed, reached through
    a pool or in-process), local paths absolute and normalized (``ckpt/a``, ``./ckpt/a/``, ``file://`` and the absolute
    path agree), other URIs and hub ids without a trailing slash."""
    if uri is None or str(uri) == "bundled":
        return uri
    from difix3d.fixer.bundled import BUNDLED_DIR
    from difix3d.fixer.checkpoint import looks_like_hub_id

    uri = str(uri)
    if not storage.is_local(uri) or looks_like_hub_id(uri):
        return uri.rstrip("/")
    path = storage.normalized(uri)
    return "bundled" if os.path.realpath(path) == os.path.realpath(BUNDLED_DIR) else path


def _done(value: Any) -> Future:
    f: Future = Future()
    f.set_result(value)
    return f


def _running_pool():
    """The default pool's client when Ray is initialised here and the pool runs, else None (never starts Ray)."""
    try:
        import ray
    except ImportError:
        return None
    if not ray.is_initialized():
        return None
    from difix3d.pool.client import get_pool
    from difix3d.pool.errors import PoolUnavailableError

    try:
        return get_pool()
    except PoolUnavailableError:
        return None
