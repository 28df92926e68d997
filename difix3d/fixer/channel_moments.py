"""Per-channel mean and variance of NHWC activations in one pass, as a Triton kernel.

Group norm on channels_last activations (:mod:`channels_last_norm`) reduces each channel over all pixels: a reduction
along the outer, strided dimension of ``[B, HW, C]`` memory. Here each program walks a band of rows in
``[BLOCK_R, BLOCK_C]`` tiles (each row a contiguous run of channels) and accumulates, element by element in
registers, the sums of deviations from the band's first row and of their squares (shifted sums: no large-sum
cancellation, and no cross-thread reduction until the band ends); the bands are merged with Chan et al.'s formula in
PyTorch ops that torch.compile fuses. Registered as a ``torch.library.triton_op`` so torch.compile traces it into
its graph (no graph break) and CUDA graphs record it.
"""

from __future__ import annotations

import torch

BLOCK_R = 64  # rows (pixels) per tile
BLOCK_C = 128  # channels per tile: 256 contiguous bytes per row in bf16
NUM_WARPS = 8
TARGET_PROGRAMS = 1024  # enough bands to fill a GPU's SMs several times over


def available() -> bool:
    """True where Triton and torch's Triton-op registration import (the kernel runs on CUDA tensors only)."""
    return _AVAILABLE


def rows_per_program(batch: int, rows: int, channels: int) -> int:
    """Rows each program reduces: a multiple of ``BLOCK_R`` giving about ``TARGET_PROGRAMS`` programs (at most 4096
    rows, so the partial results stay ~1% of the input)."""
    channel_blocks = -(-channels // BLOCK_C)
    per = -(-batch * rows * channel_blocks // TARGET_PROGRAMS)
    per = -(-per // BLOCK_R) * BLOCK_R
    return max(BLOCK_R, min(per, 4096))


try:  # defined at import, not on first use: torch.compile cannot trace Triton's decorators inside a forward
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton
except ImportError:
    _AVAILABLE = False
else:
    _AVAILABLE = True

    @triton.jit
    def _band_moments(x_ptr, mean_ptr, m2_ptr, rows, bands, channels, ROWS: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_C: tl.constexpr):
        # program (b * bands + band, channel block): mean and M2 of rows [band*ROWS, band*ROWS + ROWS) of sample b
        pid = tl.program_id(0)
        b = pid // bands
        band = pid % bands
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = c < channels
        first = band * ROWS
        end = tl.minimum(first + ROWS, rows)
        base = x_ptr + b.to(tl.int64) * rows * channels
        shift = tl.load(base + first.to(tl.int64) * channels + c, mask=cmask, other=0.0).to(tl.float32)
        s1 = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
        s2 = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
        for start in range(0, ROWS, BLOCK_R):
            r = first + start + tl.arange(0, BLOCK_R)
            mask = (r < end)[:, None] & cmask[None, :]
            tile = tl.load(base + r.to(tl.int64)[:, None] * channels + c[None, :], mask=mask, other=0.0)
            d = tl.where(mask, tile.to(tl.float32) - shift[None, :], 0.0)
            s1 += d
            s2 += d * d
        n = (end - first).to(tl.float32)
        t1 = tl.sum(s1, axis=0)
        t2 = tl.sum(s2, axis=0)
        out = pid.to(tl.int64) * channels + c
        tl.store(mean_ptr + out, shift + t1 / n, mask=cmask)
        tl.store(m2_ptr + out, tl.maximum(t2 - t1 * t1 / n, 0.0), mask=cmask)

    @triton_op("difix3d::band_moments", mutates_args={})
    def _band_moments_op(x: torch.Tensor, rows_per_band: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.contiguous()  # a no-op on the NHWC views it is given; the kernel indexes [B, R, C] memory
        b, rows, channels = x.shape
        bands = -(-rows // rows_per_band)
        mean = torch.empty((b, bands, channels), device=x.device, dtype=torch.float32)
        m2 = torch.empty_like(mean)
        grid = (b * bands, -(-channels // BLOCK_C))
        wrap_triton(_band_moments)[grid](x, mean, m2, rows, bands, channels, ROWS=rows_per_band, BLOCK_R=BLOCK_R,
                                         BLOCK_C=BLOCK_C, num_warps=NUM_WARPS)
        return mean, m2


def channel_var_mean(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Population variance and mean over dim 1 of a contiguous ``[B, R, C]`` tensor, float32 ``[B, C]`` each: the
    Triton kernel's per-band moments merged across bands (Chan et al.)."""
    if x.dim() != 3 or not x.is_contiguous():
        raise ValueError(f"channel_var_mean: expected a contiguous [B, R, C] tensor, got shape {tuple(x.shape)}")
    b, rows, channels = x.shape
    per = rows_per_program(b, rows, channels)
    band_mean, band_m2 = _band_moments_op(x, per)  # [B, bands, C]
    bands = band_mean.shape[1]
    first = torch.arange(bands, device=x.device, dtype=torch.float32) * per
    counts = (rows - first).clamp(max=per).view(1, bands, 1)  # rows in each band: all full but the last
    mean = (band_mean * counts).sum(dim=1) / rows
    m2 = (band_m2 + counts * (band_mean - mean[:, None]).square()).sum(dim=1)
    return m2 / rows, mean
