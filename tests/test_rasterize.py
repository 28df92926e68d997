"""The torch rasterizer against hand-computed renders, finite differences, and (on CUDA) gsplat's kernels."""

import math

import pytest
import torch
from gsplat.strategy import DefaultStrategy

from difix3d.recon.rasterize import rasterize
from difix3d.recon.rasterize_torch import ALPHA_THRESHOLD, rasterize_torch

W, H = 48, 32
F = 40.0


def _camera(dtype=torch.float32, cx=24.5, cy=16.5):
    viewmat = torch.eye(4, dtype=dtype)[None]  # camera at the origin looking down +z
    K = torch.tensor([[F, 0, cx], [0, F, cy], [0, 0, 1]], dtype=dtype)[None]
    return viewmat, K


def _iso(means, scale, opac, colors, dtype=torch.float32):
    n = len(means)
    return (torch.tensor(means, dtype=dtype), torch.tensor([[1.0, 0, 0, 0]] * n, dtype=dtype),
            torch.full((n, 3), scale, dtype=dtype), torch.tensor(opac, dtype=dtype), torch.tensor(colors, dtype=dtype))


def test_single_gaussian_matches_hand_computed_render():
    depth, scale, opac = 4.0, 0.1, 0.8
    means, quats, scales, opacities, colors = _iso([[0.0, 0.0, depth]], scale, [opac], [[0.2, 0.6, 1.0]])
    viewmat, K = _camera()
    bg = torch.tensor([[0.5, 0.5, 0.5]])
    rgb, alpha, meta = rasterize_torch(means, quats, scales, opacities, colors, viewmat, K, W, H, backgrounds=bg)
    assert rgb.shape == (1, H, W, 3) and alpha.shape == (1, H, W, 1)
    # the mean projects onto the centre of pixel (24, 16): sigma = 0 there, so alpha = opacity
    assert alpha[0, 16, 24, 0].item() == pytest.approx(opac, abs=1e-6)
    expected = opac * torch.tensor([0.2, 0.6, 1.0]) + (1 - opac) * 0.5
    torch.testing.assert_close(rgb[0, 16, 24], expected, atol=1e-6, rtol=0)
    # one pixel to the right: EWA variance (f·s/z)² plus gsplat's 0.3 px² blur
    var = (F * scale / depth) ** 2 + 0.3
    assert alpha[0, 16, 25, 0].item() == pytest.approx(opac * math.exp(-0.5 / var), abs=1e-6)
    # opacity-aware radius as gsplat: ceil(min(3.33, sqrt(2 ln(255·o))) · σ)
    extend = min(3.33, math.sqrt(2 * math.log(opac / ALPHA_THRESHOLD)))
    assert meta["radii"][0, 0].tolist() == [math.ceil(extend * math.sqrt(var))] * 2
    torch.testing.assert_close(meta["means2d"][0, 0], torch.tensor([24.5, 16.5]))
    # far from the Gaussian: background only
    assert alpha[0, 0, 0, 0].item() == 0.0
    torch.testing.assert_close(rgb[0, 0, 0], bg[0])


