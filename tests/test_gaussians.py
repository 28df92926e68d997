"""GaussianSplat, its trainer, loss and PLY on tiny CPU scenes."""

import numpy as np
import pytest
import torch

from difix3d.errors import CheckpointError, InputError
from difix3d.imageio import to_uint8
from difix3d.recon.gaussians import GaussianConfig, GaussianSplat
from difix3d.recon.losses import photometric_loss
from difix3d.recon.ply import read_ply, write_ply
from difix3d.recon.rasterize import rasterize
from difix3d.recon.trainer import TrainerConfig, TrainingView, evaluate, load_checkpoint, load_views, train
from difix3d.scene.camera import Camera

W, H = 48, 32


def look_at(position, target=(0.0, 0.0, 0.0), name="") -> Camera:
    """An OpenCV camera at ``position`` looking at ``target`` with world -y up."""
    p, t = np.asarray(position, float), np.asarray(target, float)
    z = (t - p) / np.linalg.norm(t - p)
    x = np.cross([0.0, 1.0, 0.0], z)
    x /= np.linalg.norm(x)
    c2w = np.eye(4)
    c2w[:3, :3] = np.stack([x, np.cross(z, x), z], axis=1)
    c2w[:3, 3] = p
    K = np.array([[45.0, 0, W / 2], [0, 45.0, H / 2], [0, 0, 1]])
    return Camera.from_c2w(c2w, K, W, H, name=name)


