"""Differentiable 3D Gaussian rasterization in plain torch: the CPU path and the reference for gsplat's CUDA kernels.

gsplat's own torch reference (``gsplat.cuda._torch_impl``) still calls CUDA kernels for tile intersection and
compositing, so the compositing is written here. It follows gsplat 1.5.3's kernels step for step so that both
paths render the same image (a ``gpu`` test holds them together):

- EWA projection with a 0.3 px² blur on the 2D covariance (gsplat's ``eps2d``) and gsplat's opacity-aware
  bounding box (extend = min(3.33, sqrt(2 ln(255·opacity))) σ, arXiv 2402.00525 B.2);
- 16×16 pixel tiles; a Gaussian contributes to every pixel of each tile its bounding box touches;
- front-to-back compositing in depth order, alpha = min(0.999, o·exp(-σ)), skipped below 1/255, a pixel stops
  before the Gaussian that would bring its transmittance to ≤ 1e-4.

Memory is bounded by compositing one tile at a time: [tile pixels, Gaussians touching the tile].
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
    means2d, covars2d = _persp_proj(means_c, covars_c, Ks, width, height)  # [C, N, 2], [C, N, 2, 2]
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
) -> tuple[Tensor, Tensor]:
    """Front-to-back alpha compositing of one camera, tile by tile → (colors [H, W, D], alphas [H, W, 1])."""
    D = feats.shape[-1]
    out_col = feats.new_zeros(height, width, D)
    out_alpha = feats.new_zeros(height, width, 1)
    visible = torch.nonzero((radii > 0).all(dim=-1)).flatten()
    if visible.numel() == 0:
        return out_col, out_alpha
    visible = visible[torch.argsort(depths.detach()[visible], stable=True)]  # depth order, as gsplat's sort
    with torch.no_grad():  # tile range each Gaussian touches, as gsplat's isect_tiles: [min, max)
        m, r = means2d.detach()[visible], radii[visible].float()
        tiles_w, tiles_h = math.ceil(width / tile_size), math.ceil(height / tile_size)
        tx0 = torch.floor((m[:, 0] - r[:, 0]) / tile_size).clamp(0, tiles_w).long()
        tx1 = torch.ceil((m[:, 0] + r[:, 0]) / tile_size).clamp(0, tiles_w).long()
        ty0 = torch.floor((m[:, 1] - r[:, 1]) / tile_size).clamp(0, tiles_h).long()
        ty1 = torch.ceil((m[:, 1] + r[:, 1]) / tile_size).clamp(0, tiles_h).long()
    for ty in range(tiles_h):
        for tx in range(tiles_w):
            ids = visible[(tx0 <= tx) & (tx < tx1) & (ty0 <= ty) & (ty < ty1)]  # [M] depth-sorted
            if ids.numel() == 0:
                continue
            x0, y0 = tx * tile_size, ty * tile_size
            x1, y1 = min(x0 + tile_size, width), min(y0 + tile_size, height)
            col, alp = _composite_pixels(means2d[ids], conics[ids], feats[ids], opacities[ids], x0, x1, y0, y1)
            out_col[y0:y1, x0:x1] = col
            out_alpha[y0:y1, x0:x1] = alp
    return out_col, out_alpha


def _composite_pixels(means2d, conics, feats, opacities, x0, x1, y0, y1) -> tuple[Tensor, Tensor]:
    """Composite M depth-sorted Gaussians over the pixel rectangle [y0, y1) × [x0, x1) → [h, w, D], [h, w, 1]."""
    ys = torch.arange(y0, y1, device=means2d.device, dtype=means2d.dtype) + 0.5  # pixel centres
    xs = torch.arange(x0, x1, device=means2d.device, dtype=means2d.dtype) + 0.5
    py, px = torch.meshgrid(ys, xs, indexing="ij")
    pix = torch.stack([px.reshape(-1), py.reshape(-1)], dim=-1)  # [P, 2]
    d = means2d[None] - pix[:, None]  # [P, M, 2]
    sigma = (0.5 * (conics[:, 0] * d[..., 0] ** 2 + conics[:, 2] * d[..., 1] ** 2)
             + conics[:, 1] * d[..., 0] * d[..., 1])  # [P, M]
    alpha = torch.clamp_max(opacities * torch.exp(-sigma), MAX_ALPHA)  # [P, M]
    alpha = torch.where((sigma >= 0) & (alpha >= ALPHA_THRESHOLD), alpha, torch.zeros_like(alpha))
    trans_after = torch.cumprod(1.0 - alpha, dim=1)  # [P, M] transmittance after each Gaussian
    keep = trans_after > MIN_TRANSMITTANCE  # prefix of each row: the pixel stops at the first failure
    trans_before = F.pad(trans_after[:, :-1], (1, 0), value=1.0)  # [P, M]
    weights = torch.where(keep, alpha * trans_before, torch.zeros_like(alpha))  # [P, M]
    col = weights @ feats  # [P, D]
    alp = weights.sum(dim=1, keepdim=True)  # [P, 1] = 1 - final transmittance
    h, w = y1 - y0, x1 - x0
    return col.reshape(h, w, -1), alp.reshape(h, w, 1)
