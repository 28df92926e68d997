"""GroupNorm that stays in channels_last for serving.

PyTorch's CUDA group norm makes a channels_last input contiguous (an NCHW copy) and computes its moments with a slow
row-wise kernel; its NCHW output then makes the next channels_last convolution convert back. Profiled on one H200
(bf16, 576x1024, batch 1, eager), group norm and those copies were ~70% of the fixer's GPU time while the
convolutions, the FLOPs, were ~12%. Here the statistics and the affine are computed on an NHWC view of the same
memory: no layout copies, plain reductions and one fused multiply-add, and torch.compile sees simple ops to fuse.
Measured on the H200 per 576x1024 frame: eager 117 -> 81 ms (encoder 35 -> 16 ms, decoder 67 -> 30 ms), compiled
38.7 -> 37.0 ms. ``FixerRunner`` uses it by default.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from difix3d.fixer import scale_shift_kernel


def group_moments(mean_c: torch.Tensor, var_c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel moments ``[..., G, C/G]`` -> each group's mean and variance ``[..., G, 1]``: groups of equal-size
    channels (Chan et al.), the mean of the channel variances plus the variance of the channel means."""
    mean = mean_c.mean(dim=-1, keepdim=True)
    return mean, (var_c + (mean_c - mean).square()).mean(dim=-1, keepdim=True)


