"""Upsamplers as one folded stride-2 transposed conv: the same numbers as nearest 2x + 3x3 conv, keys unchanged."""

import copy

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.upsampling import Upsample2D
from peft import LoraConfig, inject_adapter_in_model

from difix3d.fixer.bundled import default_checkpoint
from difix3d.fixer.runner import FixerRunner
from difix3d.fixer.transposed_upsample import (TransposedUpsample2D, fold_upsample_conv_weight,
                                               use_transposed_upsample)


def _upsampler(cin, cout, bias=True, seed=0):
    torch.manual_seed(seed)
    up = Upsample2D(cin, use_conv=True, out_channels=cout).double()
    if not bias:
        up.conv.bias = None
    return up


@pytest.mark.parametrize("cin,cout,hw,bias", [(8, 8, (7, 9), True), (5, 3, (1, 1), False), (4, 6, (2, 13), True)])
def test_folded_transposed_conv_equals_nearest_upsample_then_conv(cin, cout, hw, bias):
    up = _upsampler(cin, cout, bias)
    ref = copy.deepcopy(up)
    assert use_transposed_upsample(torch.nn.Sequential(up)) == 1 and isinstance(up, TransposedUpsample2D)
    x = torch.randn(2, cin, *hw, dtype=torch.float64)
    expected = ref.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    out = up(x)
    assert out.shape == (2, cout, 2 * hw[0], 2 * hw[1])
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)
    xl = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(up(xl), expected, atol=1e-12, rtol=1e-12)
    assert up.state_dict().keys() == ref.state_dict().keys()  # the fold is not saved


def test_fold_is_the_direct_tap_sum():
    w = torch.arange(9.0).view(1, 1, 3, 3)
    folded = fold_upsample_conv_weight(w)[0, 0]  # [4, 4]: rows/cols (m+1 | m for 2m | m for 2m+1 | m-1)
    rows = [[2], [1, 2], [0, 1], [0]]
    expected = torch.tensor([[float(sum(w[0, 0, r, c] for r in rr for c in cc)) for cc in rows] for rr in rows])
    torch.testing.assert_close(folded, expected)


def test_other_output_sizes_take_the_original_path():
    up = _upsampler(4, 4)
    ref = copy.deepcopy(up)
    use_transposed_upsample(torch.nn.Sequential(up))
    x = torch.randn(1, 4, 5, 6, dtype=torch.float64)
    torch.testing.assert_close(up(x, output_size=(11, 12)), ref(x, output_size=(11, 12)))
    torch.testing.assert_close(up(x, output_size=(10, 12)), ref(x, output_size=(10, 12)), atol=1e-12, rtol=1e-12)


def test_lora_wrapped_convs_fold_only_when_merged():
    up = _upsampler(6, 6)
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["conv"], init_lora_weights=False), up)
    x = torch.randn(1, 6, 4, 5, dtype=torch.float64)
    with torch.no_grad():
        expected = up(x)
    assert use_transposed_upsample(torch.nn.Sequential(up)) == 0  # an active, unmerged adapter: left alone
    up.conv.merge()
    assert use_transposed_upsample(torch.nn.Sequential(up)) == 1
    with torch.no_grad():
        torch.testing.assert_close(up(x), expected, atol=1e-10, rtol=1e-10)


def test_runner_with_folded_upsamplers_matches_the_plain_one():
    plain = FixerRunner.from_checkpoint(default_checkpoint(), device="cpu", transposed_upsample=False)
    folded = FixerRunner.from_checkpoint(default_checkpoint(), device="cpu")
    ups = [m for m in folded.model.modules() if isinstance(m, Upsample2D)]
    assert ups and all(isinstance(m, TransposedUpsample2D) for m in ups)
    assert not any(isinstance(m, TransposedUpsample2D) for m in plain.model.modules())
    assert folded.model.state_dict().keys() == plain.model.state_dict().keys()
    t = torch.rand(2, 3, 40, 56, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(folded.fix(t), plain.fix(t), atol=1e-4, rtol=1e-4)


def test_the_fold_is_rounded_once_to_the_serving_dtype():
    up = _upsampler(8, 8).float()  # a float32 checkpoint...
    ref = copy.deepcopy(up).double()  # ...served in float64: the diffusers path computes from its exact weights
    use_transposed_upsample(torch.nn.Sequential(up))
    assert up.folded_weight.dtype == torch.float64
    up.double()
    x = torch.randn(1, 8, 5, 7, dtype=torch.float64)
    torch.testing.assert_close(up(x), ref(x), atol=1e-12, rtol=1e-12)
