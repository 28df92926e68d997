"""The approximate SiLU for compiled CUDA serving: exact everywhere else, and close to F.silu where it applies."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from difix3d.fixer import approx_silu
from difix3d.fixer.approx_silu import ApproxSiLU, use_approx_silu


def test_swaps_only_silu_modules_and_is_exact_off_cuda():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.SiLU(), nn.GELU(), nn.Sequential(nn.SiLU()))
    assert use_approx_silu(model) == 2
    assert isinstance(model[1], ApproxSiLU) and type(model[2]) is nn.GELU
    x = torch.randn(2, 3, 9, 9)
    expected = F.silu(F.gelu(F.silu(model[0](x))))
    torch.testing.assert_close(model(x), expected, atol=0, rtol=0)  # eager on CPU: F.silu itself
    torch.testing.assert_close(torch.compile(model)(x), expected, atol=1e-6, rtol=1e-6)  # CPU compile: exact too
    assert use_approx_silu(model) == 0  # already switched


@pytest.mark.gpu
@pytest.mark.skipif(not approx_silu.available(), reason="this torch has no inline-asm op (torch < 2.12)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_on_cuda_is_close_to_silu(dtype):
    x = torch.linspace(-30, 30, 100_003, device="cuda").to(dtype)
    module = ApproxSiLU()
    got = torch.compile(module, fullgraph=True)(x).float()
    exact = F.silu(x.float())
    # tanh.approx's ~2^-11 relative error, seen through 0.5x(1 + tanh(x/2)): at most ~|x| * 2.5e-4 absolute
    assert ((got - exact).abs() <= x.float().abs() * 3e-4 + (8e-3 if dtype == torch.bfloat16 else 1e-6)).all()
    assert not torch.equal(got, F.silu(x).float()) or dtype == torch.bfloat16  # the approximation ran
    torch.testing.assert_close(module(x), F.silu(x))  # eager: F.silu