@torch.library.custom_op("difix3d::group_norm_scale_shift", mutates_args=())
def group_norm_scale_shift(mean_c: torch.Tensor, var_c: torch.Tensor, weight: torch.Tensor | None,
                           bias: torch.Tensor | None, groups: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel moments ``[B, C]`` (float) -> the group norm's per-sample, per-channel ``scale`` and ``shift``
    ``[B, C]`` (``y = x * scale + shift``). An opaque op, so that torch.compile writes the two small tensors once
    instead of inlining ``rsqrt`` and the group combination into the kernel that normalizes every pixel."""
    b, c = mean_c.shape
    mean, var = group_moments(mean_c.view(b, groups, c // groups), var_c.view(b, groups, c // groups))
    rstd = torch.rsqrt(var + eps)
    if weight is None:
        scale = rstd.expand(b, groups, c // groups).contiguous()
    else:
        scale = rstd * weight.to(rstd.dtype).view(1, groups, c // groups)
    if bias is None:
        shift = (mean * scale).neg_()
    else:
        shift = torch.addcmul(bias.to(rstd.dtype).view(1, groups, c // groups), mean, scale, value=-1)
    return scale.view(b, c), shift.view(b, c)


@group_norm_scale_shift.register_fake
def _(mean_c, var_c, weight, bias, groups, eps):
    return torch.empty_like(mean_c), torch.empty_like(mean_c)


class ChannelsLastGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` with the same parameters and state-dict keys, computed on an NHWC view when the input is
    channels_last (4-D); any other input takes ``nn.GroupNorm``'s path. Statistics and affine run in float32 (float64
    for float64 input), as PyTorch's own kernel does, and the output has the input's dtype and memory format."""

    # statistics per channel (one coalesced reduction over the pixels, C contiguous), then combined per group; False:
    # one reduction per group over [HW, C/G], whose rows are strided by C, so every group reads every cache line.
    # Compiled with SiLU on an H200 at 128x576x1024 (benchmarks/fixer_ops.py): 0.335 -> 0.198 ms. A hand-written
    # Triton kernel for the per-channel moments (commit 9782709) was slower: 0.240 vs 0.200 ms here, and 27.1 vs
    # 25.7 ms for the whole compiled fixer (Inductor fuses each residual add into the reduction that follows it)
    channel_statistics = True
    # per-channel moments as two plain sums of the values less each channel's first pixel ("shifted sums": no
    # division per element, where torch.var_mean compiles to Welford's update) instead of torch.var_mean. The shift
    # spares the cancellation of E[x^2] - E[x]^2 only while the first pixel is typical of its channel (an outlier
    # 1e3 std away costs ~1 % of the variance in float32). Measured on an H200 (benchmarks/RESULTS.md): 3-11 %
    # faster per norm, within the run-to-run noise for the whole fixer; off
    shifted_sums = False
    # with channel statistics: scale and shift computed once per sample and channel by an opaque op, so the kernel
    # that normalizes every pixel loads them instead of recomputing rsqrt and the group combination per element.
    # Inductor's normalize+SiLU kernels were bound by the GPU's special-function units (rsqrt, exp and the SiLU's
    # reciprocal per element: 1.6-2.0 TB/s where a residual add moves 4.4); without the rsqrt the largest ran 1.6x
    # faster, and the compiled sd-turbo fixer's kernels took 21.9 instead of 23.0 ms per frame at batch 4 on an H200
    realized_affine = True
    realized_affine_min_elements = 1 << 22  # per sample (C*H*W): the VAE's norms; the UNet's stay inline
    # on CUDA with Triton: the realized scale and shift from one Triton kernel (scale_shift_kernel.py) instead of the
    # op's eight small PyTorch kernels: 0.28 -> 0.02 ms per frame, 23.22 -> 23.03 ms for the whole fixer (H200, batch 4)
    triton_scale_shift = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
            return super().forward(x)
        b, c, h, w = x.shape
        g = self.num_groups
        acc = torch.promote_types(x.dtype, torch.float32)  # float32 statistics for bf16/fp16, float64 kept
        if self.channel_statistics:
            xv = x.permute(0, 2, 3, 1).reshape(b, h * w, 1, c).to(acc)  # NHWC memory seen as [B, HW, 1, C]
            if self.shifted_sums:  # the shift spares E[d^2] - E[d]^2 most cancellation when |mean| >> std
                shift = xv[:, :1]
                d = xv - shift
                mean_d = d.sum(dim=1, keepdim=True) / (h * w)
                var_c = (d * d).sum(dim=1, keepdim=True).div(h * w).sub(mean_d.square()).clamp_min(0)
                mean_c = shift + mean_d
            else:
                var_c, mean_c = torch.var_mean(xv, dim=1, keepdim=True, correction=0)  # [B, 1, 1, C]
            if self.realized_affine and c * h * w >= self.realized_affine_min_elements and self._no_autograd(x):
                scale_shift = group_norm_scale_shift
                if self.triton_scale_shift and x.is_cuda and acc == torch.float32 and scale_shift_kernel.available():
                    scale_shift = scale_shift_kernel.group_norm_scale_shift_triton
                scale, shift = scale_shift(mean_c.view(b, c), var_c.view(b, c), self.weight, self.bias, g, self.eps)
                y = torch.addcmul(shift.view(b, 1, 1, c), xv, scale.view(b, 1, 1, c)).to(x.dtype)  # [B, HW, 1, C]
                return y.view(b, h, w, c).permute(0, 3, 1, 2)
            mean, var = group_moments(mean_c.view(b, 1, g, c // g), var_c.view(b, 1, g, c // g))  # [B, 1, G, 1]
            xv = xv.view(b, h * w, g, c // g)
        else:
            xv = x.permute(0, 2, 3, 1).reshape(b, h * w, g, c // g).to(acc)  # NHWC memory seen as [B, HW, G, C/G]
            var, mean = torch.var_mean(xv, dim=(1, 3), keepdim=True, correction=0)  # [B, 1, G, 1]
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:  # None without affine; torch's GroupNorm(bias=False) has a weight alone
            scale = scale * self.weight.to(acc).view(1, 1, g, c // g)  # [B, 1, G, C/G]
        if self.bias is not None:
            shift = self.bias.to(acc).view(1, 1, g, c // g) - mean * scale
        else:
            shift = -mean * scale
        y = torch.addcmul(shift, xv, scale).to(x.dtype)  # [B, HW, G, C/G] contiguous = NHWC
        return y.view(b, h, w, c).permute(0, 3, 1, 2)  # a channels_last [B, C, H, W] view

    def _no_autograd(self, x: torch.Tensor) -> bool:
        """Whether no gradient of any kind flows through this call: the opaque scale/shift op has no derivative, so
        it serves inference only (reverse mode off or nothing requiring grad; no forward-mode level, which
        ``torch.func.jvp`` also opens)."""
        from torch.autograd import forward_ad

        if forward_ad._current_level >= 0:
            return False
        if not torch.is_grad_enabled():
            return True
        return not (x.requires_grad or any(p.requires_grad for p in (self.weight, self.bias) if p is not None))


def use_channels_last_group_norm(model: nn.Module) -> int:
    """Switch every ``nn.GroupNorm`` in ``model`` to :class:`ChannelsLastGroupNorm` in place (parameters, keys and
    results unchanged); returns how many were switched."""
    switched = 0
    for module in model.modules():
        if type(module) is nn.GroupNorm:
            module.__class__ = ChannelsLastGroupNorm
            switched += 1
    return switched
