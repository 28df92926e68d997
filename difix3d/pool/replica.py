"""A fixer replica: one Ray actor that loads a checkpoint once and fixes the batches the router sends it.

Made an actor by the router (``ray.remote(FixerReplica).options(...)``), so resources are declared in one place.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from .errors import PoolUnavailableError


class FixerReplica:
    """Loads ``checkpoint`` (a URI: the weights never travel through Ray, NOTES-RAY #53727) on its device."""

    def __init__(self, checkpoint: str, device: str | None = None, dtype: str | None = None,
                 compile: bool | None = None, compile_mode: str = "default"):
        import ray
        import torch

        from difix3d.fixer import FixerRunner

        if device is None:
            device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
        torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.device = device
        try:
            self.runner = FixerRunner.from_checkpoint(checkpoint, device=device, dtype=torch_dtype, compile=compile,
                                                      compile_mode=compile_mode)
        except Exception as e:  # re-raised as a one-message error: Ray cannot unpickle e.g. InputError(source, problem)
            raise PoolUnavailableError(f"{type(e).__name__}: {e}") from None

    def ready(self) -> dict:
        """Answered once the checkpoint is loaded; what the router logs about this replica."""
        import ray

        return {"pid": os.getpid(), "device": self.device, "node": ray.get_runtime_context().get_node_id(),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}

    def fix_batch(self, requests: list[list[Any]]) -> tuple:
        """Fix requests together; returns ``(status, out_0, ..., out_{n-1})`` (called with ``num_returns=n+1``).

        ``requests[i]`` = [images ref uint8 [B_i, H, W, 3], refs ref or None]. ``status`` = {"errors": per request
        None or (is_value_error, message), "compute_s"}. If the joint batch fails, each request is retried
        alone, so one bad request (NaN, wrong shape) fails alone and the others still get their frames.
        """
        import ray

        t0 = time.perf_counter()
        n = len(requests)
        errors: list[Any] = [None] * n
        outputs: list[Any] = [None] * n
        inputs: list[Any] = [None] * n
        for i, (images_ref, refs_ref) in enumerate(requests):
            try:
                inputs[i] = (ray.get(images_ref), None if refs_ref is None else ray.get(refs_ref))
            except Exception as e:  # e.g. the caller that owned the frames died
                errors[i] = (False, f"could not read the request's frames: {type(e).__name__}: {e}")
        todo = [i for i in range(n) if errors[i] is None]
        if len(todo) > 1:
            try:
                self._fix_together(todo, inputs, outputs)
                todo = []
            except Exception:
                self._free_memory()  # then one by one: find the request that broke the batch
        for i in todo:
            try:
                self._fix_together([i], inputs, outputs)
            except Exception as e:
                errors[i] = (isinstance(e, ValueError), f"{type(e).__name__}: {e}")
                self._free_memory()
        status = {"errors": errors, "compute_s": time.perf_counter() - t0}
        return (status, *outputs)

    def _fix_together(self, idx: list[int], inputs: list, outputs: list) -> None:
        images = [inputs[i][0] for i in idx]
        refs = [inputs[i][1] for i in idx]
        batch = images[0] if len(idx) == 1 else np.concatenate(images)  # [sum B_i, H, W, 3]
        ref_batch = refs[0] if len(idx) == 1 else (None if refs[0] is None else np.concatenate(refs))
        fixed = self.runner.fix(batch, ref_batch)  # uint8 [sum B_i, H, W, 3]
        if len(fixed) != len(batch):
            raise RuntimeError(f"fixer returned {len(fixed)} frames for {len(batch)}")
        start = 0
        for i, im in zip(idx, images):
            outputs[i] = fixed[start:start + len(im)]
            start += len(im)

    def _free_memory(self) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()
