"""Cameras of several sizes in one progressive run: driving segments mix them (Waymo's side cameras are 1920x886, its
front ones 1920x1280), and a trajectory may be rendered at another resolution than the training views."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from difix3d import imageio, storage
from difix3d.recon.progressive import reconstruct_scene
from difix3d.recon.schedule import nearest_index
from difix3d.recon.view_fixers import IdentityViewFixer, OracleViewFixer
from test_progressive import H, W, RecordingFixer, make_street, tiny_config


@pytest.fixture(scope="module")
def street():
    torch.manual_seed(0)
    return make_street()


def _narrow_right_cameras(street):
    """The street with its right cameras 4 px narrower, the test frame's right camera held out with its front one."""
    cameras = [dataclasses.replace(c, width=c.width - 4, K=c.K.copy()) if c.name.endswith("_right") else c
               for c in street.cameras]
    splits = {k: list(v) for k, v in street.splits.items()}
    right = [c.name for c in cameras].index("002_right")
    splits["train"].remove(right)
    splits["test"].append(right)
    return dataclasses.replace(street, cameras=cameras, splits=splits)


def test_a_scene_of_two_camera_sizes_runs_every_method_at_each_cameras_size(street, tmp_path):
    mixed = _narrow_right_cameras(street)
    fixer = RecordingFixer(OracleViewFixer(mixed.render_gt))
    cfg = tiny_config(iterations=24, target_splits=("test", "shift_1m"), eval_splits=("test", "shift_1m"))
    result = reconstruct_scene(mixed, str(tmp_path), cfg, fixer, progress=False, device="cpu")
    for renders, refs, cams in fixer.calls:  # one size per request, references at the renders' size
        assert {(c.height, c.width) for c in cams} == {renders.shape[1:3]} and refs.shape == renders.shape
    assert {r.shape[1:3] for r, _, _ in fixer.calls} == {(H, W), (H, W - 4)}
    for method in ("gt", "baseline", "difix3d", "difix3d_plus"):
        image = imageio.read_image(storage.join(str(tmp_path), "renders", method, "test", "002_right.png"))
        assert image.shape == (H, W - 4, 3)
    assert result.metrics["test"]["difix3d_plus"]["psnr"] > 60  # the oracle's answers, scored at both sizes
    assert all(np.isfinite(v) for s in result.metrics.values() for m in s.values() for v in m.values())


def test_a_trajectory_at_twice_the_resolution_gets_references_at_its_size(street, tmp_path):
    trajectory = [dataclasses.replace(street.cameras[i].scaled(2.0), name=f"traj_{k}")
                  for k, i in enumerate(street.splits["shift_1m"])]
    fixer = RecordingFixer(IdentityViewFixer())
    cfg = tiny_config(iterations=24, baseline=False, post_render=False)
    reconstruct_scene(street, str(tmp_path), cfg, fixer, progress=False, device="cpu", targets=trajectory)
    train = [street.cameras[i] for i in street.splits["train"]]
    for renders, refs, cams in fixer.calls:
        assert renders.shape[1:3] == (2 * H, 2 * W) and refs.shape == renders.shape
        for ref, cam in zip(refs, cams):  # the nearest training image, resized (Lanczos) to the trajectory's size
            nearest = street.load_image(street.splits["train"][nearest_index(cam, train)])
            assert np.abs(ref.astype(int) - np.kron(nearest, np.ones((2, 2, 1))).astype(int)).mean() < 2


def test_a_fixer_answering_at_another_size_is_named_with_the_round_and_views(street, tmp_path):
    from difix3d.recon.view_fixers import ViewFixer

    class HalfSize(ViewFixer):  # e.g. a replica that resizes to its model's size and does not resize back
        name = "half"

        def submit(self, renders, refs, cameras):
            return IdentityViewFixer().submit(renders[:, ::2, ::2], None, cameras)

    cfg = tiny_config(iterations=24, baseline=False, post_render=False)
    with pytest.raises(ValueError, match=r"fixer 'half' \(HalfSize\) answered round 0 \(views \['001_front_shift1m'.*"
                                         rf"shape \(4, {H // 2}, {W // 2}, 3\); the renders are \(4, {H}, {W}, 3\)"):
        reconstruct_scene(street, str(tmp_path), cfg, HalfSize(), progress=False, device="cpu")
