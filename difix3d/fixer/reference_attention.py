"""Reference-view mixing: every UNet self-attention runs over the tokens of a view and its reference together.

Difix (paper Sec. 4.1, "reference view conditioning") reshapes the batch ``[(B V), N, C] -> [B, (V N), C]`` before
self-attention so each view attends to the other's tokens; cross-attention and feed-forward stay per view and no
parameter is added, so plain and reference checkpoints share their keys. diffusers lets us swap the attention
processor of ``attn1`` without touching its files; we wrap its own processor instead of re-writing attention.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0


class MultiViewSelfAttnProcessor:
    """Wraps a diffusers self-attention processor; ``num_views`` is set by the model before each UNet call."""

    def __init__(self, inner=None):
        self.inner = inner if inner is not None else AttnProcessor2_0()
        self.num_views = 1

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, temb=None, *args, **kwargs) -> torch.Tensor:
        v = self.num_views
        if v == 1 or encoder_hidden_states is not None:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        bv, n, c = hidden_states.shape  # [B*V, N, C], views of one sample adjacent
        joint = hidden_states.reshape(bv // v, v * n, c)  # [B, V*N, C]
        out = self.inner(attn, joint, None, attention_mask, temb, *args, **kwargs)
        return out.reshape(bv, n, c)


def install_multiview_attention(unet: torch.nn.Module) -> list[MultiViewSelfAttnProcessor]:
    """Wrap the processor of every transformer block's ``attn1`` (self-attention) of ``unet``; returns the wrappers."""
    procs = []
    for name, module in unet.named_modules():
        if isinstance(module, Attention) and name.endswith("attn1") and not module.is_cross_attention:
            if not isinstance(module.processor, MultiViewSelfAttnProcessor):
                module.set_processor(MultiViewSelfAttnProcessor(module.processor))
            procs.append(module.processor)
    return procs
