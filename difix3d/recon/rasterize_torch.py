"""Differentiable 3D Gaussian rasterization in plain torch: the CPU path and the reference for gsplat's CUDA kernels.

gsplat's own torch reference (``gsplat.cuda._torch_impl``) still calls CUDA kernels for tile intersection and
compositing, so the compositing is written here. It follows gsplat 1.5.3's kernels step for step so that both
paths render the same image (a ``gpu`` test holds them together):

- EWA projection with a 0.3 px² blur on the 2D covariance (gsplat's ``eps2d``) and gsplat's opacity-aware
  bounding box (extend = min(3.33, sqrt(2 ln(255·opacity))) σ, arXiv 2402.00525 B.2);
- 16×16 pixel tiles; a Gaussian contributes to every pixel of each tile its bounding box touches;
- front-to-back compositing in depth order, alpha = min(0.999, o·exp(-σ)), skipped below 1/255, a pixel stops
  before the Gaussian that would bring its transmittance to ≤ 1e-4.

Tiles are composited in batches padded to their longest Gaussian list; memory stays under a set element budget.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from gsplat.cuda._torch_impl import _persp_proj, _quat_scale_to_covar_preci, _spherical_harmonics, _world_to_cam
from torch import Tensor

ALPHA_THRESHOLD = 1.0 / 255.0  # gsplat Common.h
MAX_ALPHA = 0.999  # gsplat RasterizeToPixels3DGSFwd.cu
MIN_TRANSMITTANCE = 1e-4  # ibid.: a pixel is done when T would drop to this
TILE_SIZE = 16  # gsplat rasterization() default


def rasterize_torch(
    means: Tensor,  # [N, 3]
    quats: Tensor,  # [N, 4] (w, x, y, z), need not be normalized
    scales: Tensor,  # [N, 3] activated (exp of the log-scales)
    opacities: Tensor,  # [N] activated (sigmoid of the logits)
    colors: Tensor,  # [N, 3] RGB, or [N, K, 3] SH coefficients when sh_degree is set
    viewmats: Tensor,  # [C, 4, 4] world -> camera
    Ks: Tensor,  # [C, 3, 3]
    width: int,
    height: int,
    sh_degree: int | None = None,
    backgrounds: Tensor | None = None,  # [C, 3]
    render_mode: str = "RGB",  # "RGB" | "RGB+ED" (expected depth as a 4th channel, like gsplat)
    eps2d: float = 0.3,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    tile_size: int = TILE_SIZE,
) -> tuple[Tensor, Tensor, dict]:
    """Render C cameras → (colors [C, H, W, 3 or 4], alphas [C, H, W, 1], meta) with gsplat's packed=False meta."""
    if render_mode not in ("RGB", "RGB+ED"):
        raise ValueError(f"render_mode {render_mode!r}: the torch rasterizer supports 'RGB' and 'RGB+ED'")
    C, N = viewmats.shape[0], means.shape[0]
    covars, _ = _quat_scale_to_covar_preci(quats, scales, compute_preci=False)  # [N, 3, 3]
    radii, means2d, depths, conics = project_gaussians(
        means, covars, opacities, viewmats, Ks, width, height, eps2d, near_plane, far_plane)
    # radii [C, N, 2] int32, means2d [C, N, 2], depths [C, N], conics [C, N, 3]

    if sh_degree is None:
        rgb = colors.expand(C, N, 3) if colors.dim() == 2 else colors  # [C, N, 3]
    else:
        campos = torch.linalg.inv(viewmats)[:, :3, 3]  # [C, 3]
        dirs = means[None] - campos[:, None]  # [C, N, 3]
        shs = colors.expand(C, *colors.shape)  # [C, N, K, 3]
        rgb = torch.clamp_min(_spherical_harmonics(sh_degree, dirs, shs) + 0.5, 0.0)  # gsplat's +0.5 convention
    feats = torch.cat([rgb, depths[..., None]], dim=-1) if render_mode == "RGB+ED" else rgb  # [C, N, D]

    out_colors, out_alphas = [], []
    for c in range(C):
        col, alp = _composite_image(means2d[c], conics[c], feats[c], opacities, radii[c], depths[c],
                                    width, height, tile_size)
        if backgrounds is not None:
            bg = backgrounds[c]
            if render_mode == "RGB+ED":
                bg = torch.cat([bg, bg.new_zeros(1)])
            col = col + (1.0 - alp) * bg
        out_colors.append(col)
        out_alphas.append(alp)
    render_colors = torch.stack(out_colors)  # [C, H, W, D]
    render_alphas = torch.stack(out_alphas)  # [C, H, W, 1]
    if render_mode == "RGB+ED":
        render_colors = torch.cat(
            [render_colors[..., :3], render_colors[..., 3:] / render_alphas.clamp_min(1e-10)], dim=-1)

    meta = {
        "camera_ids": None, "gaussian_ids": None,  # gsplat packed=False layout: no ids
        "radii": radii, "means2d": means2d, "depths": depths, "conics": conics,
        "opacities": opacities.expand(C, N), "width": width, "height": height, "tile_size": tile_size,
        "n_batches": 1, "n_cameras": C,
    }
    return render_colors, render_alphas, meta


