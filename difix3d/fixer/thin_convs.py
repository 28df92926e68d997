"""Convolutions with fewer than 8 input or output channels, padded with zero channels to 8.

The VAE's first conv reads the 3 channels of an RGB frame and its last conv writes 3; both run at full resolution.
Tensor-core convolution kernels want channel counts that are multiples of 8 (16 bytes of bf16): with 3 channels
cuDNN falls back to slower kernels or pads internally on every call. Padding the weights once (zero input channels,
zero output filters) and the activation per call gives the same numbers from the fast kernels: the extra input
channels are zeros times zeros, the extra outputs are dropped. For serving: the padded weight is taken from the
weights when switched on, so weights changed later are not seen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MULTIPLE = 8


def _round_up(n: int, multiple: int = MULTIPLE) -> int:
    return -(-n // multiple) * multiple


class PaddedConv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters and state-dict keys) that runs on channel counts padded to a multiple of 8
    from non-persistent padded copies of its weight and bias."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.padded_weight.to(x.dtype)
        bias = None if self.padded_bias is None else self.padded_bias.to(x.dtype)
        pad_in = weight.shape[1] - x.shape[1]
        if pad_in:
            x = F.pad(x, (0, 0, 0, 0, 0, pad_in))  # zero channels at the end (the layout x came in is kept)
            if x.dim() == 4 and self.padded_weight.is_contiguous(memory_format=torch.channels_last):
                x = x.contiguous(memory_format=torch.channels_last)
        y = self._conv_forward(x, weight, bias)
        return y[:, :self.out_channels] if weight.shape[0] != self.out_channels else y


@torch.no_grad()
def use_padded_thin_convs(model: nn.Module) -> int:
    """Switch every plain ``nn.Conv2d`` in ``model`` with fewer than 8 input or output channels (and no groups) to
    :class:`PaddedConv2d` in place; returns how many were switched. Call after merging LoRA (a peft wrapper calls
    its base conv, which is what is switched)."""
    switched = 0
    for module in model.modules():
        if type(module) is not nn.Conv2d or module.groups != 1 or module.padding_mode != "zeros":
            continue
        out_c, in_c = module.weight.shape[:2]
        if in_c >= MULTIPLE and out_c >= MULTIPLE:
            continue
        weight = module.weight.new_zeros(_round_up(out_c), _round_up(in_c), *module.weight.shape[2:])
        weight[:out_c, :in_c] = module.weight
        bias = None
        if module.bias is not None:
            bias = module.bias.new_zeros(_round_up(out_c))
            bias[:out_c] = module.bias
        module.register_buffer("padded_weight", weight, persistent=False)
        module.register_buffer("padded_bias", bias, persistent=False)
        module.__class__ = PaddedConv2d
        switched += 1
    return switched