class TinyScene:
    """A ring of cameras around coloured blobs, ground truth rendered from known Gaussians (Scene's interface)."""

    def __init__(self, n_views=12, n_gaussians=150, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.name = "tiny"
        angles = np.linspace(-0.9, 0.9, n_views)
        self.cameras = [look_at((4 * np.sin(a), -0.6, -4 * np.cos(a)), name=f"{i:03d}") for i, a in enumerate(angles)]
        self.image_uris = [f"mem://{c.name}.png" for c in self.cameras]
        self.splits = {"train": [i for i in range(n_views) if i % 4 != 2], "test": list(range(2, n_views, 4))}
        self.points = (torch.rand(n_gaussians, 3, generator=g) * 2 - 1).numpy() * [1.2, 0.8, 0.8]
        self.point_colors = (torch.rand(n_gaussians, 3, generator=g) * 255).to(torch.uint8).numpy()
        gt = dict(means=torch.tensor(self.points, dtype=torch.float32), quats=torch.randn(n_gaussians, 4, generator=g),
                  scales=torch.rand(n_gaussians, 3, generator=g) * 0.15 + 0.05, opacities=torch.full((n_gaussians,), .9),
                  colors=torch.tensor(self.point_colors).float() / 255)
        viewmats = torch.stack([c.torch_viewmat() for c in self.cameras])
        Ks = torch.stack([c.torch_K() for c in self.cameras])
        rgb, _, _ = rasterize(gt["means"], gt["quats"], gt["scales"], gt["opacities"], gt["colors"], viewmats, Ks, W,
                              H, backgrounds=torch.ones(n_views, 3) * 0.2)
        self._images = to_uint8(rgb.permute(0, 3, 1, 2))  # [V, H, W, 3]

    def load_image(self, i):
        return self._images[i]

    def subset(self, split):
        return [self.cameras[i] for i in self.splits[split]], [self.image_uris[i] for i in self.splits[split]]


@pytest.fixture(scope="module")
def scene():
    return TinyScene()


def _model(scene, seed=0, **kw) -> GaussianSplat:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    noisy = scene.points + rng.normal(0, 0.1, scene.points.shape)  # a rough start, as from SfM
    grey = np.full_like(scene.point_colors, 128)
    cfg = GaussianConfig.tiny(**{"iterations": 100, "background": (0.2, 0.2, 0.2), **kw})
    return GaussianSplat.from_points(noisy, grey, cfg, device="cpu", scene_scale=4.0)


@pytest.fixture(scope="module")
def segment(tmp_path_factory):
    """A tiny synthetic driving segment: 6 frames × 3 cameras at 32×48, lane-shift views, 1000 surface points."""
    from difix3d.scene.synthetic import make_segment

    return make_segment(str(tmp_path_factory.mktemp("seg") / "seg"), seed=0, frames=6, height=H, width=W,
                        num_points=1000)


def test_training_on_a_synthetic_segment_raises_held_out_psnr(segment):
    torch.manual_seed(0)
    model = GaussianSplat.from_scene(segment, GaussianConfig.tiny(100), device="cpu")
    assert model.num_primitives == 1000  # initialized from the segment's surface points
    held_out = {s: load_views(segment, s) for s in ("test", "shift_1m")}
    before = {s: evaluate(model, v) for s, v in held_out.items()}
    result = train(model, segment, TrainerConfig(iterations=100, eval_every=50), eval_views=held_out,
                   progress=False)
    for split in held_out:
        assert result.metrics[split]["psnr"] > before[split]["psnr"] + 2.0, (split, before, result.metrics)
        assert result.metrics[split]["ssim"] > before[split]["ssim"] + 0.05
    assert result.step == 100 and [(h["step"], h["split"]) for h in result.history] == [
        (50, "test"), (50, "shift_1m"), (100, "test"), (100, "shift_1m")]
    assert result.num_primitives == model.num_primitives > 1000 and result.iters_per_s > 0  # densified


def test_densification_grows_then_stops_and_opacity_reset_runs(scene):
    model = _model(scene, iterations=60, grow_grad2d=1e-6, refine_stop_iter=5000, reset_every=3000)
    # at a 60-step budget: refine after step 3 every 5 steps until 10, reset opacities every 6 steps
    assert (model.strategy.refine_every, model.strategy.refine_stop_iter, model.strategy.reset_every) == (5, 10, 6)
    views = load_views(scene, "train")
    n0 = model.num_primitives
    for _ in range(7):  # steps 0..6
        model.train_step([views[0].camera], views[0].image[None])
    assert model.num_primitives > n0  # grown at step 5 (every Gaussian passes a 1e-6 gradient threshold)
    assert torch.sigmoid(model.params["opacities"]).max() <= 0.01 + 1e-6  # reset at step 6 (to 2·prune_opa)
    assert model.optimizers["opacities"].state[model.params["opacities"]]["exp_avg"].abs().max() == 0
    while model.step < 10:
        model.train_step([views[0].camera], views[0].image[None])
    n = model.num_primitives
    model.train_step([views[0].camera], views[0].image[None])  # step 10 = refine_stop_iter: no refinement
    assert model.num_primitives == n and model.step == 11


def test_checkpoint_resume_reproduces_uninterrupted_training(scene, tmp_path):
    cfg = TrainerConfig(iterations=12, seed=3)
    straight = _model(scene, seed=1, iterations=24)
    train(straight, scene, cfg, progress=False, eval_views={})

    ckpt = str(tmp_path / "state" / "gaussians.ckpt")
    first = _model(scene, seed=1, iterations=24)
    train(first, scene, TrainerConfig(iterations=6, seed=3), checkpoint_uri=ckpt, progress=False, eval_views={})
    torch.manual_seed(123)  # a new process: different global RNG state, restored from the checkpoint
    resumed = _model(scene, seed=7, iterations=24)
    result = train(resumed, scene, cfg, checkpoint_uri=ckpt, progress=False, eval_views={})
    assert result.resumed_from == 6 and resumed.step == 12
    assert straight.num_primitives != 150  # densification ran (at step 5 and 10), and was resumed exactly
    for k in GaussianSplat.PARAM_NAMES:
        torch.testing.assert_close(resumed.params[k], straight.params[k], rtol=0, atol=0)
    assert resumed.means_scheduler.get_last_lr() == straight.means_scheduler.get_last_lr()
    torch.testing.assert_close(resumed.strategy_state["grad2d"], straight.strategy_state["grad2d"])


def test_state_dict_round_trip_and_corrupt_checkpoint(scene, tmp_path):
    model = _model(scene)
    views = load_views(scene, "train")
    model.train_step([views[0].camera], views[0].image[None])
    clone = GaussianSplat.from_state_dict(model.state_dict(), device="cpu")
    assert clone.step == 1 and clone.num_primitives == model.num_primitives
    torch.testing.assert_close(clone.render(scene.cameras[:2]).rgb, model.render(scene.cameras[:2]).rgb)
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.ckpt"):
        load_checkpoint(str(bad), model)


def test_view_weights_and_masks_shape_the_loss():
    torch.manual_seed(0)
    target = torch.rand(1, 3, 16, 16).repeat(2, 1, 1, 1)  # two identical views
    render = target.clone()
    render[:, :, :, :8] = 1 - render[:, :, :, :8]  # wrong on the left half only
    base, _ = photometric_loss(render, target)
    doubled, _ = photometric_loss(render, target, weights=torch.tensor([2.0, 2.0]))
    assert doubled.item() == pytest.approx(2 * base.item(), rel=1e-6)
    half, _ = photometric_loss(render, target, weights=torch.tensor([1.0, 0.0]))
    assert half.item() == pytest.approx(base.item() / 2, rel=1e-6)
    right = torch.zeros(2, 1, 16, 16)
    right[..., 8:] = 1  # keep only the correct half
    masked, terms = photometric_loss(render, target, masks=right)
    assert terms["l1"].max().item() == 0.0 and masked.item() < 0.2 * base.item()
    assert photometric_loss(target, target)[0].item() == pytest.approx(0.0, abs=1e-6)


def test_zero_weight_view_leaves_the_model_unchanged(scene):
    model = _model(scene, densify=False)
    views = load_views(scene, "train")
    before = {k: v.detach().clone() for k, v in model.params.items()}
    stats = model.train_step([views[0].camera], views[0].image[None], weights=torch.tensor([0.0]))
    assert stats["loss"] == 0.0 and model.step == 1
    for k, v in model.params.items():
        torch.testing.assert_close(v.detach(), before[k], rtol=0, atol=0)


def test_trainer_samples_pseudo_views_from_the_pool_with_weights_and_masks(scene):
    model = _model(scene, densify=False)
    real = load_views(scene, "train")[:2]
    pseudo = TrainingView(scene.cameras[2], torch.zeros(3, H, W), weight=0.3, mask=torch.zeros(1, H, W),
                          is_pseudo=True)
    seen = []

    def spy(step, stats, views):
        seen.append(stats["loss"])
        if step == 2:
            views.append(pseudo)  # the progressive loop adds fixed views while training runs

    picks = []

    def only_new(views, step, batch_size, generator):
        picks.append(len(views))
        return [len(views) - 1]

    train(model, None, TrainerConfig(iterations=4), views=list(real), progress=False, sample_fn=only_new,
          step_callback=spy)
    assert picks == [2, 2, 3, 3] and seen[2:] == [0.0, 0.0]  # the fully masked pseudo view contributes nothing


def test_ply_round_trip_is_exact_and_standard(scene, tmp_path):
    model = _model(scene, sh_degree=3)
    with torch.no_grad():
        model.params["shN"].normal_()
    uri = str(tmp_path / "g.ply")
    model.export(uri)
    data = open(uri, "rb").read()
    header = data[:data.index(b"end_header")].decode()
    props = [line.split()[-1] for line in header.splitlines() if line.startswith("property")]
    assert props[:9] == ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
    assert props[9:54] == [f"f_rest_{i}" for i in range(45)]
    assert props[54:] == ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    assert "format binary_little_endian 1.0" in header and f"element vertex {model.num_primitives}" in header
    back = read_ply(uri)
    for k in GaussianSplat.PARAM_NAMES:
        assert torch.equal(back[k], model.params[k].detach().reshape(back[k].shape)), k
    # f_rest is channel-major, as the Inria code writes it
    assert back["shN"][0, 1, 0] == model.params["shN"][0, 1, 0]
    loaded = GaussianSplat.from_ply(uri, device="cpu")
    assert loaded.config.sh_degree == 3 and loaded.num_primitives == model.num_primitives


def test_bad_inputs_raise_named_errors(scene, tmp_path):
    model = _model(scene)
    bad = tmp_path / "bad.ply"
    bad.write_bytes(b"ply\nformat ascii 1.0\nend_header\n")
    with pytest.raises(InputError, match="bad.ply.*binary_little_endian"):
        read_ply(str(bad))
    with pytest.raises(ValueError, match="expected"):
        model.train_step([scene.cameras[0]], torch.rand(1, 3, H + 1, W))
    odd = scene.cameras[1].scaled(0.5)
    with pytest.raises(ValueError, match="share a size"):
        model.render([scene.cameras[0], odd])
    with pytest.raises(ValueError, match="NaN"):
        GaussianSplat.from_points(np.full((4, 3), np.nan), np.zeros((4, 3), np.uint8), device="cpu")
    with pytest.raises(ValueError, match="weights"):
        photometric_loss(torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8), weights=torch.ones(3))


