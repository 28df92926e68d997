"""FID and KID per method from features streamed off the workers, aggregated on the driver.

Features arrive as ``[N, D]`` arrays (computed once per view by the UDF); torchmetrics' metrics take them through a
pass-through "feature network", so the statistics are torchmetrics' own. FID keeps running sums (``D × D``, flat in
the number of views); KID needs samples, so a fixed-size reservoir per method and side bounds its memory.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance


class SetMetrics:
    """``update(method, render_feats, gt_feats)`` per batch, ``compute()`` → ``{method: {"fid": .., "kid": ..}}``."""

    def __init__(self, metrics: tuple[str, ...], kid_subset_size: int = 1000, kid_subsets: int = 100,
                 kid_max_samples: int = 10000, seed: int = 0):
        self.metrics = tuple(m for m in metrics if m in ("fid", "kid"))
        self.num_features = 0  # D, taken from the first batch (the driver never builds the feature network)
        self.kid_subset_size, self.kid_subsets = kid_subset_size, kid_subsets
        self.kid_max_samples = kid_max_samples
        self.seed = seed
        self._fid: dict[str, FrechetInceptionDistance] = {}
        self._kid: dict[str, tuple[_Reservoir, _Reservoir]] = {}

    def update(self, method: str, render_feats: np.ndarray, gt_feats: np.ndarray) -> None:
        """``render_feats``, ``gt_feats``: ``[N, D]`` features of the same N views."""
        if len(render_feats) == 0:
            return
        fake = torch.as_tensor(np.asarray(render_feats, dtype=np.float64))  # [N, D]
        real = torch.as_tensor(np.asarray(gt_feats, dtype=np.float64))  # [N, D]
        if fake.ndim != 2 or real.shape != fake.shape or (self.num_features and fake.shape[1] != self.num_features):
            raise ValueError(f"expected two [N, {self.num_features or 'D'}] feature arrays, got {tuple(fake.shape)} "
                             f"and {tuple(real.shape)}")
        self.num_features = fake.shape[1]
        if "fid" in self.metrics:
            if method not in self._fid:
                self._fid[method] = FrechetInceptionDistance(feature=_Precomputed(self.num_features),
                                                             reset_real_features=False)
            self._fid[method].update(real, real=True)
            self._fid[method].update(fake, real=False)
        if "kid" in self.metrics:
            if method not in self._kid:
                seed = self.seed + len(self._kid)
                self._kid[method] = (_Reservoir(self.kid_max_samples, seed), _Reservoir(self.kid_max_samples, seed + 7))
            self._kid[method][0].add(real.numpy())
            self._kid[method][1].add(fake.numpy())

    def compute(self) -> dict[str, dict]:
        """Per method: ``fid``, ``kid`` and ``kid_std`` (NaN with an ``*_error`` entry when a set is too small)."""
        out: dict[str, dict] = {}
        for method, fid in self._fid.items():
            res = out.setdefault(method, {})
            n = int(fid.fake_features_num_samples)
            res["n"] = n
            if n < 2:
                res["fid"], res["fid_error"] = math.nan, f"FID needs at least 2 views, got {n}"
            else:
                try:
                    res["fid"] = max(0.0, float(fid.compute()))  # tiny negatives are round-off of sqrtm
                except Exception as e:  # noqa: BLE001 - e.g. a non-finite covariance: reported, others go on
                    res["fid"], res["fid_error"] = math.nan, f"FID failed: {e!r}"
        for method, (real, fake) in self._kid.items():
            res = out.setdefault(method, {})
            res.setdefault("n", fake.seen)
            subset = min(self.kid_subset_size, len(real), len(fake))
            if subset < 2:
                res["kid"], res["kid_std"] = math.nan, math.nan
                res["kid_error"] = f"KID needs at least 2 views, got {subset}"
                continue
            torch.manual_seed(self.seed)  # torchmetrics draws the KID subsets from the global generator
            with warnings.catch_warnings():  # "saves all features": ours are a bounded reservoir
                warnings.simplefilter("ignore", UserWarning)
                kid = KernelInceptionDistance(feature=_Precomputed(self.num_features), subsets=self.kid_subsets,
                                              subset_size=subset, reset_real_features=False)
            kid.update(torch.as_tensor(real.array()), real=True)
            kid.update(torch.as_tensor(fake.array()), real=False)
            try:
                mean, std = kid.compute()
                res["kid"], res["kid_std"] = float(mean), float(std)
            except Exception as e:  # noqa: BLE001 - reported, the other metrics go on
                res["kid"], res["kid_std"], res["kid_error"] = math.nan, math.nan, f"KID failed: {e!r}"
        return out


class _Precomputed(nn.Module):
    """Pass-through 'feature network' for torchmetrics: the inputs already are ``[N, D]`` features."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class _Reservoir:
    """Uniform sample of at most ``capacity`` rows from a stream (Vitter's algorithm R), in fixed memory."""

    def __init__(self, capacity: int, seed: int):
        self.capacity = capacity
        self.rng = np.random.default_rng(seed)
        self.rows: list[np.ndarray] = []
        self.seen = 0

    def add(self, batch: np.ndarray) -> None:
        for row in batch:
            self.seen += 1
            if len(self.rows) < self.capacity:
                self.rows.append(np.array(row))
            else:
                j = int(self.rng.integers(0, self.seen))
                if j < self.capacity:
                    self.rows[j] = np.array(row)

    def __len__(self) -> int:
        return len(self.rows)

    def array(self) -> np.ndarray:
        return np.stack(self.rows)
