"""Nearest 2x upsampling followed by a 3x3 convolution, computed as one stride-2 transposed convolution.

diffusers' ``Upsample2D`` (the end of every VAE decoder up block and UNet up block) writes a 4x larger copy of its
input, then runs a 3x3 conv on it. Each output pixel of that pair sees only 2x2 distinct input pixels, so the pair
equals a transposed conv (kernel 4, stride 2, padding 1) whose taps are sums of the 3x3 taps that land on the same
input pixel: 16 instead of 36 multiply-adds per input pixel and channel pair, and no upsampled copy. In sd-turbo's
decoder at 576x1024 the three upsampler convs are 1.57 of its 5.83 TFLOP; folded they are 0.70, and compiled in bf16
on an H200 the three take 1.22 instead of 2.40 ms (``benchmarks/fixer_ops.py``). Exact up to rounding (the folded taps
are summed in float64 and rounded once, to the dtype the model is then cast to). For serving: the fold is computed
from the weights when switched on, so weights changed later are not seen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.upsampling import Upsample2D
from torch import nn

# which of the 3 taps (dy = -1, 0, +1) of a 3x3 kernel land on each of the 4 taps of the transposed kernel, along
# one axis: output row 2m reads rows m-1 (dy=-1) and m (dy=0, +1); output row 2m+1 reads rows m (dy=-1, 0) and m+1
_FOLD = torch.tensor([[0.0, 0.0, 1.0],   # transposed tap 0: input row m+1 for output 2m+1
                      [0.0, 1.0, 1.0],   # tap 1: input row m for output 2m
                      [1.0, 1.0, 0.0],   # tap 2: input row m for output 2m+1
                      [1.0, 0.0, 0.0]])  # tap 3: input row m-1 for output 2m


def fold_upsample_conv_weight(weight: torch.Tensor) -> torch.Tensor:
    """3x3 conv weight ``[C_out, C_in, 3, 3]`` applied after nearest 2x upsampling -> the equivalent
    ``conv_transpose2d`` weight ``[C_in, C_out, 4, 4]`` (stride 2, padding 1), computed in float32 or better."""
    acc = torch.promote_types(weight.dtype, torch.float32)
    fold = _FOLD.to(weight.device, acc)
    folded = torch.einsum("ky,oiyx,lx->oikl", fold, weight.to(acc), fold)
    return folded.transpose(0, 1).contiguous()


class TransposedUpsample2D(Upsample2D):
    """``Upsample2D`` (same parameters and state-dict keys) that runs nearest 2x + 3x3 conv as one transposed conv
    from a folded copy of its conv weight; any call it does not cover (another output size) takes the original
    path."""

    def forward(self, hidden_states: torch.Tensor, output_size=None, *args, **kwargs) -> torch.Tensor:
        h, w = hidden_states.shape[-2:]
        if output_size is not None and tuple(output_size) != (2 * h, 2 * w):
            return super().forward(hidden_states, output_size, *args, **kwargs)
        weight = self.folded_weight.to(hidden_states.dtype)
        bias = None if self.folded_bias is None else self.folded_bias.to(hidden_states.dtype)
        return F.conv_transpose2d(hidden_states, weight, bias, stride=2, padding=1)


def _conv_of(upsample: Upsample2D) -> nn.Conv2d | None:
    """The plain conv an upsampler runs after interpolating (a merged peft LoRA layer's base conv), or None when
    this upsampler is not the nearest-2x-then-3x3 pattern (or has an unmerged adapter)."""
    if (not upsample.use_conv or upsample.use_conv_transpose or not upsample.interpolate
            or upsample.norm is not None):
        return None
    conv = upsample.conv if upsample.name == "conv" else upsample.Conv2d_0
    if hasattr(conv, "get_base_layer"):  # peft LoRA wrapper: only a merged one (or one without adapters) folds
        if getattr(conv, "active_adapters", None) and not getattr(conv, "merged", False):
            return None
        conv = conv.get_base_layer()
    if not isinstance(conv, nn.Conv2d) or conv.kernel_size != (3, 3) or conv.stride != (1, 1) \
            or conv.padding != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1 \
            or conv.padding_mode != "zeros":
        return None
    return conv


@torch.no_grad()
def use_transposed_upsample(model: nn.Module) -> int:
    """Switch every foldable ``Upsample2D`` in ``model`` to :class:`TransposedUpsample2D` in place (parameters and
    keys unchanged; the folded weight is a non-persistent buffer that follows ``.to()``); returns how many were
    switched. Call after merging LoRA; the fold stays in float64 until the model is cast (``FixerRunner`` casts it
    to the dtype it serves in)."""
    switched = 0
    for module in model.modules():
        if type(module) is not Upsample2D:
            continue
        conv = _conv_of(module)
        if conv is None:
            continue
        # kept in float64 until the model is cast to the dtype it serves in: the folded taps are rounded once, there
        module.register_buffer("folded_weight", fold_upsample_conv_weight(conv.weight.to(torch.float64)),
                               persistent=False)
        module.register_buffer("folded_bias", None if conv.bias is None else conv.bias.detach().clone(),
                               persistent=False)
        module.__class__ = TransposedUpsample2D
        switched += 1
    return switched
