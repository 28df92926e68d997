"""Checkpoint and image writes off the training thread.

A progressive round used to stop training while the whole state (Gaussians, Adam moments: ~2.4 GB at 2.5 M
Gaussians) was serialized and written, and while each pseudo view was PNG-encoded: 8-10 s a round at 576×1024.
Here the training thread only takes a snapshot and a single writer thread does the rest, in submission order, so a
state file is never on storage before the pseudo views it names. On CUDA the snapshot is a copy on the device
(:class:`DeviceSnapshot`): a host copy of a multi-GB state into pageable memory held training ~1.2 s a round at
576×1024; a device copy takes milliseconds, and the writer thread moves it to the host on a side stream.
"""

from __future__ import annotations

import io
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import torch

from difix3d import storage
from difix3d.errors import CheckpointError

log = logging.getLogger(__name__)


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``fn`` applied to every tensor in nested dicts/lists/tuples (named tuples keep their type); other leaves
    returned as they are."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_map_tensors(v, fn) for v in obj]
    if isinstance(obj, tuple):
        items = [_map_tensors(v, fn) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    return obj


def snapshot(obj: Any) -> Any:
    """A deep CPU copy of the tensors in nested dicts/lists/tuples (live training tensors are never shared, even when
    they already live on the CPU); other leaves are returned as they are (ints, floats, strings, configs)."""
    return _map_tensors(obj, lambda t: t.detach().to("cpu", copy=True))


def cuda_nbytes(obj: Any) -> int:
    """Bytes of the CUDA tensors in nested dicts/lists/tuples."""
    sizes: list[int] = []
    _map_tensors(obj, lambda t: sizes.append(t.nbytes if t.is_cuda else 0) or t)
    return sum(sizes)


class DeviceSnapshot:
    """A state copied where it lives (CUDA tensors on their device), moved to the host later by :meth:`to_host`.

    The training thread pays only for a device-to-device copy; :meth:`to_host`, called on the writer thread, copies
    to the host on a side stream that waits for the snapshot's copy (and nothing after it), so training kernels keep
    running meanwhile. Costs one extra copy of the state in device memory until it is written.
    """

    def __init__(self, obj: Any, device: torch.device | str):
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"DeviceSnapshot needs a CUDA device, got {device}")
        # an explicit index: the writer thread's current device is not the training thread's
        self.device = device if device.index is not None else torch.device("cuda", torch.cuda.current_device())
        self._obj = _map_tensors(obj, lambda t: t.detach().clone())  # on each tensor's own device
        self._ready = torch.cuda.Event()
        self._ready.record(torch.cuda.current_stream(self.device))

    def to_host(self) -> Any:
        obj, self._obj = self._obj, None  # the device copy is freed once written
        if obj is None:
            raise RuntimeError("DeviceSnapshot.to_host called twice")
        stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(stream):
            stream.wait_event(self._ready)
            return snapshot(obj)  # synchronous copies: done before obj's device memory can be reused


