"""The four ways of making (artifact render, clean image) pairs from posed captures (Difix3D+, Wu et al., CVPR 2025,
Sec. 4.1 "Data curation"): sparse reconstruction, cross-camera, under-fitted models and cycle reconstruction.

Each strategy is a small dataclass behind :class:`CurationStrategy` (as gsplat's ``DefaultStrategy`` /
``MCMCStrategy``): it decides which views a 3DGS model trains on and which it renders, and yields pair dicts
``{"degraded", "target", "reference", "scene", "camera", "strategy", "psnr", "reference_camera"}`` with uint8
``[H, W, 3]`` images, ready for :func:`difix3d.train.pairs.write_pair_shard`. The reference is the nearest
training image (by pose) other than the target itself.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import ClassVar, Iterator

import numpy as np
import torch

from difix3d.errors import InputError
from difix3d.imageio import to_tensor, to_uint8
from difix3d.recon.gaussians import GaussianConfig, GaussianSplat
from difix3d.recon.trainer import TrainerConfig, TrainingView, train
from difix3d.scene.camera import Camera
from difix3d.scene.poses import nearest_camera, viewmat_from_c2w
from difix3d.train.pairs import psnr_uint8

REAL_SPLITS = ("train", "test", "cross_camera")  # splits whose views have captured images (shift_* have none)


class NotApplicable(Exception):
    """The strategy cannot run on this scene (e.g. cross-camera on a one-camera capture); not an input error."""


@dataclass
class ReconstructionSettings:
    """How every strategy fits its 3DGS models: the full iteration budget, Gaussian hyper-parameters, device."""

    iterations: int = 30_000  # the full budget (3DGS paper: 30k); UnderFitted stops at a fraction of it
    gaussian: GaussianConfig = field(default_factory=GaussianConfig)
    device: str | None = None  # None: CUDA when present (difix3d.device)
    seed: int = 0
    render_batch: int = 8  # cameras per render call

    def fit(self, scene, views: list[TrainingView], steps: int | None = None, seed_key: str = "") -> GaussianSplat:
        """A fresh model on ``views`` from the scene's points, trained for ``steps`` (default: the full budget);
        the schedules stay those of the full budget, so a shorter run is a genuinely under-fitted one."""
        if not views:
            raise InputError(getattr(scene, "root", "") or scene.name, "no training views for this strategy")
        seed = _seed(self.seed, scene.name, seed_key)
        torch.manual_seed(seed)
        gaussian = dataclasses.replace(self.gaussian, iterations=self.iterations)
        model = GaussianSplat.from_scene(scene, gaussian, device=self.device, seed=seed)
        train(model, views=views, eval_views={}, progress=False,
              config=TrainerConfig(iterations=steps or self.iterations, seed=seed))
        return model

    def render(self, model: GaussianSplat, cameras: list[Camera]) -> list[np.ndarray]:
        """uint8 [H, W, 3] renders of ``cameras``, in order (rendered in batches of one size)."""
        out: list[np.ndarray | None] = [None] * len(cameras)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, c in enumerate(cameras):
            by_size.setdefault((c.width, c.height), []).append(i)
        for idx in by_size.values():
            for k in range(0, len(idx), self.render_batch):
                chunk = idx[k:k + self.render_batch]
                rgb = to_uint8(model.render([cameras[i] for i in chunk]).rgb)  # [B, H, W, 3]
                for j, i in enumerate(chunk):
                    out[i] = rgb[j]
        return out  # type: ignore[return-value]  # every slot filled above


@dataclass
class CurationStrategy(abc.ABC):
    """Base class: ``make_pairs`` fits the strategy's model(s) on a scene and yields its pairs."""

    name: ClassVar[str] = ""

    def check(self) -> None:
        """ValueError naming a bad setting; called for the strategies a job runs, before any task starts."""

    @abc.abstractmethod
    def make_pairs(self, scene, recon: ReconstructionSettings) -> Iterator[dict]:
        """Pairs for one scene (see the module docstring for the dict); :class:`NotApplicable` when the scene
        lacks what the strategy needs, :class:`InputError` for bad input."""


