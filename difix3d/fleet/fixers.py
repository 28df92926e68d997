"""The fixer the scene tasks share: one Ray fixing pool sized to the cluster, or (``fixer_mode="local"``) a small
picklable spec from which each scene task loads its own in-process fixer (the sequential baseline)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalFixerSpec:
    """Sent to scene tasks instead of a fixer: each task loads ``checkpoint`` itself on ``device``."""

    checkpoint: str
    device: str | None = None


def resolve_checkpoint(checkpoint: str | None) -> tuple[str, str | None]:
    """(checkpoint URI, a notice to print or None); None means the small checkpoint bundled with difix3d."""
    if checkpoint:
        return str(checkpoint), None
    from difix3d.fixer import bundled

    uri = str(bundled.default_checkpoint(warn=False))  # the notice below says it once
    notice = ("using the small fixer bundled with difix3d (tiny preset, 1.9 M parameters, trained on synthetic pairs: "
              "+1.5 to +2 dB PSNR on held-out synthetic renders): a demo of the whole pipeline, no substitute for a "
              "real Difix. Pass --checkpoint with a trained Difix for real results.")
    return uri, notice


def uses_gpu(config, cluster_gpus: float) -> bool:
    """Whether scene tasks and fixer replicas ask for GPUs: ``--device cuda`` always (an autoscaling cluster adds GPU
    nodes for them), ``auto`` when the cluster has GPUs now, ``cpu`` never."""
    return config.device == "cuda" or (cluster_gpus > 0 and config.device != "cpu")


def pool_size(config, cluster_gpus: float) -> tuple[int, int, float]:
    """(min replicas, max replicas, GPUs per replica): one replica per GPU by default, 1 CPU replica without GPUs.
    ``--device cuda`` on a cluster with no GPU yet (an autoscaling one, before its GPU nodes join) still asks for GPU
    replicas: the autoscaler adds nodes for them, where a CPU replica would have run a GPU model on CPUs."""
    use_gpu = uses_gpu(config, cluster_gpus)
    gpus_per_replica = config.replica_num_gpus if use_gpu else 0.0
    if config.pool_replicas > 0:
        n = config.pool_replicas
    else:
        n = max(1, int(cluster_gpus)) if use_gpu else 1
    return n, max(n, config.pool_max_replicas), gpus_per_replica


def inflight_frames(max_replicas: int) -> int:
    """The pool-wide admission bound for ``max_replicas`` replicas: a full batch computing and one waiting on each,
    twice over for the requests queued behind them (``PoolConfig``'s fixed 64 left replicas idle beyond 8)."""
    from difix3d.pool import PoolConfig

    base = PoolConfig()
    return max(base.max_inflight_frames, 2 * max_replicas * base.max_batch_size * base.max_batches_per_replica)


def open_fixer(config, checkpoint: str, cluster_gpus: float) -> tuple[Any, Callable[[], None]]:
    """(fixer handed to every scene task, close()) for ``config.fixer_mode``."""
    use_gpu = cluster_gpus > 0 and config.device != "cpu"
    if config.fixer_mode == "local":
        return LocalFixerSpec(checkpoint, "cuda" if use_gpu else "cpu"), lambda: None
    from difix3d import pool

    lo, hi, gpus = pool_size(config, cluster_gpus)
    try:
        pool.get_pool(config.pool_name)
        joined = True  # another job's pool: it is theirs to shut down (and it ends with that job unless detached)
    except pool.PoolUnavailableError:
        joined = False
    # an autoscaling pool may ask for replicas the cluster does not have yet: the cluster autoscaler adds nodes
    waiting_for_gpus = gpus > 0 and cluster_gpus == 0  # the replicas start once the autoscaler adds GPU nodes
    client = pool.start_pool(checkpoint, name=config.pool_name, min_replicas=lo, max_replicas=hi,
                             num_gpus_per_replica=gpus, scale_beyond_free_resources=hi > lo,
                             max_inflight_frames=inflight_frames(hi), compile_mode=config.pool_compile_mode,
                             ready_timeout_s=3600.0 if waiting_for_gpus else 600.0)
    if joined:
        log.warning("joined the running fixing pool %r: it is left running at the end of this job", config.pool_name)
        return client, lambda: None
    return client, lambda: pool.shutdown_pool(config.pool_name)


_LOCAL_CACHE: dict[LocalFixerSpec, Any] = {}


def materialize_fixer(fixer: Any) -> Any:
    """Inside a scene task: a pool client as it is; a LocalFixerSpec loaded once per worker process."""
    if not isinstance(fixer, LocalFixerSpec):
        return fixer
    if fixer not in _LOCAL_CACHE:
        from difix3d.fixer.client import LocalFixerClient
        from difix3d.fixer.runner import FixerRunner

        _LOCAL_CACHE[fixer] = LocalFixerClient(FixerRunner.from_checkpoint(fixer.checkpoint, device=fixer.device))
    return _LOCAL_CACHE[fixer]


def pool_frames(fixer: Any) -> tuple[int, float] | None:
    """(frames fixed since the pool started, frames/s over its recent window) for the progress line; None when the
    fixer keeps no such figures or cannot answer now."""
    stats = getattr(fixer, "stats", None)
    if stats is None or isinstance(fixer, (str, LocalFixerSpec)):
        return None
    try:
        s = stats()
        return int(s.get("frames_ok", 0)), float(s.get("frames_per_s", 0.0))
    except Exception:  # noqa: BLE001 - progress must never stop the run
        return None