class BackgroundWriter:
    """One writer thread, first in first out; at most one large state in flight (a new one waits for the last).

    A failed write is raised at the next ``submit``/``flush``, so an error never passes silently; every write queued
    after it is skipped, so a state file never lands on storage after a pseudo view it names failed to.
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="difix3d-writes") if enabled else None
        self._pending: list[Future] = []
        self._last_state: Future | None = None
        self._failed: BaseException | None = None

    def submit(self, fn: Callable, *args, state: bool = False) -> None:
        """Run ``fn(*args)`` on the writer thread (inline when disabled). ``state=True`` for large snapshots."""
        self._raise_failed()
        if not self.enabled:
            fn(*args)
            return
        if state:
            self.wait_state()
        future = self._pool.submit(self._guarded, fn, *args)
        self._pending.append(future)
        if state:
            self._last_state = future

    def state_busy(self) -> bool:
        """Whether the last state write is still running (a caller may skip its next snapshot instead of waiting)."""
        return self._last_state is not None and not self._last_state.done()

    def wait_state(self) -> None:
        """Wait until the last state write is done: call before taking the next snapshot, so host memory holds at
        most one snapshot being written and one being taken."""
        if self._last_state is not None:
            self._last_state.result()

    def _guarded(self, fn: Callable, *args) -> None:
        if self._failed is not None:
            raise RuntimeError("write skipped: an earlier background write failed") from self._failed
        try:
            fn(*args)
        except BaseException as e:
            self._failed = e
            raise

    def flush(self) -> None:
        """Wait for every write; raise the first error."""
        pending, self._pending, self._last_state = self._pending, [], None
        for f in pending:
            f.result()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)

    def __enter__(self) -> "BackgroundWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.close()  # an interrupted run still leaves its last state whole on storage
        except Exception as e:  # the run's error is the one raised; the write error is logged
            log.warning("a background write failed too: %s", e)

    def _raise_failed(self) -> None:
        still = []
        for f in self._pending:
            if f.done():
                f.result()  # raises the write's error here, on the training thread
            else:
                still.append(f)
        self._pending = still


class StateFile:
    """A resumable training state at ``uri``: :meth:`save` snapshots it on the training thread and writes it on
    ``writer``'s; :meth:`load` restores it, or raises a CheckpointError naming the file.

    A save while the last one is still being written is skipped (training never waits for storage; a resume redoes
    the iterations since the last written state) unless ``every_save`` or ``final``. ``on_device``: snapshot on the
    CUDA device (:class:`DeviceSnapshot`); None: when the state takes at most half the free device memory.
    """

    def __init__(self, uri: str, writer: BackgroundWriter, device: torch.device | str, every_save: bool = False,
                 on_device: bool | None = None):
        self.uri, self.writer, self.device = uri, writer, torch.device(device)
        self.every_save, self.on_device = every_save, on_device
        self.skipped = 0

    def save(self, make_state: Callable[[], dict], final: bool = False) -> bool:
        """Write ``make_state()`` (nested dicts of tensors and plain values) unless skipped; whether it was taken."""
        if not final and not self.every_save and self.writer.state_busy():
            self.skipped += 1
            return False
        self.writer.wait_state()
        state = make_state()
        if self._snapshot_on_device(state):
            self.writer.submit(_write_device_snapshot, self.uri, DeviceSnapshot(state, self.device), state=True)
        else:
            self.writer.submit(storage.write_torch, self.uri, snapshot(state), state=True)
        return True

    def load(self, restore: Callable[[dict], None]) -> bool:
        """``restore(state)`` from the file if there is one (False if not). A file that cannot be unpickled or
        restored (damaged by a partial copy, written by another version) is a CheckpointError naming it, as
        :func:`difix3d.recon.trainer.load_checkpoint`; storage errors and running out of memory are not the file's
        fault and stay what they are, so a retry can succeed."""
        if not storage.exists(self.uri):
            return False
        data = storage.read_bytes(self.uri)  # a storage error stays itself: transient, so the fleet retries it
        try:
            restore(torch.load(io.BytesIO(data), map_location="cpu", weights_only=False))
        except (CheckpointError, OSError, torch.OutOfMemoryError):  # OSError: storage, reading the images it names
            raise
        except Exception as e:  # truncated bytes, missing keys, a state of another version
            raise CheckpointError(self.uri, f"cannot resume from it ({type(e).__name__}: {e}); delete it to "
                                            "restart") from e
        return True

    def _snapshot_on_device(self, state: dict) -> bool:
        if self.device.type != "cuda" or not self.writer.enabled:
            return False
        if self.on_device is not None:
            return self.on_device
        free, _ = torch.cuda.mem_get_info(self.device)
        free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)  # cached by torch
        return cuda_nbytes(state) <= free // 2


def _write_device_snapshot(uri: str, snap: DeviceSnapshot) -> None:
    storage.write_torch(uri, snap.to_host())
