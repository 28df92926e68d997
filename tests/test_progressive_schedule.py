"""The progressive schedule and pseudo-view sampling policies (no training: fast)."""

import math
import random

import numpy as np
import pytest
import torch

from difix3d.recon.schedule import ProgressiveSchedule, PseudoViewSampling, expected_rounds, nearest_index
from difix3d.scene.poses import pose_distance
from difix3d.scene.camera import Camera

K = np.array([[40.0, 0, 24], [0, 40.0, 16], [0, 0, 1]])


def cam(x: float, z: float = 0.0, yaw: float = 0.0, name: str = "") -> Camera:
    """A camera at (x, 0, z) looking along +z, turned by ``yaw`` radians about the y axis."""
    c, s = math.cos(yaw), math.sin(yaw)
    c2w = np.eye(4)
    c2w[:3, :3] = [[c, 0, s], [0, 1, 0], [-s, 0, c]]
    c2w[:3, 3] = [x, 0.0, z]
    return Camera.from_c2w(c2w, K, 48, 32, name=name)


def test_rounds_start_after_pretraining_every_round_every_iterations():
    s = ProgressiveSchedule()
    assert (s.pretrain_iters, s.round_every, s.step_size) == (3000, 2000, 0.5)  # original code defaults
    assert s.round_starts(10_000) == [3000, 5000, 7000, 9000]
    assert ProgressiveSchedule(max_rounds=2).round_starts(10_000) == [3000, 5000]
    assert ProgressiveSchedule(pretrain_iters=100, round_every=40).round_starts(220) == [100, 140, 180]


def test_pose_stepping_reaches_every_target_in_the_expected_number_of_rounds():
    train = [cam(0.0, z, name=f"train{i}") for i, z in enumerate((0.0, 2.0, 4.0))]
    targets = [cam(1.0, 0.0, name="shift1"), cam(2.0, 2.0, name="shift2"), cam(3.0, 4.0, name="shift3")]
    sched = ProgressiveSchedule(step_size=0.5)
    known, reached_at = list(train), {}
    for k in range(1, 10):
        cams = sched.next_cameras(known, targets)
        assert [c.name for c in cams] == [t.name for t in targets]  # pseudo views are named after their target
        for c, t in zip(cams, targets):
            d = pose_distance(c, t)
            if d < 1e-6:
                reached_at.setdefault(t.name, k)
            else:  # one step further along the way each round, never overshooting
                assert np.isclose(np.linalg.norm(c.position - t.position), t.position[0] - 0.5 * k, atol=1e-6)
        known += cams
    assert reached_at == {"shift1": 2, "shift2": 4, "shift3": 6}
    assert [expected_rounds(d, 0.5) for d in (1.0, 2.0, 3.0)] == [2, 4, 6]
    assert sched.rounds_to_reach(train, targets) == 6


def test_pose_stepping_turns_rotations_towards_the_target():
    start, target = cam(0.0, name="a"), cam(1.0, yaw=0.5, name="b")
    sched = ProgressiveSchedule(step_size=0.5)
    c1 = sched.next_cameras([start], [target])[0]
    d0, d1 = pose_distance(start, target), pose_distance(c1, target)
    assert d1 < d0 and np.isclose(d0 - d1, 0.5, atol=1e-3)
    assert np.allclose(c1.K, target.K) and (c1.width, c1.height) == (target.width, target.height)
    assert sched.rounds_to_reach([start], [target]) == expected_rounds(d0, 0.5)


def test_nearest_index_uses_translation_and_rotation():
    cands = [cam(0.0), cam(1.0), cam(0.9, yaw=1.0)]
    assert nearest_index(cam(0.95), cands) == 1  # the turned camera is nearer in translation only
    assert nearest_index(cam(0.2), cands) == 0
    with pytest.raises(ValueError):
        nearest_index(cam(0.0), [])


def test_sampling_mixes_pseudo_views_at_the_configured_rate_from_the_latest_round():
    s = PseudoViewSampling()
    assert (s.probability, s.weight, s.real_weight, s.alpha_threshold) == (0.3, 0.3, 1.5, 0.5)
    rng = random.Random(0)
    real, rounds = ["r0", "r1"], [["a0", "a1"], [], ["c0"]]
    assert s.pool(rounds) == ["c0"] and PseudoViewSampling(rounds="all").pool(rounds) == ["a0", "a1", "c0"]
    picks = [s.pick(rng, real, rounds) for _ in range(4000)]
    frac = sum(p for _, p in picks) / len(picks)
    assert abs(frac - 0.3) < 0.03
    assert {v for v, p in picks if p} == {"c0"} and {v for v, p in picks if not p} == {"r0", "r1"}
    assert all(not p for _, p in (s.pick(rng, real, [[], []]) for _ in range(50)))  # nothing fixed yet
    assert s.loss_weight(True) == 0.3 and s.loss_weight(False) == 1.5
    with pytest.raises(ValueError):
        PseudoViewSampling(rounds="first").pool(rounds)


def test_the_latest_round_is_the_newest_complete_one_while_fixes_arrive():
    s = PseudoViewSampling()
    rounds = [["a0", "a1", "a2", "a3"], ["b0"]]  # round 1's first batch answered, three still on their way
    assert s.pool(rounds, pending_rounds={1}) == ["a0", "a1", "a2", "a3"]  # not b0 alone for every pseudo step
    assert s.pool(rounds) == ["b0"]  # round 1 complete
    assert s.pool([["a0"]], pending_rounds={0}) == ["a0"]  # no complete round yet: what has joined
    assert PseudoViewSampling(rounds="all").pool(rounds, pending_rounds={1}) == ["a0", "a1", "a2", "a3", "b0"]
    picks = {s.pick(random.Random(i), ["r"], rounds, {1})[0] for i in range(300)}
    assert picks == {"r", "a0", "a1", "a2", "a3"}


def test_pseudo_view_mask_drops_pixels_with_alpha_at_or_below_the_threshold():
    alpha = torch.tensor([0.0, 0.5, 0.51, 1.0]).reshape(1, 1, 2, 2)
    assert PseudoViewSampling().mask(alpha).flatten().tolist() == [0.0, 0.0, 1.0, 1.0]


@pytest.mark.parametrize("section, field, value", [("schedule", "step_size", 0.0), ("schedule", "round_every", 0),
                                                   ("schedule", "pretrain_iters", -1),
                                                   ("sampling", "rounds", "last"),
                                                   ("sampling", "probability", 1.5)])
def test_schedule_and_sampling_settings_out_of_range_are_named_before_training(section, field, value):
    """budgeted() runs on the fleet's driver: a bad round setting is refused before any scene trains its baseline
    (step size 0 failed after the whole baseline, naming no setting; a negative pretrain_iters ran no round)."""
    import dataclasses

    from difix3d.recon.progressive import ProgressiveConfig

    config = ProgressiveConfig()
    config = dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), **{field: value})})
    with pytest.raises(ValueError, match=rf"{section}\.{field}"):
        config.budgeted()
    ProgressiveConfig().budgeted()
