"""The evaluation job's settings, one dataclass written beside the outputs as ``config.json``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from difix3d.eval.metrics import ALL_METRICS


@dataclass
class EvalConfig:
    """What to evaluate, with which metrics, on how many workers.

    ``input`` is a rows file (Parquet, JSON list or JSON lines with ``segment, view, method, render_uri, gt_uri`` and
    an optional ``split``) or a fleet output folder (``<out>/scenes/<scene>/renders/<method>/<split>/<view>.png``,
    ground truth under ``renders/gt``). Everything is written under ``output`` (see
    :func:`difix3d.eval.pipeline.evaluate`); :data:`difix3d.eval.fingerprint.METRIC_FIELDS` are the fields that a
    re-run must keep to reuse it.
    """

    input: str
    output: str
    metrics: tuple[str, ...] = ALL_METRICS
    # LPIPS backbone. AlexNet is the LPIPS default and what nerfstudio's and gsplat's evaluation (the pipelines
    # behind the paper's baselines) report.
    lpips_net: str = "alex"
    # "pretrained": ImageNet backbone from the torch hub cache (reported unavailable when missing);
    # "random": a randomly initialised backbone with the real linear heads (stand-in: values are NOT comparable
    # to published LPIPS). A zero-argument callable returning an lpips.LPIPS-like module is also accepted; it
    # must be importable on the workers.
    lpips_weights: str | Callable[[], Any] = "pretrained"
    # FID/KID features. "inception": torch-fidelity's InceptionV3 pool features (2048-d, the FID standard,
    # Heusel et al. 2017; images resized to 299 as the original code does); "random": a small fixed-seed conv net (stand-in for tests and offline smoke runs); or a
    # zero-argument callable returning a module mapping float [B, 3, H, W] in [0, 1] to [B, D].
    fid_features: str | Callable[[], Any] = "inception"
    random_feature_dim: int = 64
    # Folder holding ``checkpoints/<weights file>`` as torch.hub lays it out; None → torch.hub.get_dir().
    hub_dir: str | None = None
    workers: int = 1  # max actors in the pool
    min_workers: int = 1
    num_gpus_per_worker: float = 0.0
    num_cpus_per_worker: float = 1.0
    batch_size: int = 16  # views per UDF call
    baseline_method: str = "baseline"  # x axis of the per-segment improvement scatter
    bootstrap_resamples: int = 1000
    confidence: float = 0.95
    kid_subset_size: int = 1000  # torchmetrics / Binkowski et al. 2018 default; shrunk to the set size if smaller
    kid_subsets: int = 100
    kid_max_samples: int = 10000  # features kept per method and side (reservoir), so driver memory stays bounded
    examples_per_end: int = 4  # best and worst views shown per method
    rank_metric: str = "psnr"  # what "best" and "worst" mean in the examples grid
    overwrite: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.metrics, str):
            self.metrics = tuple(m.strip() for m in self.metrics.split(",") if m.strip())
        self.metrics = tuple(self.metrics)
        unknown = [m for m in self.metrics if m not in ALL_METRICS]
        if unknown:
            raise ValueError(f"unknown metrics {unknown}; choose from {list(ALL_METRICS)}")
        if self.workers < 1 or self.min_workers < 1 or self.min_workers > self.workers:
            raise ValueError(f"need 1 <= min_workers <= workers, got {self.min_workers} and {self.workers}")
        for name in ("batch_size", "bootstrap_resamples", "kid_subsets", "kid_subset_size", "kid_max_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must lie between 0 and 1, got {self.confidence}")

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("lpips_weights", "fid_features"):
            if callable(d[k]):
                d[k] = f"{getattr(d[k], '__module__', '?')}.{getattr(d[k], '__qualname__', repr(d[k]))}"
        d["metrics"] = list(self.metrics)
        return d