def test_from_scene_uses_points_or_random_points_in_view(scene):
    model = GaussianSplat.from_scene(scene, GaussianConfig.tiny(), device="cpu")
    assert model.num_primitives == len(scene.points)
    cams = [scene.cameras[i] for i in scene.splits["train"]]
    spread = np.linalg.norm(np.stack([c.position for c in cams]) - np.mean([c.position for c in cams], 0), axis=1)
    assert model.scene_scale == pytest.approx(1.1 * spread.max())

    class NoPoints(TinyScene):
        points = None

    bare = NoPoints.__new__(NoPoints)
    bare.__dict__.update({k: v for k, v in scene.__dict__.items() if k not in ("points", "point_colors")})
    model = GaussianSplat.from_scene(bare, GaussianConfig.tiny(init_num_random=500), device="cpu")
    assert model.num_primitives == 500
    out = model.render([scene.cameras[0]])
    assert out.rgb.shape == (1, 3, H, W) and out.alpha.mean() > 0.5  # the random points fill the view
    uv, z = scene.cameras[0].project(model.params["means"].detach().numpy())
    assert (z > 0).mean() > 0.5


@pytest.mark.gpu
def test_cuda_training_with_gsplat_densifies_and_matches_the_torch_renderer(segment):
    torch.manual_seed(0)
    model = GaussianSplat.from_scene(segment, GaussianConfig.tiny(100), device="cuda")
    held_out = {"test": load_views(segment, "test")}
    before = evaluate(model, held_out["test"])
    result = train(model, segment, TrainerConfig(iterations=100), eval_views=held_out, progress=False)
    assert result.metrics["test"]["psnr"] > before["psnr"] + 2.0 and model.num_primitives > 1000
    cams = segment.subset("test")[0][:3]
    ref = model.render(cams).rgb
    model.config.backend = "torch"
    ours = model.render(cams).rgb
    assert (ours - ref).abs().max() < 1e-2 and (ours - ref).abs().mean() < 1e-3


