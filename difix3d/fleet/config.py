"""FleetConfig: everything the fleet job needs, one dataclass that the job's CLI is built from and that is written
as ``config.json`` into the output so a run says how it was made."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class FleetConfig:
    """Progressive Difix3D+ reconstruction of many scenes on a Ray cluster sharing one fixing pool.

    With every field at its default the job is the laptop demo: a few tiny synthetic driving segments are generated
    under ``<output>/inputs/``, fixed by the small checkpoint bundled with the package, on CPU, in a few minutes.
    """

    # --- what to run on
    scenes: str | None = None
    """Scene manifest: a Parquet/JSON list of scene URIs, a glob (``s3://b/segs/*``), a folder of scenes, or a
    comma-separated list. None: generate ``synthetic_scenes`` tiny driving segments into ``<output>/inputs/``."""
    checkpoint: str | None = None
    """Fixer checkpoint URI; None: the small checkpoint bundled with difix3d."""
    output: str = "./difix3d-results"
    """Output URI (local path, file://, s3://, gs://): scenes/<id>/..., _manifest/, summary.parquet, config.json."""

    # --- the embedded demo's synthetic segments
    synthetic_scenes: int = 3
    synthetic_frames: int = 4
    synthetic_height: int = 48
    synthetic_width: int = 64
    synthetic_points: int = 2000
    """Lidar-like points per segment; they seed the Gaussians, so they set the CPU cost of each scene."""
    seed: int = 0

    # --- per-scene reconstruction
    recon_preset: str = "tiny"
    """``tiny`` (CPU demo, ``ProgressiveConfig.tiny()``) or ``paper`` (``ProgressiveConfig()``, paper defaults)."""
    representation: str = "3dgs"
    """``3dgs`` (gsplat) or ``nerfacto`` (nerfstudio's Nerfacto; needs the NeRF extra, see README)."""
    scene_num_cpus: float = 1.0
    scene_num_gpus: float = 0.245
    """GPU share per scene task when the cluster has GPUs: 3DGS on a 1-2 MP driving segment uses a fraction of an
    80 GB GPU, so several scenes share one with a fixer replica (a scheduling label: no memory isolation). Two fit
    beside a replica's 0.51."""
    scene_memory_gb: float = 0.0
    """Memory reserved per scene task (0: no reservation), so the scheduler does not pack scenes into an OOM."""

    # --- the shared fixing pool
    fixer_mode: str = "pool"
    """``pool``: one shared Ray fixing pool; ``local``: each scene task loads its own in-process fixer."""
    pool_name: str = "difix3d-fleet"
    pool_replicas: int = 0
    """0: one replica per GPU in the cluster (1 CPU replica on a CPU-only cluster)."""
    pool_max_replicas: int = 0
    """0: same as the replica count; larger lets the pool autoscale with the cluster."""
    pool_compile_mode: str = "default"
    """torch.compile's mode in the pool's replicas (when they compile: sd-turbo on CUDA). ``reduce-overhead`` replays
    CUDA graphs (31.2 instead of 37.0 ms per 576x1024 sd-turbo frame at batch 1 on an H200, measured side by side
    before the later serving rewrites; benchmarks/RESULTS.md) and keeps one recorded graph, with its memory, per
    batch size and frame size a replica sees; not yet measured inside a pool beside scene tasks, hence not the
    default."""
    replica_num_gpus: float = 0.51
    """GPU share per fixer replica. Ray packs fractional shares onto one GPU until it is full, so at 0.5 two replicas
    would share a GPU (and leave another to scenes alone); just over half keeps one replica per GPU, with two scenes
    of ``scene_num_gpus`` = 0.245 beside it."""

    # --- scheduling and recovery
    max_in_flight: int = 0
    """Scene tasks submitted at once; 0: as many as the cluster's CPUs/GPUs fit, plus one queued per slot."""
    max_attempts: int = 2
    """Tries per scene before it is marked failed (bad input such as a corrupt image fails at once)."""
    retry_failed: bool = False
    """Re-run scenes that a previous run marked failed (their failure count starts again: ``max_attempts`` more
    tries; ``attempts`` in the summary keeps counting every try)."""
    device: str = "auto"
    """``auto`` (CUDA when the cluster has GPUs), ``cuda`` or ``cpu``."""
    progress: bool = True
    """A progress bar of scenes (done, failed, running, frames fixed per second) while the job runs."""

    extra: dict[str, Any] = field(default_factory=dict)
    """Overrides of the per-scene ProgressiveConfig (``--set``), dotted for nested fields, e.g.
    ``{"trainer.iterations": 600, "schedule.round_every": 200}``. ``trainer.iterations`` is each run's budget; the 3DGS
    schedules follow it (``ProgressiveConfig.budgeted``)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FleetConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"FleetConfig: unknown fields {unknown}")
        return cls(**d)

    def validate(self) -> None:
        if self.fixer_mode not in ("pool", "local"):
            raise ValueError(f"fixer_mode must be 'pool' or 'local', not {self.fixer_mode!r}")
        if self.device not in ("auto", "cuda", "cpu"):
            raise ValueError(f"device must be 'auto', 'cuda' or 'cpu', not {self.device!r}")
        if self.representation not in ("3dgs", "nerfacto"):
            raise ValueError(f"representation must be '3dgs' or 'nerfacto', not {self.representation!r}")
        if self.recon_preset not in ("tiny", "paper"):
            raise ValueError(f"recon_preset must be 'tiny' or 'paper', not {self.recon_preset!r}")
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        from difix3d.fixer.config import COMPILE_MODES

        if self.pool_compile_mode not in COMPILE_MODES:
            raise ValueError(f"pool_compile_mode must be one of {', '.join(COMPILE_MODES)}, not "
                             f"{self.pool_compile_mode!r}")
        for name in ("scene_num_cpus", "scene_num_gpus", "scene_memory_gb", "replica_num_gpus", "pool_replicas", "pool_max_replicas",
                     "max_in_flight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("synthetic_frames", "synthetic_height", "synthetic_width"):
            if self.scenes is None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.scenes is None and self.synthetic_scenes < 1:
            raise ValueError("no --scenes given and synthetic_scenes < 1: nothing to run")
        from .scene_task import progressive_config

        # here, on the driver: a budget at odds with the representation's schedules would fail every scene alike
        progressive_config(self).budgeted()
