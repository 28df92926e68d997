"""Convs with fewer than 8 channels padded to 8 (``difix3d.fixer.thin_convs``): the same numbers, the same keys."""

import copy

import pytest
import torch
from torch import nn

from difix3d.fixer.model import build_model
from difix3d.fixer.thin_convs import PaddedConv2d, use_padded_thin_convs


@pytest.mark.parametrize("cin,cout,kernel,bias", [(3, 16, 3, True), (16, 3, 3, True), (4, 4, 1, False),
                                                  (3, 3, 3, True)])
def test_padded_conv_equals_the_conv(cin, cout, kernel, bias):
    conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=bias).double()
    padded = copy.deepcopy(conv)
    assert use_padded_thin_convs(nn.Sequential(padded)) == 1 and isinstance(padded, PaddedConv2d)
    assert padded.padded_weight.shape[:2] == (max(8, cout), max(8, cin))
    x = torch.randn(2, cin, 9, 13, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(padded(x), conv(x), atol=1e-12, rtol=1e-12)
        nhwc = padded.to(memory_format=torch.channels_last)
        torch.testing.assert_close(nhwc(x.contiguous(memory_format=torch.channels_last)), conv(x), atol=1e-12,
                                   rtol=1e-12)


def test_wide_and_grouped_convs_are_left_alone():
    model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(3, 8, 3, padding_mode="reflect"))
    assert use_padded_thin_convs(model) == 0
    assert not any(isinstance(m, PaddedConv2d) for m in model.modules())


def test_the_fixer_with_padded_thin_convs_gives_the_same_frames():
    model = build_model("tiny", seed=0).double().eval()
    ref = copy.deepcopy(model)
    switched = use_padded_thin_convs(model)
    assert switched >= 2  # at least the VAE's RGB ends
    assert model.state_dict().keys() == ref.state_dict().keys()
    x = torch.rand(2, 3, 32, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(model(x, None), ref(x, None), atol=1e-10, rtol=1e-10)