def test_lens_distortion_is_reported_with_its_size_in_pixels(scene, caplog):
    import copy

    from difix3d.recon.gaussians import _corner_distortion_px

    def with_dist(cam, k1):
        c = copy.copy(cam)
        c.dist = np.array([k1, 0, 0, 0, 0.0])
        return c

    cam = scene.cameras[0]
    corner = np.hypot(cam.K[0, 2], cam.K[1, 2])  # pixels from the principal point to the (0, 0) corner
    r2 = (cam.K[0, 2] / cam.K[0, 0]) ** 2 + (cam.K[1, 2] / cam.K[1, 1]) ** 2
    assert _corner_distortion_px(with_dist(cam, -0.2)) >= 0.2 * r2 * corner * 0.99  # k1 r^2 of the radius, at least
    assert _corner_distortion_px(with_dist(cam, 0.0)) == 0.0
    distorted = copy.copy(scene)
    distorted.cameras = [with_dist(c, -0.2) for c in scene.cameras]
    with caplog.at_level("WARNING", logger="difix3d.recon.gaussians"):
        GaussianSplat.from_scene(distorted, GaussianConfig.tiny(), "cpu")
    assert "lens distortion moves the image corners by up to" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="difix3d.recon.gaussians"):
        GaussianSplat.from_scene(scene, GaussianConfig.tiny(), "cpu")
    assert "lens distortion" not in caplog.text


def test_a_checkpoint_of_other_gaussian_settings_is_refused_naming_them(scene, tmp_path):
    ckpt = str(tmp_path / "g.ckpt")
    train(_model(scene, iterations=24), scene, TrainerConfig(iterations=3, seed=0), checkpoint_uri=ckpt,
          progress=False, eval_views={})
    with pytest.raises(CheckpointError, match=r"g.ckpt: .*other Gaussian settings \(iterations 24 -> 3000"):
        load_checkpoint(ckpt, _model(scene, iterations=3000))
    load_checkpoint(ckpt, _model(scene, iterations=24, render_chunk=2))  # how it renders is not what it trains


def test_a_model_built_from_a_live_state_shares_nothing_with_it(scene):
    model = _model(scene)
    views = load_views(scene, "train")
    model.train_step([views[0].camera], views[0].image[None])
    clone = GaussianSplat.from_state_dict(model.state_dict(), device="cpu")
    before = {k: {n: v.clone() for n, v in s.items()} for k, s in clone.optimizers["means"].state.items()}
    model.train_step([views[1].camera], views[1].image[None])  # the source trains on
    for k, s in clone.optimizers["means"].state.items():
        for n, v in s.items():
            torch.testing.assert_close(v, before[k][n], rtol=0, atol=0)


def test_point_colours_and_training_images_are_checked(scene, tmp_path):
    points = np.random.default_rng(0).normal(size=(8, 3))
    as_int64 = GaussianSplat.from_points(points, np.full((8, 3), 255, np.int64), GaussianConfig(iterations=10))
    as_uint8 = GaussianSplat.from_points(points, np.full((8, 3), 255, np.uint8), GaussianConfig(iterations=10))
    torch.testing.assert_close(as_int64.params["sh0"], as_uint8.params["sh0"])  # 0..255 whatever the integer type
    with pytest.raises(ValueError, match=r"colours must be \[N, 3\] \(RGB\), got shape \[8, 4\]"):
        GaussianSplat.from_points(points, np.zeros((8, 4), np.uint8))
    views = load_views(scene, "train")
    with pytest.raises(ValueError, match="expected float values in"):
        _model(scene).train_step([views[0].camera], (views[0].image[None] * 255).to(torch.uint8))
    empty = {k: v[:0] for k, v in _model(scene).params.items()}
    write_ply(str(tmp_path / "empty.ply"), empty)
    assert read_ply(str(tmp_path / "empty.ply"))["shN"].shape == (0, empty["shN"].shape[1], 3)