def test_front_gaussian_occludes_back_one_and_depth_is_expected_depth():
    means, quats, scales, opacities, colors = _iso(
        [[0.0, 0.0, 6.0], [0.0, 0.0, 3.0]], 0.2, [0.9, 0.5], [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # back listed first
    viewmat, K = _camera()
    rgb, alpha, _ = rasterize_torch(means, quats, scales, opacities, colors, viewmat, K, W, H, render_mode="RGB+ED")
    a_front, a_back = 0.5, 0.9
    torch.testing.assert_close(rgb[0, 16, 24, :3], torch.tensor([a_front, (1 - a_front) * a_back, 0.0]), atol=1e-6,
                               rtol=0)
    total = a_front + (1 - a_front) * a_back
    assert alpha[0, 16, 24, 0].item() == pytest.approx(total, abs=1e-6)
    expected_depth = (a_front * 3.0 + (1 - a_front) * a_back * 6.0) / total
    assert rgb[0, 16, 24, 3].item() == pytest.approx(expected_depth, abs=1e-5)


def test_gaussians_behind_the_camera_or_off_screen_are_culled():
    means, quats, scales, opacities, colors = _iso(
        [[0.0, 0.0, -2.0], [50.0, 0.0, 2.0], [0.0, 0.0, 2.0]], 0.1, [0.9, 0.9, 0.9], [[1.0, 1, 1]] * 3)
    viewmat, K = _camera()
    rgb, alpha, meta = rasterize_torch(means, quats, scales, opacities, colors, viewmat, K, W, H)
    assert (meta["radii"][0, :2] == 0).all() and (meta["radii"][0, 2] > 0).all()
    assert alpha.max().item() == pytest.approx(0.9, abs=1e-6)


def test_sh_degree_zero_equals_rgb_colours():
    torch.manual_seed(0)
    means, quats, scales, opacities, colors = _random_gaussians(60)
    viewmat, K = _camera()
    sh = torch.zeros(60, 4, 3)
    sh[:, 0] = (colors - 0.5) / 0.28209479177387814
    rgb_sh, _, _ = rasterize(means, quats, scales, opacities, sh, viewmat, K, W, H, sh_degree=0)
    rgb, _, _ = rasterize(means, quats, scales, opacities, colors, viewmat, K, W, H)
    torch.testing.assert_close(rgb_sh, rgb, atol=1e-5, rtol=0)


def test_gradients_match_finite_differences():
    torch.manual_seed(1)
    means, quats, scales, opacities, colors = _random_gaussians(20, dtype=torch.float64)
    viewmat, K = _camera(torch.float64)
    target = torch.rand(1, H, W, 3, dtype=torch.float64)

    def loss_of(m, o):
        rgb, _, _ = rasterize_torch(m, quats, scales, o, colors, viewmat, K, W, H)
        return ((rgb - target) ** 2).sum()

    m, o = means.clone().requires_grad_(True), opacities.clone().requires_grad_(True)
    loss_of(m, o).backward()
    eps = 1e-6
    for i, j in [(0, 0), (3, 1), (7, 2)]:
        dm = torch.zeros_like(means)
        dm[i, j] = eps
        fd = (loss_of(means + dm, opacities) - loss_of(means - dm, opacities)) / (2 * eps)
        assert m.grad[i, j].item() == pytest.approx(fd.item(), rel=1e-4, abs=1e-6)
    do = torch.zeros_like(opacities)
    do[5] = eps
    fd = (loss_of(means, opacities + do) - loss_of(means, opacities - do)) / (2 * eps)
    assert o.grad[5].item() == pytest.approx(fd.item(), rel=1e-4, abs=1e-6)


def test_meta_feeds_gsplat_default_strategy():
    torch.manual_seed(2)
    n = 50
    means, quats, scales, opacities, colors = _random_gaussians(n)
    means[0, 2] = -1.0  # behind the camera: never counted
    params = {k: torch.nn.Parameter(v) for k, v in
              dict(means=means, quats=quats, scales=scales.log(), opacities=torch.logit(opacities)).items()}
    viewmat, K = _camera()
    viewmats, Ks = viewmat.repeat(2, 1, 1), K.repeat(2, 1, 1)
    rgb, _, meta = rasterize(params["means"], params["quats"], params["scales"].exp(),
                             torch.sigmoid(params["opacities"]), colors, viewmats, Ks, W, H)
    assert meta["means2d"].shape == (2, n, 2) and meta["radii"].shape == (2, n, 2)
    assert meta["width"] == W and meta["height"] == H and meta["n_cameras"] == 2 and meta["gaussian_ids"] is None
    strategy, opts = DefaultStrategy(), {k: torch.optim.Adam([p]) for k, p in params.items()}
    state = strategy.initialize_state()
    strategy.step_pre_backward(params, opts, state, 0, meta)
    rgb.sum().backward()
    strategy.step_post_backward(params, opts, state, 0, meta)
    assert state["count"][0] == 0 and state["count"][1:].max() == 2  # seen by both cameras
    assert (state["grad2d"][state["count"] > 0] > 0).any()


def test_unknown_backend_or_render_mode_is_an_error():
    means, quats, scales, opacities, colors = _iso([[0.0, 0.0, 4.0]], 0.1, [0.5], [[1.0, 1, 1]])
    viewmat, K = _camera()
    with pytest.raises(ValueError, match="backend"):
        rasterize(means, quats, scales, opacities, colors, viewmat, K, W, H, backend="vulkan")
    with pytest.raises(ValueError, match="render_mode"):
        rasterize_torch(means, quats, scales, opacities, colors, viewmat, K, W, H, render_mode="D")


@pytest.mark.gpu
def test_torch_path_matches_gsplat_on_cuda():
    torch.manual_seed(3)
    dev = torch.device("cuda")
    n, w, h = 3000, 96, 64
    means = (torch.randn(n, 3) * torch.tensor([1.5, 1.0, 1.0]) + torch.tensor([0, 0, 5.0])).to(dev)
    quats = torch.randn(n, 4, device=dev)
    scales = (torch.rand(n, 3, device=dev) * 0.08 + 0.01)
    opacities = torch.rand(n, device=dev) * 0.9 + 0.05
    sh = torch.randn(n, 16, 3, device=dev) * 0.3
    viewmats = torch.eye(4, device=dev).repeat(3, 1, 1)
    viewmats[1, 0, 3], viewmats[2, 1, 3] = 0.3, -0.2
    Ks = torch.tensor([[80.0, 0, 48], [0, 80, 32], [0, 0, 1]], device=dev).repeat(3, 1, 1)
    bg = torch.rand(3, 3, device=dev)
    args = (means, quats, scales, opacities, sh, viewmats, Ks, w, h)
    ours, a_ours, m_ours = rasterize(*args, sh_degree=3, backgrounds=bg, render_mode="RGB+ED", backend="torch")
    ref, a_ref, m_ref = rasterize(*args, sh_degree=3, backgrounds=bg, render_mode="RGB+ED", backend="gsplat")
    assert (ours[..., :3] - ref[..., :3]).abs().max() < 1e-2 and (ours[..., :3] - ref[..., :3]).abs().mean() < 1e-3
    assert (a_ours - a_ref).abs().max() < 1e-2 and (a_ours - a_ref).abs().mean() < 1e-3
    assert (m_ours["radii"] - m_ref["radii"]).abs().max() <= 1  # ceil() of float sums may round differently
    both = (m_ours["radii"] > 0).all(-1) & (m_ref["radii"] > 0).all(-1)  # gsplat leaves culled means2d unset
    assert both.float().mean() > 0.5
    torch.testing.assert_close(m_ours["means2d"][both], m_ref["means2d"][both], atol=1e-3, rtol=1e-4)


def _random_gaussians(n, dtype=torch.float32):
    means = torch.randn(n, 3, dtype=dtype) * 0.6 + torch.tensor([0, 0, 4.0], dtype=dtype)
    quats = torch.randn(n, 4, dtype=dtype)
    scales = torch.rand(n, 3, dtype=dtype) * 0.15 + 0.1
    opacities = torch.rand(n, dtype=dtype) * 0.6 + 0.3
    colors = torch.rand(n, 3, dtype=dtype)
    return means, quats, scales, opacities, colors
