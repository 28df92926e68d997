"""Self-attention with heads wider than the fused attention kernels take, as two GEMMs and a softmax.

The VAE's mid blocks attend with one head of 512 channels over every latent pixel (9216 tokens at 576x1024). Flash
and cuDNN attention stop at 256 channels a head, so PyTorch runs it with its generic memory-efficient kernel (~120
TFLOP/s on an H200). Here the scores are a bf16 GEMM with a float32 output (as the fused kernels keep them), the
softmax runs in float32, and the probabilities meet the values in the input's precision: the fused kernels' numerics,
with the query rows split so the float32 scores stay within ``max_score_bytes``. One such attention block, compiled,
bf16, batch 1 on an H200 (``benchmarks/fixer_ops.py``): 1.55 -> 0.57 ms. Frames that would need more than
``MAX_CHUNKS`` splits go to SDPA.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

FUSED_MAX_HEAD_DIM = 256  # flash and cuDNN attention take heads up to this width
MAX_SCORE_BYTES = 512 * 1024 * 1024
# more chunks than this (frames above ~1.5 MPixel at batch 4) go to SDPA instead: torch.compile unrolls the chunk loop,
# and its compile time grows with each chunk
MAX_CHUNKS = 8


def score_chunks(q: torch.Tensor, k: torch.Tensor, max_score_bytes: int = MAX_SCORE_BYTES) -> int:
    """How many query-row chunks :func:`wide_head_attention` splits ``q`` [N, L, D] into."""
    acc = torch.promote_types(q.dtype, torch.float32)
    row_bytes = q.shape[0] * k.shape[1] * torch.empty((), dtype=acc).element_size()
    rows = max(1, min(q.shape[1], max_score_bytes // max(1, row_bytes)))
    return -(-q.shape[1] // rows)


def wide_head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        max_score_bytes: int = MAX_SCORE_BYTES) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for q, k, v ``[N, L, D]`` (any float dtype) -> ``[N, L, D]``. Eager, it holds one
    chunk of float32 scores (at most ``max_score_bytes``) and its probabilities in ``v``'s dtype at a time."""
    n, length, d = q.shape
    scale = d ** -0.5
    kt = k.transpose(1, 2)
    rows = -(-length // score_chunks(q, k, max_score_bytes))
    acc = torch.promote_types(q.dtype, torch.float32)
    outs = []
    for i in range(0, length, rows):
        qi = q[:, i:i + rows]
        if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
            scores = torch.bmm(qi, kt, out_dtype=torch.float32)  # low-precision GEMM, float32 accumulate and output
        else:
            scores = torch.bmm(qi.to(acc), kt.to(acc))
        if torch.compiler.is_compiling():  # Inductor fuses scale and softmax into one kernel and plans the memory
            probs = torch.softmax(scores * scale, dim=-1).to(v.dtype)
        else:  # eager: softmax in place, one block of scores alive instead of three
            scores.mul_(scale)
            scores.sub_(scores.amax(dim=-1, keepdim=True)).exp_()
            probs = scores.div_(scores.sum(dim=-1, keepdim=True)).to(v.dtype)
        del scores
        outs.append(torch.bmm(probs, v))
        del probs
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


class WideHeadAttnProcessor:
    """diffusers attention processor for plain self-attention (no mask, no encoder states, no spatial or q/k norm)
    through :func:`wide_head_attention`; every other call goes to diffusers' ``AttnProcessor2_0`` unchanged."""

    def __init__(self, max_score_bytes: int = MAX_SCORE_BYTES):
        self.max_score_bytes = max_score_bytes
        self.fallback = AttnProcessor2_0()

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs) -> torch.Tensor:
        if (encoder_hidden_states is not None or attention_mask is not None or attn.spatial_norm is not None
                or attn.norm_q is not None or attn.norm_k is not None or args or kwargs):
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        four_d = hidden_states.ndim == 4
        if four_d:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)  # [B, HW, C]
        b, length, _ = hidden_states.shape
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        heads = attn.heads
        d = key.shape[-1] // heads

        def split(t):  # [B, L, heads*d] -> [B*heads, L, d]
            return t.view(b, length, heads, d).transpose(1, 2).reshape(b * heads, length, d)

        query, key, value = split(query), split(key), split(value)
        if score_chunks(query, key, self.max_score_bytes) > MAX_CHUNKS:
            out = torch.nn.functional.scaled_dot_product_attention(query, key, value)
        else:
            out = wide_head_attention(query, key, value, self.max_score_bytes)
        out = out.view(b, heads, length, d).transpose(1, 2).reshape(b, length, heads * d)
        out = attn.to_out[1](attn.to_out[0](out))
        if four_d:
            out = out.transpose(1, 2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def use_wide_head_attention(model: nn.Module, min_head_dim: int = FUSED_MAX_HEAD_DIM + 1) -> int:
    """Give every diffusers ``Attention`` of ``model`` whose heads have ``min_head_dim`` channels or more a
    :class:`WideHeadAttnProcessor` (in sd-turbo: the VAE's two mid-block attentions; the UNet's heads are 64 wide);
    returns how many were switched."""
    switched = 0
    for module in model.modules():
        if isinstance(module, Attention) and module.inner_dim // module.heads >= min_head_dim \
                and type(module.processor) is AttnProcessor2_0:
            module.set_processor(WideHeadAttnProcessor())
            switched += 1
    return switched
