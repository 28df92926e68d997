"""FID and KID per set (a method, or a (split, method) pair) from features streamed off the workers, aggregated on
the driver.

Features arrive as ``[N, D]`` arrays (computed once per view by the UDF); torchmetrics' metrics take them through a
pass-through "feature network", so the statistics are torchmetrics' own. FID keeps running sums (``D × D``, flat in
the number of views); KID needs samples, so a fixed-size reservoir per set and side bounds its memory.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Hashable

import numpy as np
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

log = logging.getLogger(__name__)


class SetMetrics:
    """``update(key, render_feats, gt_feats)`` per batch, ``compute()`` → ``{key: {"fid": .., "kid": .., "n": ..}}``;
    a key names a set of views (a method, or a ``(split, method)`` pair)."""

    def __init__(self, metrics: tuple[str, ...], kid_subset_size: int = 1000, kid_subsets: int = 100,
                 kid_max_samples: int = 10000, seed: int = 0):
        self.metrics = tuple(m for m in metrics if m in ("fid", "kid"))
        self.num_features = 0  # D, taken from the first batch (the driver never builds the feature network)
        self.kid_subset_size, self.kid_subsets = kid_subset_size, kid_subsets
        self.kid_max_samples = kid_max_samples
        self.seed = seed
        self._fid: dict[Hashable, FrechetInceptionDistance] = {}
        self._kid: dict[Hashable, tuple[_Reservoir, _Reservoir]] = {}

    def update(self, key: Hashable, render_feats: np.ndarray, gt_feats: np.ndarray) -> None:
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
            if key not in self._fid:
                self._fid[key] = FrechetInceptionDistance(feature=_Precomputed(self.num_features),
                                                          reset_real_features=False)
            self._fid[key].update(real, real=True)
            self._fid[key].update(fake, real=False)
        if "kid" in self.metrics:
            if key not in self._kid:
                seed = self.seed + len(self._kid)
                self._kid[key] = (_Reservoir(self.kid_max_samples, seed), _Reservoir(self.kid_max_samples, seed + 7))
            # float32 as the workers computed them: a reservoir is kept per method and per (split, method)
            self._kid[key][0].add(np.asarray(gt_feats, dtype=np.float32))
            self._kid[key][1].add(np.asarray(render_feats, dtype=np.float32))

    def compute(self) -> dict[Hashable, dict]:
        """Per key: ``n`` (views), ``fid``, ``kid`` and ``kid_std`` (NaN with an ``*_error`` entry when a set is too
        small), and ``fid_note`` / ``kid_note`` when the value needs care (see :func:`_fid_note`, :func:`_kid_note`)."""
        out: dict[Hashable, dict] = {}
        for key, fid in self._fid.items():
            res = out.setdefault(key, {})
            n = int(fid.fake_features_num_samples)
            res["n"] = n
            if n < 2:
                res["fid"], res["fid_error"] = math.nan, f"FID needs at least 2 views, got {n}"
            else:
                try:
                    res["fid"] = max(0.0, float(fid.compute()))  # tiny negatives are round-off of sqrtm
                    if n < self.num_features:
                        res["fid_note"] = _fid_note(n, self.num_features)
                except Exception as e:  # noqa: BLE001 - e.g. a non-finite covariance: reported, others go on
                    res["fid"], res["fid_error"] = math.nan, f"FID failed: {e!r}"
        for key, (real, fake) in self._kid.items():
            res = out.setdefault(key, {})
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
            kid.update(torch.as_tensor(real.array(), dtype=torch.float64), real=True)
            kid.update(torch.as_tensor(fake.array(), dtype=torch.float64), real=False)
            try:
                mean, std = kid.compute()
                res["kid"], res["kid_std"] = float(mean), float(std)
                if subset >= min(len(real), len(fake)):
                    res["kid_note"] = _kid_note(subset)
            except Exception as e:  # noqa: BLE001 - reported, the other metrics go on
                res["kid"], res["kid_std"], res["kid_error"] = math.nan, math.nan, f"KID failed: {e!r}"
        for key, res in out.items():
            for note in ("fid_note", "kid_note"):
                if note in res:
                    log.warning("%s: %s", _label(key), res[note])
        return out


def _fid_note(n: int, dim: int) -> str:
    return (f"FID over {n} views < {dim} feature dimensions: the covariance is rank-deficient, so the value depends "
            f"on n; compare it only between runs with the same number of views")


def _kid_note(subset: int) -> str:
    return (f"KID subsets of {subset} views are the whole set: every subset is the same, so its ± std is "
            f"meaningless")


def _label(key: Hashable) -> str:
    return "/".join(key) if isinstance(key, tuple) else str(key)


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