def test_a_model_read_from_a_ply_renders_with_all_its_sh_bands(scene, tmp_path):
    model = _model(scene, sh_degree=1)
    with torch.no_grad():
        model.params["shN"].normal_(0, 0.5, generator=torch.Generator().manual_seed(0))  # view-dependent colour
    model._step = 300  # trained: its degree-1 band is on
    assert model.active_sh_degree == 1
    model.export(str(tmp_path / "m.ply"))
    loaded = GaussianSplat.from_ply(str(tmp_path / "m.ply"), model.config, device="cpu", scene_scale=4.0)
    assert loaded.step == 0 and loaded.active_sh_degree == 1
    torch.testing.assert_close(loaded.render(scene.cameras[:3]).rgb, model.render(scene.cameras[:3]).rgb)
    again = GaussianSplat.from_state_dict(loaded.state_dict())  # and it stays so across a checkpoint
    assert again.active_sh_degree == 1


def test_an_integer_background_is_a_float_one_and_bad_ones_are_named():
    assert GaussianConfig(background=[1, 1, 1]).background == (1.0, 1.0, 1.0)  # as --set gives it, from JSON
    for bad in ([1, 1], (0.0, 2.0, 0.0), "white"):
        with pytest.raises(ValueError, match="background: expected 3 numbers in"):
            GaussianConfig(background=bad)


def test_a_bad_view_stops_training_instead_of_poisoning_the_model(scene):
    from difix3d.recon.trainer import _stack

    views = load_views(scene, "train")
    with pytest.raises(ValueError, match="pose or intrinsics hold NaN"):
        views[0].camera.with_pose(np.full((4, 4), np.nan))
    with pytest.raises(ValueError, match="size 0x32 has no pixels"):
        Camera(viewmat=np.eye(4), K=np.eye(3), width=0, height=32)
    model = _model(scene)
    cams, images, weights, masks = _stack([views[0]])
    images = images.clone()
    images[0, 0, 3, 4] = float("nan")
    with pytest.raises(ValueError, match=r"step 0: non-finite loss on views \['000'\]"):
        model.train_step(cams, images, weights, masks)


def test_a_gaussian_in_the_camera_plane_gets_a_zero_gradient_not_nan():
    cam = look_at((0.0, 0.0, -4.0))
    means = torch.tensor([[0.0, 0.0, 0.0], [0.3, 0.0, -4.0]], requires_grad=True)  # the second at the camera's z
    quats = torch.tensor([[1.0, 0, 0, 0]] * 2)
    scales = torch.full((2, 3), 0.2)
    rgb, _, _ = rasterize(means, quats, scales, torch.full((2,), 0.9), torch.ones(2, 3), cam.torch_viewmat()[None],
                          cam.torch_K()[None], W, H, backend="torch")
    rgb.sum().backward()
    assert torch.isfinite(means.grad).all()
    assert means.grad[1].abs().max() == 0 and means.grad[0].abs().max() > 0


def test_training_stops_when_densification_prunes_every_gaussian(scene, tmp_path):
    from difix3d.recon.trainer import _stack

    model = _model(scene, iterations=100, refine_start_iter=3000, refine_every=3000, densify=True)
    with torch.no_grad():
        model.params["opacities"].fill_(-10.0)  # all under prune_opa: the first refine prunes them all
    views = load_views(scene, "train")
    with pytest.raises(ValueError, match="densification pruned every Gaussian"):
        for _ in range(25):  # the first refine after refine_start (step 10 of 100), every 10 steps
            model.train_step(*_stack([views[0]]))
    write_ply(str(tmp_path / "empty.ply"), {k: v[:0] for k, v in model.params.items()})
    with pytest.raises(InputError, match="holds no Gaussians"):
        GaussianSplat.from_ply(str(tmp_path / "empty.ply"), model.config, device="cpu")


def test_trainer_refuses_a_batch_size_the_learning_rates_are_not_scaled_for(scene):
    model = _model(scene)  # scaled for one view a step
    with pytest.raises(ValueError, match="scaled for batch_size 1"):
        train(model, scene=scene, config=TrainerConfig(iterations=1, batch_size=4), progress=False)