def project_gaussians(
    means: Tensor,  # [N, 3]
    covars: Tensor,  # [N, 3, 3]
    opacities: Tensor,  # [N]
    viewmats: Tensor,  # [C, 4, 4]
    Ks: Tensor,  # [C, 3, 3]
    width: int,
    height: int,
    eps2d: float = 0.3,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """EWA splatting of world Gaussians into C pinhole cameras, as gsplat's ProjectionEWA3DGSFused kernel.

    Returns radii [C, N, 2] int32 (0 = culled), means2d [C, N, 2], depths [C, N], conics [C, N, 3].
    """
    means_c, covars_c = _world_to_cam(means, covars, viewmats)  # [C, N, 3], [C, N, 3, 3]
    # Gaussians outside the depth range are culled below; they are projected from a stand-in point 1 unit ahead, so
    # that one in the camera plane (z = 0: inf in the Jacobian) cannot turn its zero gradient into NaN, as gsplat's
    # kernel skips them
    in_range = ((means_c[..., 2] > near_plane) & (means_c[..., 2] < far_plane)).detach()
    ahead = torch.tensor([0.0, 0.0, 1.0], device=means.device, dtype=means.dtype)
    means2d, covars2d = _persp_proj(torch.where(in_range[..., None], means_c, ahead),
                                    torch.where(in_range[..., None, None], covars_c, torch.zeros_like(covars_c)),
                                    Ks, width, height)  # [C, N, 2], [C, N, 2, 2]
    covars2d = covars2d + torch.eye(2, device=means.device, dtype=means.dtype) * eps2d
    a, b, c = covars2d[..., 0, 0], 0.5 * (covars2d[..., 0, 1] + covars2d[..., 1, 0]), covars2d[..., 1, 1]
    det = a * c - b * b  # [C, N]
    safe_det = det.clamp_min(1e-10)
    conics = torch.stack([c / safe_det, -b / safe_det, a / safe_det], dim=-1)  # inverse 2D covariance, upper tri
    depths = means_c[..., 2]  # [C, N]

    with torch.no_grad():
        opac = opacities.detach().expand_as(depths)
        extend = torch.sqrt(2.0 * torch.log(opac.clamp_min(ALPHA_THRESHOLD) / ALPHA_THRESHOLD)).clamp_max(3.33)
        radius = torch.stack([torch.ceil(extend * a.sqrt()), torch.ceil(extend * c.sqrt())], dim=-1)  # [C, N, 2]
        mx, my = means2d[..., 0], means2d[..., 1]
        valid = ((det > 0) & (depths > near_plane) & (depths < far_plane) & (opac >= ALPHA_THRESHOLD)
                 & (radius > 0).any(dim=-1)
                 & (mx + radius[..., 0] > 0) & (mx - radius[..., 0] < width)
                 & (my + radius[..., 1] > 0) & (my - radius[..., 1] < height))
        radius = torch.where(valid[..., None], radius, torch.zeros_like(radius))
        radius = torch.nan_to_num(radius, nan=0.0)
    return radius.to(torch.int32), means2d, depths, conics


def _composite_image(
    means2d: Tensor,  # [N, 2]
    conics: Tensor,  # [N, 3]
    feats: Tensor,  # [N, D]
    opacities: Tensor,  # [N]
    radii: Tensor,  # [N, 2]
    depths: Tensor,  # [N]
    width: int,
    height: int,
    tile_size: int,
    max_elements: int = 1 << 23,
) -> tuple[Tensor, Tensor]:
    """Front-to-back alpha compositing of one camera → (colors [H, W, D], alphas [H, W, 1]).

    Tiles are batched: each tile gets the depth-sorted list of Gaussians touching it, padded to the longest list
    with a transparent dummy; tile chunks keep [tiles, tile pixels, Gaussians] under ``max_elements``.
    """
    D = feats.shape[-1]
    tiles_w, tiles_h = math.ceil(width / tile_size), math.ceil(height / tile_size)
    visible = torch.nonzero((radii > 0).all(dim=-1)).flatten()
    visible = visible[torch.argsort(depths.detach()[visible], stable=True)]  # depth order, as gsplat's sort
    with torch.no_grad():  # tile range each Gaussian touches, as gsplat's isect_tiles: [min, max)
        m, r = means2d.detach()[visible], radii[visible].float()
        tx0 = torch.floor((m[:, 0] - r[:, 0]) / tile_size).clamp(0, tiles_w)
        tx1 = torch.ceil((m[:, 0] + r[:, 0]) / tile_size).clamp(0, tiles_w)
        ty0 = torch.floor((m[:, 1] - r[:, 1]) / tile_size).clamp(0, tiles_h)
        ty1 = torch.ceil((m[:, 1] + r[:, 1]) / tile_size).clamp(0, tiles_h)
    # a transparent dummy at index N pads the per-tile lists
    pad = lambda t: torch.cat([t, t.new_zeros(1, *t.shape[1:])])  # noqa: E731
    means2d, conics, feats, opacities = pad(means2d), pad(conics), pad(feats), pad(opacities)
    P = tile_size * tile_size
    offs = torch.arange(tile_size, device=means2d.device, dtype=means2d.dtype) + 0.5  # pixel centres in a tile
    oy, ox = torch.meshgrid(offs, offs, indexing="ij")
    tile_pix = torch.stack([ox.reshape(-1), oy.reshape(-1)], dim=-1)  # [P, 2]
    n_tiles = tiles_w * tiles_h
    cols, alps, t = [], [], 0
    while t < n_tiles:
        with torch.no_grad():
            counts_all = None
            chunk = max(1, min(n_tiles - t, 64))
            while True:  # shrink the chunk until [tiles, P, longest list] fits the budget
                tid = torch.arange(t, t + chunk, device=means2d.device)
                tyy, txx = (tid // tiles_w)[:, None], (tid % tiles_w)[:, None]
                touch = (tx0 <= txx) & (txx < tx1) & (ty0 <= tyy) & (tyy < ty1)  # [T, Nv] in depth order
                counts_all = touch.sum(dim=1)
                M = max(1, int(counts_all.max()) if counts_all.numel() else 1)
                if chunk == 1 or chunk * P * M <= max_elements:
                    break
                chunk = max(1, chunk // 2)
            slot = torch.cumsum(touch, dim=1) - 1  # position of each touching Gaussian in its tile's list
            ids = torch.full((chunk, M), len(radii), dtype=torch.long, device=means2d.device)
            rows, cols_ = torch.nonzero(touch, as_tuple=True)
            ids[rows, slot[rows, cols_]] = visible[cols_]
            origin = torch.stack([txx[:, 0], tyy[:, 0]], dim=-1).to(means2d.dtype) * tile_size  # [T, 2]
            pix = origin[:, None] + tile_pix[None]  # [T, P, 2]
        col, alp = _composite_tiles(means2d[ids], conics[ids], feats[ids], opacities[ids], pix)
        cols.append(col)
        alps.append(alp)
        t += chunk
    col = torch.cat(cols) if cols else feats.new_zeros(0, P, D)  # [n_tiles, P, D]
    alp = torch.cat(alps) if alps else feats.new_zeros(0, P, 1)
    return _untile(col, tiles_h, tiles_w, tile_size)[:height, :width], _untile(alp, tiles_h, tiles_w, tile_size)[
        :height, :width]


def _composite_tiles(means2d, conics, feats, opacities, pix) -> tuple[Tensor, Tensor]:
    """Composite depth-sorted Gaussians [T, M, ·] over tile pixels [T, P, 2] → colors [T, P, D], alphas [T, P, 1]."""
    d = means2d[:, None] - pix[:, :, None]  # [T, P, M, 2]
    dx, dy = d[..., 0], d[..., 1]
    cx, cy, cz = (conics[:, None, :, i] for i in range(3))  # [T, 1, M]
    sigma = 0.5 * (cx * dx * dx + cz * dy * dy) + cy * dx * dy  # [T, P, M]
    alpha = torch.clamp_max(opacities[:, None] * torch.exp(-sigma), MAX_ALPHA)  # [T, P, M]
    alpha = alpha * ((sigma >= 0) & (alpha >= ALPHA_THRESHOLD))
    trans_after = torch.cumprod(1.0 - alpha, dim=-1)  # [T, P, M] transmittance after each Gaussian
    keep = trans_after > MIN_TRANSMITTANCE  # a prefix of each row: the pixel stops at the first failure
    trans_before = F.pad(trans_after[..., :-1], (1, 0), value=1.0)  # [T, P, M]
    weights = alpha * trans_before * keep  # [T, P, M]
    return torch.bmm(weights, feats), weights.sum(dim=-1, keepdim=True)  # [T, P, D], [T, P, 1]


def _untile(x: Tensor, tiles_h: int, tiles_w: int, tile_size: int) -> Tensor:
    """[tiles_h·tiles_w, tile², D] → [tiles_h·tile, tiles_w·tile, D]."""
    D = x.shape[-1]
    x = x.reshape(tiles_h, tiles_w, tile_size, tile_size, D).permute(0, 2, 1, 3, 4)
    return x.reshape(tiles_h * tile_size, tiles_w * tile_size, D)