@dataclass
class SparseReconstruction(CurationStrategy):
    """Train on every ``every_nth`` frame of each camera, render the skipped frames; their images are targets.

    Views come from the scene's captured splits (train + test), ordered per camera by timestamp."""

    name: ClassVar[str] = "sparse"
    every_nth: int = 4  # our default; the paper trains "on every n-th frame" without fixing n for all datasets

    def check(self) -> None:
        if isinstance(self.every_nth, bool) or not isinstance(self.every_nth, int) or self.every_nth < 2:
            raise ValueError(f"sparse.every_nth must be an integer >= 2, got {self.every_nth!r}")

    def split_views(self, scene) -> tuple[list[int], list[int]]:
        """(training indices, target indices)."""
        self.check()
        pool = _indices(scene, ("train", "test"))
        by_camera: dict[str, list[int]] = {}
        for i in pool:
            by_camera.setdefault(scene.cameras[i].camera_id, []).append(i)
        train_idx, targets = [], []
        for idx in by_camera.values():
            idx.sort(key=lambda i: (scene.cameras[i].timestamp, i))
            for k, i in enumerate(idx):
                (train_idx if k % self.every_nth == 0 else targets).append(i)
        if not targets:
            raise NotApplicable(f"every_nth={self.every_nth} leaves no skipped frames")
        return sorted(train_idx), sorted(targets)

    def make_pairs(self, scene, recon: ReconstructionSettings) -> Iterator[dict]:
        train_idx, targets = self.split_views(scene)
        views = load_training_views(scene, train_idx)
        model = recon.fit(scene, views, seed_key=self.name)
        yield from pairs_from_renders(scene, self.name, targets, recon.render(model, _cams(scene, targets)), train_idx)


@dataclass
class CrossCamera(CurationStrategy):
    """Leave one camera of a multi-camera rig out of training and render it; its images are the targets.

    ``held_out=None`` uses the scene's ``cross_camera`` split when it has one, else the last rig camera (by name)."""

    name: ClassVar[str] = "cross_camera"
    held_out: str | None = None

    def split_views(self, scene) -> tuple[list[int], list[int]]:
        pool = _indices(scene, REAL_SPLITS)
        if self.held_out is None and scene.splits.get("cross_camera"):
            targets = sorted(scene.splits["cross_camera"])
        else:
            rig = sorted({scene.cameras[i].camera_id for i in pool})
            if len(rig) < 2:
                raise NotApplicable(f"scene has {len(rig)} rig camera(s); cross-camera needs two or more")
            held = self.held_out if self.held_out is not None else rig[-1]
            if held not in rig:
                raise NotApplicable(f"scene has no camera {held!r} (has {rig})")
            targets = [i for i in pool if scene.cameras[i].camera_id == held]
        held_ids = {scene.cameras[i].camera_id for i in targets}
        train_idx = [i for i in pool if scene.cameras[i].camera_id not in held_ids]
        if not train_idx:
            raise NotApplicable("no views left to train on once the held-out camera is removed")
        return train_idx, targets

    def make_pairs(self, scene, recon: ReconstructionSettings) -> Iterator[dict]:
        train_idx, targets = self.split_views(scene)
        model = recon.fit(scene, load_training_views(scene, train_idx), seed_key=self.name)
        yield from pairs_from_renders(scene, self.name, targets, recon.render(model, _cams(scene, targets)), train_idx)


@dataclass
class UnderFitted(CurationStrategy):
    """Stop training at a fraction of the budget drawn from ``fraction_range``, render the held-out (test) views."""

    name: ClassVar[str] = "underfit"
    fraction_range: tuple[float, float] = (0.25, 0.75)  # paper: 25-75 % of the training schedule

    def check(self) -> None:
        lo, hi = _range(self.fraction_range, "underfit.fraction_range")
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"underfit.fraction_range must satisfy 0 < lo <= hi <= 1, got {self.fraction_range!r}")

    def fraction(self, scene, seed: int = 0) -> float:
        """The scene's fraction: deterministic per (seed, scene), so re-runs repeat it."""
        self.check()
        lo, hi = self.fraction_range
        return float(np.random.default_rng(_seed(seed, scene.name, self.name)).uniform(lo, hi))

    def make_pairs(self, scene, recon: ReconstructionSettings) -> Iterator[dict]:
        targets = sorted(scene.splits.get("test", []))
        train_idx = sorted(set(scene.splits.get("train", [])) - set(targets))  # never fitted to its own targets
        if not targets:
            raise NotApplicable("scene has no test views to render")
        if not train_idx:
            raise NotApplicable("scene has no training views apart from its test views")
        steps = max(1, int(round(self.fraction(scene, recon.seed) * recon.iterations)))
        model = recon.fit(scene, load_training_views(scene, train_idx), steps=steps, seed_key=self.name)
        yield from pairs_from_renders(scene, self.name, targets, recon.render(model, _cams(scene, targets)), train_idx)


