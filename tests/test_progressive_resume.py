"""What an interrupted progressive run leaves behind, and what a re-run into the same output folder makes of it:
damaged state, other fixers, colliding target names, an interrupted baseline. Tiny street of test_progressive."""

from __future__ import annotations

import pytest
import torch

from difix3d import storage
from difix3d.errors import CheckpointError
from difix3d.recon.outputs import SceneOutputs
from difix3d.recon.progressive import ProgressiveLoop, reconstruct_scene
from difix3d.recon.view_fixers import OracleViewFixer
from test_progressive import RecordingFixer, make_street, tiny_config


@pytest.fixture(scope="module")
def street():
    torch.manual_seed(0)
    return make_street()


def _interrupted(street, out: str, cfg, fail_at: int = 2) -> None:
    """A run stopped by its fixer's ``fail_at``-th request, its round state on storage."""
    with pytest.raises(RuntimeError, match="simulated interruption"):
        reconstruct_scene(street, out, cfg, RecordingFixer(OracleViewFixer(street.render_gt), fail_at=fail_at),
                          progress=False, device="cpu")


def test_a_damaged_round_state_names_the_file_and_says_how_to_restart(street, tmp_path):
    cfg = tiny_config(iterations=24, baseline=False, post_render=False, save_every_round=True)
    out = str(tmp_path)
    _interrupted(street, out, cfg)
    state = SceneOutputs(out).state(ProgressiveLoop.STATE_FILE)
    data = storage.read_bytes(state)
    storage.write_bytes(state, data[: len(data) // 2])  # a partial copy of the output folder
    with pytest.raises(CheckpointError, match=r"progressive\.pt: cannot resume from it .*delete it to restart"):
        reconstruct_scene(street, out, cfg, OracleViewFixer(street.render_gt), progress=False, device="cpu")


def test_targets_sharing_a_name_are_refused_before_anything_is_written(street, tmp_path):
    # pseudo views are saved and resumed by name: two targets named alike would train a resumed run on one image twice
    from difix3d.scene.poses import interpolate_cameras

    a, b = (street.cameras[i] for i in street.splits["shift_2m"])
    trajectory = [interpolate_cameras(a, b, t) for t in (0.0, 0.5, 1.0)]  # interpolated cameras keep a's name
    cfg = tiny_config(iterations=24, baseline=False, post_render=False)
    with pytest.raises(ValueError, match=rf"targets share the names \['{a.name}'\].*own name"):
        reconstruct_scene(street, str(tmp_path / "out"), cfg, OracleViewFixer(street.render_gt), progress=False,
                          device="cpu", targets=trajectory)
    assert not (tmp_path / "out").exists()


def test_an_eval_split_with_two_cameras_of_one_name_names_the_split(street, tmp_path):
    import dataclasses

    from difix3d.errors import InputError

    i, j = street.splits["shift_1m"]
    cameras = list(street.cameras)
    cameras[j] = dataclasses.replace(cameras[j], name=cameras[i].name)
    twins = dataclasses.replace(street, cameras=cameras)
    with pytest.raises(InputError, match=rf"split 'shift_1m' has several cameras named \['{cameras[i].name}'\]"):
        reconstruct_scene(twins, str(tmp_path), tiny_config(iterations=24), OracleViewFixer(street.render_gt),
                          progress=False, device="cpu")


def test_a_resume_under_another_fixer_is_refused_naming_both(street, tmp_path):
    from difix3d.errors import InputError
    from difix3d.recon.view_fixers import IdentityViewFixer

    cfg = tiny_config(iterations=24, baseline=False, post_render=False, save_every_round=True)
    out = str(tmp_path)
    with pytest.raises(RuntimeError, match="simulated interruption"):  # rounds 0-2 fixed by the identity fixer
        reconstruct_scene(street, out, cfg, RecordingFixer(IdentityViewFixer(), fail_at=3), progress=False,
                          device="cpu")
    assert storage.read_json(str(tmp_path / "config.json"))["fixer"] == {"kind": "IdentityViewFixer",
                                                                          "checkpoint": None}
    with pytest.raises(InputError, match=r"config\.json: .* other fixer \(fixer\.kind 'IdentityViewFixer' -> "
                                         r"'OracleViewFixer'\)"):
        reconstruct_scene(street, out, cfg, OracleViewFixer(street.render_gt), progress=False, device="cpu")
    # an output written before config.json recorded the fixer resumes: there is nothing to compare with
    saved = storage.read_json(str(tmp_path / "config.json"))
    del saved["fixer"]
    storage.write_json(str(tmp_path / "config.json"), saved)
    result = reconstruct_scene(street, out, cfg, IdentityViewFixer(), progress=False, device="cpu")
    assert result.fixer == {"kind": "IdentityViewFixer", "checkpoint": None}
    assert storage.read_json(str(tmp_path / "metrics.json"))["fixer"] == result.fixer


def test_a_client_fixer_records_its_checkpoint():
    from difix3d.recon.view_fixers import ClientViewFixer, as_view_fixer

    class Client:
        def submit(self, images, refs=None):
            raise NotImplementedError

    assert as_view_fixer(Client()).describe() == {"kind": "ClientViewFixer", "checkpoint": None}
    assert ClientViewFixer(Client(), checkpoint="s3://b/difix").describe()["checkpoint"] == "s3://b/difix"


def test_an_interrupted_baseline_resumes_from_its_last_saved_state(street, tmp_path, monkeypatch):
    from difix3d.recon.gaussians import GaussianSplat
    from difix3d.recon.progressive import BASELINE_STATE

    cfg = tiny_config(iterations=24, post_render=False, save_every_round=True, baseline_save_every=6)
    ref = reconstruct_scene(street, str(tmp_path / "ref"), cfg, OracleViewFixer(street.render_gt), progress=False,
                            device="cpu")
    steps = {"n": 0, "fail_at": 15}
    real_step = GaussianSplat.train_step

    def counting_step(self, *args, **kwargs):
        if steps["n"] == steps["fail_at"]:
            raise RuntimeError("simulated interruption")
        steps["n"] += 1
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(GaussianSplat, "train_step", counting_step)
    out = SceneOutputs(str(tmp_path / "resumed"))
    with pytest.raises(RuntimeError, match="simulated interruption"):  # 15 of the baseline's 24 steps taken
        reconstruct_scene(street, out.root, cfg, OracleViewFixer(street.render_gt), progress=False, device="cpu")
    assert torch.load(out.state(BASELINE_STATE), weights_only=False)["iteration"] == 12
    assert not storage.exists(out.state("baseline.json"))

    steps.update(n=0, fail_at=None)
    resumed = reconstruct_scene(street, out.root, cfg, OracleViewFixer(street.render_gt), progress=False,
                                device="cpu")
    assert steps["n"] == (24 - 12) + 24  # the baseline from its step 12, then the progressive run
    for split, methods in ref.metrics.items():  # the same model as a baseline that ran through
        assert resumed.metrics[split]["baseline"]["psnr"] == pytest.approx(methods["baseline"]["psnr"], abs=1e-3)
    assert storage.exists(out.state("baseline.json")) and not storage.exists(out.state(BASELINE_STATE))
    assert resumed.timings["baseline_save_s"] > 0
