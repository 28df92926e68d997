"""The two policies of progressive Difix3D, as small dataclasses whose hooks the loop calls (gsplat-strategy style).

- :class:`ProgressiveSchedule` — *when* a round runs and *where* its pseudo cameras go: every ``round_every``
  iterations after ``pretrain_iters``, each target camera gets a pseudo camera one ``step_size`` closer to it,
  starting from its nearest known camera (training cameras and earlier pseudo cameras).
- :class:`PseudoViewSampling` — *how* training mixes real and pseudo views: which view an iteration trains on,
  its loss weight, and which pixels of a pseudo view count.

Defaults follow Difix3D+ (Wu et al., CVPR 2025, arXiv 2503.01774, Sec. 4.2) as released in the authors' code,
``examples/gsplat/simple_trainer_difix3d.py`` of nv-tlabs/Difix3D (cited below as "original code").
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Collection, Sequence, TypeVar

from torch import Tensor

from difix3d.scene import poses
from difix3d.scene.camera import Camera

V = TypeVar("V")


@dataclass
class ProgressiveSchedule:
    """When rounds run and how far each round moves the pseudo cameras towards the targets."""

    pretrain_iters: int = 3_000
    """Iterations of plain training before the first round (original code: first ``fix_steps`` entry 3 000)."""
    round_every: int = 2_000
    """Iterations between rounds (original code: ``fix_steps`` every 2 000 iterations)."""
    step_size: float = 0.5
    """Pose distance moved per round, in scene units (original code: ``shift_poses(..., distance=0.5)``)."""
    rotation_weight: float = 1.0
    """Weight of the rotation angle (radians) in the pose distance (original code: ``CameraPoseInterpolator(
    rotation_weight=1.0, translation_weight=1.0)``)."""
    max_rounds: int | None = None
    """Cap on the number of rounds; None: every round that fits in the iteration budget."""

    def check(self) -> None:
        """ValueError naming the setting out of range (checked before any scene trains)."""
        _check_number("schedule.pretrain_iters", self.pretrain_iters, 0)
        _check_number("schedule.round_every", self.round_every, 1)
        _check_number("schedule.step_size", self.step_size, 0.0, strict=True)
        _check_number("schedule.rotation_weight", self.rotation_weight, 0.0)
        if self.max_rounds is not None:
            _check_number("schedule.max_rounds", self.max_rounds, 0)

    def round_starts(self, iterations: int) -> list[int]:
        """Iteration counts (optimizer steps taken) at which the rounds start, within a budget of ``iterations``."""
        if self.round_every <= 0:
            raise ValueError(f"round_every must be positive, got {self.round_every}")
        starts = list(range(self.pretrain_iters, iterations, self.round_every))
        return starts if self.max_rounds is None else starts[: self.max_rounds]

    def next_cameras(self, known: Sequence[Camera], targets: Sequence[Camera]) -> list[Camera]:
        """One pseudo camera per target: its nearest known camera moved ``step_size`` towards it (snapped onto
        the target when within a step; rotation slerped; original code: ``CameraPoseInterpolator.shift_poses``).
        Each keeps the target's name and intrinsics."""
        out = []
        for target in targets:
            start = known[nearest_index(target, known, self.rotation_weight)]
            stepped = poses.step_towards(start, target, self.step_size, self.rotation_weight)
            out.append(target.with_pose(stepped.viewmat))
        return out

    def rounds_to_reach(self, known: Sequence[Camera], targets: Sequence[Camera], limit: int = 1000) -> int:
        """How many rounds until every target has a pseudo camera on it (for planning budgets and tests)."""
        known = list(known)
        for k in range(1, limit + 1):
            cams = self.next_cameras(known, targets)
            if all(poses.pose_distance(c, t, self.rotation_weight) < 1e-6 for c, t in zip(cams, targets)):
                return k
            known += cams
        raise RuntimeError(f"targets not reached within {limit} rounds")


def nearest_index(camera: Camera, candidates: Sequence[Camera], rotation_weight: float = 1.0) -> int:
    """Index of the candidate nearest to ``camera`` (translation + ``rotation_weight`` × rotation angle)."""
    return poses.nearest_camera(camera, candidates, rotation_weight)


@dataclass
class PseudoViewSampling:
    """How real and pseudo views are mixed in training."""

    probability: float = 0.3
    """Chance an iteration trains on a pseudo view once any exist (original code: a real view when
    ``random.random() < 0.7``)."""
    weight: float = 0.3
    """Loss weight of pseudo views (original code: ``novel_data_lambda = 0.3``)."""
    real_weight: float = 1.5
    """Loss weight of real views (original code: ``loss * 1.5``)."""
    alpha_threshold: float = 0.5
    """Pseudo-view pixels whose rendered alpha is at or below this are masked out of the loss (original code:
    ``alpha_masks > 0.5``): the fixer's guess where the representation has nothing must not create geometry."""
    rounds: str = "latest"
    """Pseudo views drawn from: ``latest`` round only (original code: ``novelloaders[-1]``) or ``all`` rounds."""

    def check(self) -> None:
        """ValueError naming the setting out of range (checked before any scene trains)."""
        _check_number("sampling.probability", self.probability, 0.0, 1.0)
        _check_number("sampling.weight", self.weight, 0.0)
        _check_number("sampling.real_weight", self.real_weight, 0.0)
        _check_number("sampling.alpha_threshold", self.alpha_threshold, 0.0, 1.0)
        if self.rounds not in ("latest", "all"):
            raise ValueError(f"sampling.rounds: expected 'latest' or 'all', got {self.rounds!r}")

    def pool(self, pseudo_by_round: Sequence[Sequence[V]], pending_rounds: Collection[int] = ()) -> list[V]:
        """The pseudo views an iteration may draw from. ``pending_rounds``: rounds whose fixes are still arriving;
        ``latest`` keeps to the newest complete round until they have all joined (a round's first answered batch
        alone would take every pseudo step), or the newest partial one while no round is complete."""
        if self.rounds not in ("latest", "all"):
            raise ValueError(f"PseudoViewSampling.rounds: expected 'latest' or 'all', got {self.rounds!r}")
        filled = [(k, list(r)) for k, r in enumerate(pseudo_by_round) if r]
        if not filled:
            return []
        if self.rounds == "all":
            return [v for _, r in filled for v in r]
        complete = [r for k, r in filled if k not in pending_rounds]
        return complete[-1] if complete else filled[-1][1]

    def pick(self, rng: random.Random, real: Sequence[V], pseudo_by_round: Sequence[Sequence[V]],
             pending_rounds: Collection[int] = ()) -> tuple[V, bool]:
        """(view, is_pseudo) for one iteration."""
        pool = self.pool(pseudo_by_round, pending_rounds)
        if pool and rng.random() < self.probability:
            return pool[rng.randrange(len(pool))], True
        return real[rng.randrange(len(real))], False

    def loss_weight(self, is_pseudo: bool) -> float:
        return self.weight if is_pseudo else self.real_weight

    def mask(self, alpha: Tensor) -> Tensor:
        """Rendered alpha ``[B, 1, H, W]`` → float mask ``[B, 1, H, W]`` of the pixels a pseudo view supervises."""
        return (alpha > self.alpha_threshold).float()


def _check_number(name: str, value, low: float, high: float | None = None, strict: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if strict else value >= low) and (high is None or value <= high)
    if not ok:
        bound = f"> {low}" if strict else f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name}: expected a number {bound}, got {value!r}")


def expected_rounds(distance: float, step_size: float) -> int:
    """Rounds a pseudo camera needs to cover ``distance`` by steps of ``step_size``, snapping within a step."""
    return max(1, math.ceil(distance / step_size - 1e-9))