@dataclass
class CycleReconstruction(CurationStrategy):
    """For trajectories with little parallax (driving): train on the original views, render them shifted
    sideways, train a second model on those renders only, and render the original cameras with it; the original
    images are the targets (the second model inherits the first one's errors, seen from off its trajectory)."""

    name: ClassVar[str] = "cycle"
    shift_range: tuple[float, float] = (1.0, 3.0)  # metres to the left, drawn per scene (our default: a lane change)
    both_sides: bool = False  # also shift to the right (mirror) and train the second model on both

    def check(self) -> None:
        lo, hi = _range(self.shift_range, "cycle.shift_range")
        if not lo <= hi:  # negative: to the right
            raise ValueError(f"cycle.shift_range must satisfy lo <= hi (metres), got {self.shift_range!r}")
        if lo <= 0.0 <= hi or min(abs(lo), abs(hi)) < 0.1:  # a shift of ~0 renders the views it trained on
            raise ValueError(f"cycle.shift_range must keep at least 0.1 m from 0 on one side, got {self.shift_range!r}")

    def shift(self, scene, seed: int = 0) -> float:
        self.check()
        lo, hi = self.shift_range
        return float(np.random.default_rng(_seed(seed, scene.name, self.name)).uniform(lo, hi))

    def make_pairs(self, scene, recon: ReconstructionSettings) -> Iterator[dict]:
        train_idx = sorted(scene.splits.get("train", []))
        originals = load_training_views(scene, train_idx)
        first = recon.fit(scene, originals, seed_key=self.name + "/original")
        d = self.shift(scene, recon.seed)
        shifted = [shift_laterally(v.camera, s) for v in originals for s in ((d, -d) if self.both_sides else (d,))]
        renders = recon.render(first, shifted)
        del first
        pseudo = [TrainingView(c, to_tensor(r)[0]) for c, r in zip(shifted, renders)]
        second = recon.fit(scene, pseudo, seed_key=self.name + "/shifted")
        yield from pairs_from_renders(scene, self.name, train_idx, recon.render(second, _cams(scene, train_idx)),
                                      train_idx)


STRATEGIES: dict[str, type[CurationStrategy]] = {
    s.name: s for s in (SparseReconstruction, CrossCamera, UnderFitted, CycleReconstruction)}


def shift_laterally(camera: Camera, metres: float) -> Camera:
    """``camera`` moved ``metres`` to the left of its trajectory, same orientation.

    Left is the ego's +y axis for driving cameras (``meta["ego_to_world"]``), else the camera's −x axis."""
    ego = camera.meta.get("ego_to_world") if camera.meta else None
    left = np.asarray(ego, dtype=np.float64)[:3, 1] if ego is not None else -camera.rotation_c2w[:, 0]
    left = left / max(np.linalg.norm(left), 1e-12)
    moved = camera.with_pose(viewmat_from_c2w(camera.rotation_c2w, camera.position + metres * left))
    moved.name = f"{camera.name}_shift{metres:+.2f}"
    return moved


def pairs_from_renders(scene, strategy: str, targets: list[int], renders, train_idx: list[int]) -> Iterator[dict]:
    """Pair dicts: render ``renders[k]`` of view ``targets[k]``, its captured image, and the nearest training
    image (by pose) that is not the target itself."""
    for i, degraded in zip(targets, renders):
        cam = scene.cameras[i]
        target = scene.load_image(i)
        # the shard format keeps triplets of one size: the nearest training view of the target's size (a rig's
        # cameras may differ: Waymo's side cameras are shorter than its front ones)
        candidates = [j for j in train_idx if scene.cameras[j].name != cam.name
                      and (scene.cameras[j].width, scene.cameras[j].height) == (cam.width, cam.height)]
        ref_i = candidates[nearest_camera(cam, [scene.cameras[j] for j in candidates])] if candidates else None
        reference = scene.load_image(ref_i) if ref_i is not None else None
        if reference is not None and reference.shape != target.shape:
            reference, ref_i = None, None  # a file not the size its camera says (read_view_image refuses those)
        yield {"degraded": degraded, "target": target, "reference": reference, "scene": scene.name,
               "camera": cam.name, "strategy": strategy, "psnr": psnr_uint8(degraded, target),
               "reference_camera": "" if ref_i is None else scene.cameras[ref_i].name}


def load_training_views(scene, indices: list[int]) -> list[TrainingView]:
    """Decode views once into [3, H, W] float tensors (errors name the image file)."""
    return [TrainingView(scene.cameras[i], to_tensor(scene.load_image(i))[0]) for i in indices]


def _range(value, name: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be two numbers (lo, hi), got {value!r}") from None
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return lo, hi


def _indices(scene, splits) -> list[int]:
    return sorted({i for s in splits for i in scene.splits.get(s, [])})


def _cams(scene, indices: list[int]) -> list[Camera]:
    return [scene.cameras[i] for i in indices]


def _seed(seed: int, *keys: str) -> int:
    """A stable 31-bit seed per (seed, keys): Python's hash() is salted per process."""
    h = hashlib.sha1(("/".join([str(seed), *keys])).encode("utf-8")).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF
