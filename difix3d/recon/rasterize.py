"""One rasterization entry point: gsplat's CUDA kernels on CUDA tensors, our torch compositing elsewhere.

The signature is the subset of ``gsplat.rasterization`` that difix3d uses, so both backends take the same tensors
and return the same ``meta`` keys that gsplat's ``DefaultStrategy`` reads (packed=False layout).
"""

from __future__ import annotations

from torch import Tensor

from difix3d.recon.rasterize_torch import rasterize_torch

BACKENDS = ("auto", "gsplat", "torch")


def rasterize(
    means: Tensor,  # [N, 3]
    quats: Tensor,  # [N, 4] (w, x, y, z)
    scales: Tensor,  # [N, 3] activated
    opacities: Tensor,  # [N] activated
    colors: Tensor,  # [N, 3] RGB, or [N, K, 3] SH coefficients with sh_degree
    viewmats: Tensor,  # [C, 4, 4] world -> camera (OpenCV)
    Ks: Tensor,  # [C, 3, 3]
    width: int,
    height: int,
    sh_degree: int | None = None,
    backgrounds: Tensor | None = None,  # [C, 3]
    render_mode: str = "RGB",  # "RGB" | "RGB+ED"
    backend: str = "auto",  # "auto": gsplat on CUDA, torch otherwise
) -> tuple[Tensor, Tensor, dict]:
    """→ (colors [C, H, W, 3 or 4], alphas [C, H, W, 1], meta with means2d/radii/width/height/n_cameras/...)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}: expected one of {BACKENDS}")
    if backend == "gsplat" or (backend == "auto" and means.is_cuda):
        from difix3d import gsplat_prebuilt

        gsplat_prebuilt.install()  # a prebuilt extension ($DIFIX3D_GSPLAT_SO) spares each worker gsplat's JIT build
        from gsplat import rasterization  # imported lazily: its CUDA extension loads on first use

        return rasterization(means, quats, scales, opacities, colors, viewmats, Ks, width, height,
                             sh_degree=sh_degree, backgrounds=backgrounds, render_mode=render_mode, packed=False)
    return rasterize_torch(means, quats, scales, opacities, colors, viewmats, Ks, width, height,
                           sh_degree=sh_degree, backgrounds=backgrounds, render_mode=render_mode)
