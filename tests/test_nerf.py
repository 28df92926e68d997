"""NerfactoScene (nerfstudio's Nerfacto behind Representation) on a tiny synthetic driving segment, on CPU.

Skipped as a whole when nerfstudio (the optional extra difix3d[nerf]) is not installed."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

pytest.importorskip("nerfstudio.models.nerfacto",
                    reason="the NeRF backend needs the optional extra difix3d[nerf] (nerfstudio)")

from difix3d.errors import CheckpointError  # noqa: E402
from difix3d.recon.factory import make_representation  # noqa: E402
from difix3d.recon.nerf import OPENCV_TO_OPENGL, NerfactoScene, NerfConfig  # noqa: E402
from difix3d.recon.progressive import ProgressiveConfig, reconstruct_scene  # noqa: E402
from difix3d.recon.schedule import ProgressiveSchedule, PseudoViewSampling  # noqa: E402
from difix3d.recon.trainer import TrainerConfig, evaluate, load_views, train  # noqa: E402
from difix3d.recon.view_fixers import OracleViewFixer  # noqa: E402

H, W = 24, 32


@pytest.fixture(scope="module")
def segment(tmp_path_factory):
    """6 frames × 3 cameras at 24×32: 9 train, 9 test, 6 views per lane shift."""
    from difix3d.scene.synthetic import make_segment

    return make_segment(str(tmp_path_factory.mktemp("seg") / "seg"), seed=0, frames=6, height=H, width=W,
                        num_points=100)


@pytest.fixture(scope="module")
def trained(segment):
    """A tiny Nerfacto trained 300 ray-batches through the shared trainer, with the held-out PSNR before/after."""
    model = make_representation("nerfacto", segment, NerfConfig.tiny(300), device="cpu")
    held_out = {s: load_views(segment, s) for s in ("test", "shift_1m")}
    before = {s: evaluate(model, v) for s, v in held_out.items()}
    result = train(model, segment, TrainerConfig(iterations=300, eval_every=150), eval_views=held_out,
                   progress=False)
    return model, before, result, held_out


def test_training_raises_held_out_psnr(trained):
    model, before, result, _ = trained
    assert result.metrics["test"]["psnr"] > before["test"]["psnr"] + 5.0, (before, result.metrics)
    assert result.metrics["shift_1m"]["psnr"] > before["shift_1m"]["psnr"] + 3.0, (before, result.metrics)
    assert result.metrics["test"]["ssim"] > before["test"]["ssim"] + 0.2
    assert result.step == model.step == 300
    assert [(h["step"], h["split"]) for h in result.history] == [
        (150, "test"), (150, "shift_1m"), (300, "test"), (300, "shift_1m")]
    assert result.last_stats["num_rays"] == 256 and np.isfinite(result.last_stats["loss"])
    assert result.num_primitives == model.num_primitives > 10_000  # hash tables + MLPs of the tiny preset


def test_render_shapes_alpha_and_metric_depth(trained, segment):
    model, _, _, held_out = trained
    cams = [v.camera for v in held_out["test"][:2]]
    out = model.render(cams)
    assert out.rgb.shape == (2, 3, H, W) and out.alpha.shape == (2, 1, H, W) and out.depth.shape == (2, 1, H, W)
    assert 0 <= float(out.rgb.min()) and float(out.rgb.max()) <= 1
    assert float(out.alpha.mean()) > 0.9  # the street is opaque everywhere it was seen
    # depth comes back in scene units (camera z): the street's surfaces lie metres, not normalized units, away
    assert 1.0 < float(out.depth.median()) < 200.0
    assert torch.equal(model.render(cams).rgb, out.rgb)  # deterministic at eval, no state change


def test_cameras_follow_opencv_through_nerfstudio(trained, segment):
    """Rays start at the camera centre and pass through the pixel the OpenCV camera projects a point to."""
    model, _, _, _ = trained
    cam = segment.cameras[segment.splits["test"][0]]
    point = cam.position + cam.rotation_c2w @ np.array([0.7, -0.4, 5.0])  # 5 m in front, right and up
    uv, _ = cam.project(point[None])
    u, v = uv[0]
    bundle = model.ns_cameras([cam]).generate_rays(camera_indices=torch.zeros(1, 1, dtype=torch.long),
                                                   coords=torch.tensor([[v, u]], dtype=torch.float32))
    origin = bundle.origins[0].double().numpy() / model.scale + model.center
    direction = bundle.directions[0].double().numpy()
    expected = (point - cam.position) / np.linalg.norm(point - cam.position)
    np.testing.assert_allclose(origin, cam.position, atol=1e-4)
    np.testing.assert_allclose(direction, expected, atol=1e-4)
    assert np.allclose(OPENCV_TO_OPENGL @ OPENCV_TO_OPENGL, np.eye(4))


def test_state_round_trip_reproduces_renders_and_training(trained, segment, tmp_path):
    model, _, _, held_out = trained
    cams = [v.camera for v in held_out["shift_1m"][:2]]
    copy = NerfactoScene.from_state_dict(model.state_dict(), device="cpu")
    assert copy.step == model.step and copy.num_primitives == model.num_primitives
    torch.testing.assert_close(copy.render(cams).rgb, model.render(cams).rgb, rtol=0, atol=0)

    view = load_views(segment, "train")[0]  # one more step on each from the same RNG state: same parameters
    states = []
    for m in (copy, NerfactoScene.from_state_dict(model.state_dict(), device="cpu")):
        torch.manual_seed(5)
        m.train_step([view.camera], view.image[None])
        states.append(m.state_dict())
    for k, v in states[0]["model"].items():
        torch.testing.assert_close(states[1]["model"][k], v, rtol=0, atol=0, msg=k)
    assert states[0]["step"] == model.step + 1
    assert states[0]["optimizers"]["fields"]["state"]  # Adam moments travel with the state

    uri = str(tmp_path / "nerf" / "nerfacto.pt")
    model.export(uri)
    loaded = NerfactoScene.load(uri, device="cpu")
    torch.testing.assert_close(loaded.render(cams).rgb, model.render(cams).rgb, rtol=0, atol=0)
    (tmp_path / "bad.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="bad.pt"):
        NerfactoScene.load(str(tmp_path / "bad.pt"))


def test_weights_and_masks_choose_the_rays(segment):
    model = make_representation("nerfacto", segment, NerfConfig.tiny(10, rays_per_batch=512), device="cpu")
    views = load_views(segment, "train")[:2]
    images = torch.stack([v.image for v in views])  # [2, 3, H, W]
    masks = torch.zeros(2, 1, H, W)
    masks[0, :, :, : W // 2] = 1  # view 0: left half only; view 1: fully masked
    vi, yx, w = model.sample_rays(images, torch.tensor([0.5, 1.0]), masks, 512)
    assert (vi == 0).all() and (yx[:, 1] < W // 2).all() and torch.all(w == 0.5)
    vi, _, w = model.sample_rays(images, torch.tensor([0.0, 1.0]), None, 512)  # weight 0: no rays from view 0
    assert (vi == 1).all() and torch.all(w == 1.0)

    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    stats = model.train_step([v.camera for v in views], images, torch.tensor([1.0, 1.0]), torch.zeros(2, 1, H, W))
    assert stats["loss"] == 0.0 and stats["num_rays"] == 0 and model.step == 1  # counted, nothing learned
    assert all(torch.equal(before[k], v) for k, v in model.model.state_dict().items())
    stats = model.train_step([v.camera for v in views], images, torch.tensor([1.0, 0.5]), masks)
    assert stats["num_rays"] == 512 and stats["loss"] > 0 and model.step == 2
    with pytest.raises(ValueError, match="expected"):
        model.train_step([views[0].camera], images)


def test_progressive_loop_with_nerfacto_and_oracle_improves_lane_shifts(segment, tmp_path):
    """ProgressiveConfig.representation picks the backend; the loop is the same as for 3DGS."""
    from difix3d.scene.synthetic import load_street_scene

    street = load_street_scene(segment.root)
    cfg = dataclasses.replace(
        ProgressiveConfig.tiny(), representation="nerfacto", nerf=NerfConfig.tiny(240),
        trainer=TrainerConfig.tiny(iterations=240),
        schedule=ProgressiveSchedule(pretrain_iters=60, round_every=30, step_size=1.0),
        sampling=PseudoViewSampling(probability=0.5, rounds="all"),
        target_splits=("shift_1m", "shift_2m"), eval_splits=("test", "shift_1m", "shift_2m"), lpips=False)
    result = reconstruct_scene(segment, str(tmp_path / "out"), cfg, OracleViewFixer(street.render), progress=False,
                               device="cpu")
    for split in ("shift_1m", "shift_2m"):
        m = result.metrics[split]
        assert m["difix3d"]["psnr"] > m["baseline"]["psnr"] + 1.0, (split, m)
        assert m["difix3d_plus"]["psnr"] > 60  # the oracle's post-render is the ground truth
    assert result.num_rounds > 0 and result.frames_fixed > 0
    assert (tmp_path / "out" / "nerfacto.pt").exists() and not (tmp_path / "out" / "gaussians.ply").exists()


@pytest.mark.gpu
def test_cuda_training_uses_the_fast_hash_grid_when_present(segment):
    try:
        import tinycudann  # noqa: F401
        expected = "tcnn"
    except ImportError:
        expected = "torch"
    model = make_representation("nerfacto", segment, NerfConfig.tiny(200, rays_per_batch=1024), device="cuda")
    assert model.implementation == expected and next(model.model.parameters()).is_cuda
    held_out = load_views(segment, "test")
    before = evaluate(model, held_out)["psnr"]
    train(model, segment, TrainerConfig(iterations=200), eval_views={}, progress=False)
    out = model.render([v.camera for v in held_out[:2]])
    assert out.rgb.is_cuda and out.rgb.shape == (2, 3, H, W)
    assert evaluate(model, held_out)["psnr"] > before + 5.0


def test_a_tiny_cuda_nn_model_is_refused_clearly_where_tinycudann_cannot_run(segment, tmp_path):
    model = make_representation("nerfacto", segment, NerfConfig.tiny(2), device="cpu")
    uri = str(tmp_path / "nerfacto.pt")
    model.export(uri)
    assert NerfactoScene.load(uri).implementation == "torch"
    state = torch.load(uri, weights_only=False)
    state.pop("implementation")  # a file from before the implementation was recorded: told by tcnn's names
    state["model"] = {k.replace("hash_table", "tcnn_encoding.params"): v for k, v in state["model"].items()}
    torch.save(state, uri)
    with pytest.raises(CheckpointError, match=r"nerfacto\.pt.*trained with tiny-cuda-nn.*tinycudann imports"):
        NerfactoScene.load(uri, device="cpu")
    with pytest.raises(ValueError, match="trained with tiny-cuda-nn"):
        model.load_state_dict(state)


def test_appearance_embeddings_are_refused_not_silently_inert():
    with pytest.raises(ValueError, match="use_appearance_embedding: not supported"):
        NerfConfig.tiny(use_appearance_embedding=True)
    with pytest.raises(ValueError, match="implementation"):
        NerfConfig(implementation="cuda")


@pytest.mark.parametrize("field,value,message", [
    ("camera_optimizer", "SO3xR3", "camera_optimizer: only 'off'"),
    ("background_color", "bogus", "background_color: expected last_sample"),
    ("rays_per_batch", 0, "rays_per_batch must be > 0"),
    ("render_chunk", 0, "render_chunk must be > 0"),
    ("scene_radius", -1.0, "scene_radius must be > 0"),
    ("near_plane", 2000.0, "near_plane 2000.0 must be below far_plane"),
])
def test_nerf_settings_that_cannot_work_are_named(field, value, message):
    with pytest.raises(ValueError, match=message):
        NerfConfig.tiny(**{field: value})


def test_tiny_cuda_nn_asked_for_where_it_cannot_run_is_refused():
    cams = [OracleCam.at(x) for x in (0.0, 1.0)]
    with pytest.raises(ValueError, match="implementation 'tcnn' needs a CUDA device"):
        NerfactoScene.from_cameras(cams, NerfConfig.tiny(implementation="tcnn"), device="cpu")


def test_the_near_plane_stays_near_the_camera_on_long_segments():
    short = NerfactoScene.from_cameras([OracleCam.at(x) for x in (0.0, 4.0)], NerfConfig.tiny(), device="cpu")
    assert short.model.config.near_plane == pytest.approx(0.05)  # nerfstudio's, when it is under 0.5 world units
    long = NerfactoScene.from_cameras([OracleCam.at(x) for x in (0.0, 400.0)], NerfConfig.tiny(), device="cpu")
    assert long.model.config.near_plane / long.scale == pytest.approx(0.5)  # not 0.05 normalized = 10 m ahead


def test_nerf_train_step_guards_its_inputs_and_its_schedule(segment):
    model = make_representation("nerfacto", segment, NerfConfig.tiny(10, lr_decay_steps=10), device="cpu")
    views = load_views(segment, "train")[:1]
    cams, images = [views[0].camera], views[0].image[None]
    with pytest.raises(ValueError, match="expected float values in"):
        model.train_step(cams, (images * 255).to(torch.uint8))
    lr = model.optimizers["fields"].param_groups[0]["lr"]
    for _ in range(3):  # every pixel masked: nothing to learn, but the step and its lr schedule advance together
        model.train_step(cams, images, masks=torch.zeros(1, 1, *images.shape[-2:]))
    assert model.step == 3 and model.optimizers["fields"].param_groups[0]["lr"] < lr
    bad = images.clone()
    bad[0, :, :, :] = float("nan")
    with pytest.raises(ValueError, match="non-finite loss on views"):
        model.train_step(cams, bad)


def test_the_oracle_fixer_refuses_float_ground_truth():
    cam = OracleCam.at(0.0)
    fixer = OracleViewFixer(lambda c: np.full((c.height, c.width, 3), 0.5, np.float32))
    with pytest.raises(ValueError, match="is float32, expected uint8"):
        fixer.submit(np.zeros((1, cam.height, cam.width, 3), np.uint8), None, [cam]).result()


class OracleCam:
    @staticmethod
    def at(x: float):
        from difix3d.scene.camera import Camera

        c2w = np.eye(4)
        c2w[0, 3] = x
        return Camera.from_c2w(c2w, np.array([[20.0, 0, 16], [0, 20.0, 12], [0, 0, 1]]), 32, 24, name=f"x{x:g}")
