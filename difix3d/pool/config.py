"""Settings of one shared fixing pool (router + replicas), with defaults for one GPU per replica."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class PoolConfig:
    """How many replicas, how they batch, how much work may be in flight, when to scale.

    Defaults aim at SD-Turbo-sized Difix on GPUs: the paper's 76 ms/frame post-render fix (A100, arXiv 2503.01774
    Sec. 4) makes a 10 ms batching wait cheap, and two batches queued per replica keep a GPU busy while the router
    forms the next one.
    """

    checkpoint: str = ""
    """Fixer checkpoint URI; each replica loads it once (the URI travels, never the weights: NOTES-RAY)."""
    name: str = "difix3d-pool"
    """Name of the router actor; any task, actor or driver gets the pool by it (``get_pool(name)``)."""
    namespace: str = "difix3d"
    """Ray namespace of the router, fixed so that several jobs on one cluster can share a pool."""
    detached: bool = False
    """Keep the pool alive after the job that started it ends (then ``shutdown_pool`` ends it)."""

    # --- replicas
    min_replicas: int = 1
    max_replicas: int = 1
    num_gpus_per_replica: float | None = None
    """GPU share per replica; None: 1 when the cluster has GPUs, else 0 (CPU replicas). Fractions are a
    scheduling label only: replicas sharing a GPU also share its memory."""
    num_cpus_per_replica: float = 1.0
    device: str | None = None
    """Replica device; None: ``cuda`` when the replica has a GPU share, else ``cpu``."""
    dtype: str | None = None
    """``bfloat16``/``float32``/...; None: the runner's default (bf16 on CUDA, fp32 on CPU)."""
    compile: bool | None = None
    """torch.compile the fixer in each replica; None: on CUDA for large models only (``runner.COMPILE_MIN_PARAMS``)."""
    compile_mode: str = "default"
    """torch.compile's mode for compiled replicas; ``reduce-overhead`` adds CUDA graphs (one per batch size and frame
    size a replica sees; ~16 % faster per frame for sd-turbo at batch 1, see ``FixerRunner``)."""
    max_batches_per_replica: int = 2
    """Batches sent to one replica at once: one computing, one waiting, so the GPU never waits on the router."""

    # --- batching
    max_batch_size: int = 4
    """Frames per batch (requests are never split; one larger request forms a batch alone)."""
    max_wait_ms: float = 10.0
    """How long the oldest queued request waits for others to fill its batch."""

    # --- backpressure
    max_inflight_frames: int = 64
    """Frames admitted (queued + being fixed) pool-wide; ``submit`` blocks while the pool is full."""

    # --- faults
    max_attempts: int = 3
    """Replica deaths a request survives (re-queued on another replica each time) before it fails."""

    unavailable_timeout_s: float = 600.0
    """Queued requests fail with PoolUnavailableError once no replica has been ready for this long (replicas that
    keep failing to start, a lost node never replaced), rather than leaving their callers blocked forever."""

    batch_timeout_s: float = 900.0
    """A batch its replica has not answered in this long means the replica hangs (a stuck kernel, a deadlock): it
    is killed and the batch re-queued, as when a replica dies. Generous by default: a replica's first batch of a
    new size may compile the model for minutes. 0: wait forever."""

    health_check_s: float = 5.0
    """An idle replica is pinged this often, so one that died between batches is replaced before work needs it."""

    # --- scaling
    scale_up_queue_frames: int = 8
    """Queued frames per live replica above which the pool wants another replica..."""
    scale_up_after_s: float = 2.0
    """...once the queue has stayed that deep this long."""
    scale_down_idle_s: float = 60.0
    """A replica above ``min_replicas`` that fixed nothing this long is stopped."""
    reserve_min_replicas: bool = True
    """Hold the resources of ``min_replicas`` replicas in a placement group for the pool's whole life, so a replica
    that dies is replaced at once: without it, a task queued for the same CPU/GPU can take the freed share and the
    replacement (and every caller waiting on the pool) waits forever."""
    scale_beyond_free_resources: bool = False
    """Start replicas even when the cluster has no free CPU/GPU for them (an autoscaling cluster then adds
    nodes); off, the pool only grows into resources that are free now."""
    control_period_s: float = 0.25
    """How often the router checks scaling and replica health."""

    # --- observability
    stats_window_s: float = 30.0
    """Latency percentiles and frames/s cover the answers of this last window."""

    def __post_init__(self):
        if self.min_replicas < 0 or self.max_replicas < max(1, self.min_replicas):
            raise ValueError(f"need 0 <= min_replicas <= max_replicas and max_replicas >= 1, "
                             f"got {self.min_replicas}, {self.max_replicas}")
        for field in ("max_batch_size", "max_inflight_frames", "max_attempts", "max_batches_per_replica"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")
        for field in ("max_wait_ms", "batch_timeout_s"):
            if getattr(self, field) < 0:
                raise ValueError(f"{field} must be >= 0, got {getattr(self, field)}")
        from difix3d.fixer.config import COMPILE_MODES

        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode: expected one of {', '.join(COMPILE_MODES)}, got {self.compile_mode!r}")

    def replace(self, **changes) -> "PoolConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
