"""Real photo textures for synthetic scenes: the grayscale images scikit-image ships in its wheel (no download).

``skimage.data`` ``brick``, ``gravel``, ``grass`` and ``moon`` are bundled with the package (checked offline on
scikit-image 0.26); others (e.g. ``eagle``) need pooch and are avoided. Materials tint them with a colour.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

TEXTURE_NAMES = ("gravel", "brick", "grass", "moon")
TEXTURE_SIZE = 256  # texels per side after resampling; plenty for ~0.5 m–4 m tiles at 1024 px wide


@lru_cache(maxsize=1)
def load_textures() -> torch.Tensor:
    """[T, S, S] float32 in [0, 1], one per name in ``TEXTURE_NAMES``, contrast-normalized to mean 0.5."""
    import skimage.data

    out = []
    for name in TEXTURE_NAMES:
        img = np.asarray(getattr(skimage.data, name)(), dtype=np.float32) / 255.0  # [h, w]
        t = torch.from_numpy(img)[None, None]
        t = torch.nn.functional.interpolate(t, size=(TEXTURE_SIZE, TEXTURE_SIZE), mode="area")[0, 0]
        t = (t - t.mean()) / (t.std() + 1e-6) * 0.18 + 0.5  # equal contrast across photos
        out.append(t.clamp(0.0, 1.0))
    return torch.stack(out)


def sample_texture(textures: torch.Tensor, tex_id: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Bilinear, wrapping lookup: ``textures`` [T, S, S], ``tex_id`` [N] long, ``u``, ``v`` [N] in tile units
    (1.0 = one repeat) → [N]. Written by hand because ``grid_sample`` has no wrap (repeat) padding mode."""
    T, S, _ = textures.shape
    x = (u - torch.floor(u)) * S - 0.5  # texel centres at +0.5
    y = (v - torch.floor(v)) * S - 0.5
    x0, y0 = torch.floor(x), torch.floor(y)
    fx, fy = x - x0, y - y0
    x0, y0 = x0.long() % S, y0.long() % S
    x1, y1 = (x0 + 1) % S, (y0 + 1) % S
    base = tex_id * (S * S)
    f = textures.reshape(-1)  # gather each corner from the flat texel array
    c00, c01 = f[base + y0 * S + x0], f[base + y0 * S + x1]
    c10, c11 = f[base + y1 * S + x0], f[base + y1 * S + x1]
    return (c00 * (1 - fx) + c01 * fx) * (1 - fy) + (c10 * (1 - fx) + c11 * fx) * fy
