"""What an interrupted progressive run leaves behind, and what a re-run into the same output folder makes of it:
damaged state, other fixers, colliding target names, an interrupted baseline. Tiny street of test_progressive."""

from __future__ import annotations

import pytest
import torch

from difix3d import storage
from difix3d.errors import CheckpointError
from difix3d.fixer.runner import FixerRunner
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


def test_a_checkpoint_recorded_as_unknown_is_not_held_against_a_resume(street, tmp_path):
    """Clients that could not tell their checkpoint were recorded with None; a resume through one that can is the
    same run as far as anything recorded says, while a known checkpoint that changes is refused."""
    from difix3d.errors import InputError
    from difix3d.recon.view_fixers import IdentityViewFixer

    class Told(IdentityViewFixer):
        def __init__(self, checkpoint):
            self.checkpoint = checkpoint

        def describe(self):
            return {"kind": "ClientViewFixer", "checkpoint": self.checkpoint}

    cfg = tiny_config(iterations=16, baseline=False, post_render=False)
    out = str(tmp_path)
    reconstruct_scene(street, out, cfg, Told(None), progress=False, device="cpu")
    reconstruct_scene(street, out, cfg, Told("/ckpt/a"), progress=False, device="cpu")
    with pytest.raises(InputError, match=r"fixer\.checkpoint '/ckpt/a' -> '/ckpt/b'"):
        reconstruct_scene(street, out, cfg, Told("/ckpt/b"), progress=False, device="cpu")


def test_a_client_fixer_records_its_checkpoint_in_one_spelling(tmp_path, monkeypatch):
    from difix3d.recon.view_fixers import ClientViewFixer, as_view_fixer

    class Client:
        def __init__(self, checkpoint=None):
            if checkpoint is not None:
                self.checkpoint = checkpoint

        def submit(self, images, refs=None):
            raise NotImplementedError

    assert as_view_fixer(Client()).describe() == {"kind": "ClientViewFixer", "checkpoint": None}  # not known
    assert ClientViewFixer(Client(), checkpoint="s3://b/difix/").describe()["checkpoint"] == "s3://b/difix"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt" / "a").mkdir(parents=True)  # an existing folder: "ckpt/a" is a path, not a hub id
    spellings = ["ckpt/a", "./ckpt/a/", str(tmp_path / "ckpt" / "a"), f"file://{tmp_path}/ckpt/a"]
    assert {as_view_fixer(Client(c)).describe()["checkpoint"] for c in spellings} == {str(tmp_path / "ckpt" / "a")}
    assert as_view_fixer(Client("nvidia/difix")).describe()["checkpoint"] == "nvidia/difix"  # a hub id, not a path


def test_a_local_client_records_the_checkpoint_its_runner_loaded(tmp_path):
    from difix3d.fixer.client import LocalFixerClient
    from difix3d.recon.view_fixers import as_view_fixer

    a = _tiny_checkpoint(tmp_path / "a", seed=1)
    with LocalFixerClient(FixerRunner.from_checkpoint(a, device="cpu")) as client:
        assert as_view_fixer(client).describe() == {"kind": "ClientViewFixer", "checkpoint": a}


def test_a_resume_under_another_checkpoint_is_refused_naming_both(street, tmp_path):
    import re

    from difix3d.errors import InputError
    from difix3d.fixer.client import LocalFixerClient
    from difix3d.recon.view_fixers import ClientViewFixer

    a, b = (_tiny_checkpoint(tmp_path / name, seed) for name, seed in (("a", 1), ("b", 2)))
    cfg = tiny_config(iterations=24, baseline=False, post_render=False, save_every_round=True)
    out = str(tmp_path / "out")
    with LocalFixerClient(FixerRunner.from_checkpoint(a, device="cpu")) as client:
        with pytest.raises(RuntimeError, match="simulated interruption"):  # a run with --checkpoint a, interrupted
            reconstruct_scene(street, out, cfg, RecordingFixer(ClientViewFixer(client), fail_at=2), progress=False,
                              device="cpu")
    assert storage.read_json(str(tmp_path / "out" / "config.json"))["fixer"]["checkpoint"] == a
    with LocalFixerClient(FixerRunner.from_checkpoint(b, device="cpu")) as client:  # re-run with --checkpoint b
        with pytest.raises(InputError, match=re.escape(f"fixer.checkpoint {a!r} -> {b!r}")):
            reconstruct_scene(street, out, cfg, client, progress=False, device="cpu")


def test_the_bundled_fixer_is_recorded_alike_however_it_is_reached(street, tmp_path, monkeypatch):
    # a run interrupted while a pool served the bundled fixer resumes without the pool, and the other way round
    import os

    import difix3d.recon.view_fixers as view_fixers
    from difix3d.fixer.bundled import default_checkpoint
    from difix3d.fixer.client import LocalFixerClient
    from difix3d.pool.client import PoolClient
    from difix3d.recon.view_fixers import ClientViewFixer, as_view_fixer

    monkeypatch.setattr(view_fixers, "_running_pool", lambda: None)
    bundled = {"kind": "ClientViewFixer", "checkpoint": "bundled"}
    assert as_view_fixer(None).describe() == bundled
    assert as_view_fixer(PoolClient("some-pool", checkpoint=default_checkpoint())).describe() == bundled
    relative = os.path.relpath(default_checkpoint()) + "/"  # another spelling of its path
    with LocalFixerClient(FixerRunner.from_checkpoint(relative, device="cpu")) as client:
        assert as_view_fixer(client).describe() == bundled
        cfg = tiny_config(iterations=24, baseline=False, post_render=False, save_every_round=True)
        with pytest.raises(RuntimeError, match="simulated interruption"):
            reconstruct_scene(street, str(tmp_path), cfg, RecordingFixer(ClientViewFixer(client), fail_at=2),
                              progress=False, device="cpu")
    result = reconstruct_scene(street, str(tmp_path), cfg, None, progress=False, device="cpu")
    assert result.fixer == bundled


def _tiny_checkpoint(path, seed: int) -> str:
    """A random-init tiny fixer saved at ``path`` (our format); its absolute path."""
    from difix3d.fixer.checkpoint import save_checkpoint
    from difix3d.fixer.model import build_model

    save_checkpoint(build_model("tiny", seed=seed), str(path))
    return str(path)


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
