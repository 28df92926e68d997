"""SiLU at one special-function instruction per element, for compiled bf16 serving on NVIDIA GPUs.

Inductor compiles SiLU as ``x / (1 + exp(-x))``: an ``ex2`` and a reciprocal per element, both on the GPU's
special-function units, which bound the kernels that normalize and activate the VAE's full-resolution activations
(see ``ChannelsLastGroupNorm.realized_affine``). Here SiLU is ``0.5x * (1 + tanh(x/2))`` with PTX ``tanh.approx.f32``
(one such instruction; relative error ~2^-11, below bf16's 2^-8 rounding of the activations it feeds), emitted through
PyTorch's ``inline_asm_elementwise`` op so Inductor still fuses it with the norm and the residual adds. Eager calls,
CPUs, float64, and torch builds without the op (before 2.12) take ``F.silu`` unchanged.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    from torch._higher_order_ops import inline_asm_elementwise as _inline_asm
except ImportError:  # torch < 2.12
    _inline_asm = None

TANH_APPROX = "tanh.approx.f32 $0, $1;"


def available() -> bool:
    """Whether this torch has the inline-asm op the approximate SiLU compiles through."""
    return _inline_asm is not None


def approx_silu(x: torch.Tensor) -> torch.Tensor:
    """``x * sigmoid(x)`` as ``h * (1 + tanh.approx(h))`` with ``h = x/2``, in float32, returned in ``x``'s dtype;
    call it under torch.compile on CUDA (:class:`ApproxSiLU` checks)."""
    h = x.float() * 0.5
    t = _inline_asm(h, asm_str=TANH_APPROX, constraints="=f,f", dtype=torch.float32)
    return torch.addcmul(h, h, t).to(x.dtype)


class ApproxSiLU(nn.SiLU):
    """``nn.SiLU`` that compiles to :func:`approx_silu` on CUDA (any float dtype but float64) and is ``F.silu``
    everywhere else: eager, CPU, or without the inline-asm op."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (_inline_asm is not None and torch.compiler.is_compiling() and x.is_cuda
                and x.dtype in (torch.float32, torch.bfloat16, torch.float16)):
            return approx_silu(x)
        return F.silu(x, inplace=self.inplace)


def use_approx_silu(model: nn.Module) -> int:
    """Switch every ``nn.SiLU`` module of ``model`` to :class:`ApproxSiLU` in place; returns how many. Serving only:
    the approximation has no use in training, where float32 gradients want the exact function."""
    switched = 0
    for module in model.modules():
        if type(module) is nn.SiLU:
            module.__class__ = ApproxSiLU
            switched += 1
    return switched
