"""The VAE's wide attention heads as two GEMMs and a float32 softmax: the same numbers as diffusers' SDPA path."""

import copy

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from difix3d.fixer.model import build_model
from difix3d.fixer.wide_head_attention import WideHeadAttnProcessor, use_wide_head_attention, wide_head_attention


def _vae_attention(channels=64, groups=8):
    torch.manual_seed(0)
    return Attention(channels, heads=1, dim_head=channels, norm_num_groups=groups, residual_connection=True,
                     bias=True, upcast_softmax=True, _from_deprecated_attn_block=True).double().eval()


@pytest.mark.parametrize("max_bytes", [1 << 30, 4 * 40 * 7])  # one block of scores; 7 query rows at a time
def test_equals_scaled_dot_product_attention(max_bytes):
    q, k, v = torch.randn(3, 2, 40, 24, dtype=torch.float64).unbind(0)
    out = wide_head_attention(q, k, v, max_score_bytes=max_bytes)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))


def test_processor_equals_diffusers_on_the_vae_attention_block():
    ref = _vae_attention()
    ours = copy.deepcopy(ref)
    assert use_wide_head_attention(ours, min_head_dim=64) == 1 and isinstance(ours.processor, WideHeadAttnProcessor)
    x = torch.randn(2, 64, 6, 10, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x))
        xl = x.contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(ours(xl), ref(xl))
        tokens = torch.randn(2, 15, 64, dtype=torch.float64)  # 3-D inputs and cross-attention take their paths too
        ctx = torch.randn(2, 7, 64, dtype=torch.float64)
        torch.testing.assert_close(ours(tokens), ref(tokens))
        torch.testing.assert_close(ours(tokens, encoder_hidden_states=ctx), ref(tokens, encoder_hidden_states=ctx))


def test_only_heads_too_wide_for_fused_kernels_are_switched():
    model = build_model("sd-turbo", device="meta")
    assert use_wide_head_attention(model) == 2  # the VAE encoder's and decoder's mid-block attention
    wide = [n for n, m in model.named_modules() if isinstance(m, Attention)
            and isinstance(m.processor, WideHeadAttnProcessor)]
    assert sorted(wide) == ["vae.decoder.mid_block.attentions.0", "vae.encoder.mid_block.attentions.0"]
    tiny = build_model("tiny")
    assert use_wide_head_attention(tiny) == 0  # 64-wide heads: flash takes them
    assert not any(type(m.processor) is AttnProcessor2_0 and m.inner_dim // m.heads > 256
                   for m in tiny.modules() if isinstance(m, Attention))


@pytest.mark.gpu
def test_bf16_on_cuda_matches_sdpa():
    ref = _vae_attention(512, 32).to("cuda", torch.bfloat16)
    ours = copy.deepcopy(ref)
    use_wide_head_attention(ours)
    x = torch.randn(2, 512, 24, 40, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected, out = ref(x).float(), ours(x).float()
    assert (out - expected).abs().max().item() <= 0.02 * expected.abs().max().item()


def test_chunking_counts_the_score_dtype_and_many_chunks_go_to_sdpa():
    from difix3d.fixer import wide_head_attention as wha

    q = torch.zeros(2, 40, 8)
    assert wha.score_chunks(q, q, max_score_bytes=2 * 40 * 4 * 10) == 4  # float32 scores: 10 rows a chunk
    assert wha.score_chunks(q.double(), q.double(), max_score_bytes=2 * 40 * 4 * 10) == 8  # float64: 5 rows
    ref = _vae_attention()
    ours = copy.deepcopy(ref)
    use_wide_head_attention(ours, min_head_dim=64)
    ours.processor.max_score_bytes = 1  # one query row a chunk: far more than MAX_CHUNKS
    x = torch.randn(1, 64, 6, 10, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x))


def test_eager_softmax_in_place_matches_torch_softmax():
    q, k, v = torch.randn(3, 2, 30, 16).mul(4).unbind(0)  # large logits: the max subtraction matters
    expected = torch.softmax(q @ k.transpose(1, 2) / 4.0, dim=-1) @ v
    torch.testing.assert_close(wide_head_attention(q, k, v, max_score_bytes=2 * 30 * 4 * 7), expected,
                               atol=1e-5, rtol=1e-5)
