"""The channels_last group norm used for serving: the same numbers, keys and layouts as nn.GroupNorm."""

import pytest
import torch
import torch.nn as nn

from difix3d.fixer.bundled import default_checkpoint
from difix3d.fixer.channels_last_norm import ChannelsLastGroupNorm, use_channels_last_group_norm
from difix3d.fixer.runner import FixerRunner


def _pair(groups, channels, affine):
    torch.manual_seed(0)
    ref = nn.GroupNorm(groups, channels, eps=1e-6, affine=affine)
    if affine:
        nn.init.normal_(ref.weight)
        nn.init.normal_(ref.bias)
    ours = nn.GroupNorm(groups, channels, eps=1e-6, affine=affine)
    ours.load_state_dict(ref.state_dict())
    assert use_channels_last_group_norm(ours) == 1 and isinstance(ours, ChannelsLastGroupNorm)
    return ref, ours


@pytest.mark.parametrize("groups,channels,affine,hw", [(32, 128, True, (12, 20)), (32, 64, False, (7, 5)),
                                                       (4, 8, True, (1, 1)), (1, 6, True, (9, 3))])
def test_equals_group_norm_on_channels_last_inputs(groups, channels, affine, hw):
    ref, ours = _pair(groups, channels, affine)
    x = (torch.randn(3, channels, *hw) * 3 + 5).contiguous(memory_format=torch.channels_last)
    y = ours(x)
    torch.testing.assert_close(y, ref(x), atol=2e-5, rtol=1e-5)
    assert y.is_contiguous(memory_format=torch.channels_last) and y.dtype == x.dtype
    xb, ref_b, ours_b = x.bfloat16(), ref.bfloat16(), ours.bfloat16()  # stats in float32 as PyTorch's kernel
    torch.testing.assert_close(ours_b(xb).float(), ref_b(xb).float(), atol=0.02, rtol=0.01)


def test_other_layouts_take_group_norms_own_path_and_gradients_flow():
    ref, ours = _pair(8, 16, True)
    for x in (torch.randn(2, 16, 5, 6), torch.randn(2, 16, 30)):  # NCHW and 3-D inputs
        torch.testing.assert_close(ours(x), ref(x))
    x = torch.randn(2, 16, 5, 6).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    ours(x).square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    ref(x2).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, atol=1e-4, rtol=1e-4)


def test_keys_are_unchanged_and_a_channels_last_runner_matches_the_plain_one():
    plain = FixerRunner.from_checkpoint(default_checkpoint(), device="cpu")
    nhwc = FixerRunner.from_checkpoint(default_checkpoint(), device="cpu", channels_last=True, nhwc_group_norm=True)
    norms = [m for m in nhwc.model.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(isinstance(m, ChannelsLastGroupNorm) for m in norms)
    assert not any(isinstance(m, ChannelsLastGroupNorm) for m in plain.model.modules())
    assert nhwc.model.state_dict().keys() == plain.model.state_dict().keys()
    t = torch.rand(2, 3, 40, 56, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(nhwc.fix(t), plain.fix(t), atol=1e-4, rtol=1e-4)


def test_float64_inputs_keep_float64_statistics():
    ref, ours = _pair(4, 8, True)
    ref, ours = ref.double(), ours.double()
    x = (torch.randn(2, 8, 6, 5, dtype=torch.float64) + 1e4).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(ours(x), ref(x.contiguous()), atol=1e-9, rtol=1e-9)


def test_runner_default_uses_the_nhwc_norm_on_channels_last_models():
    def nhwc_norms(runner):
        return sum(isinstance(m, ChannelsLastGroupNorm) for m in runner.model.modules())

    eager = FixerRunner.from_checkpoint(default_checkpoint(), device="cpu", channels_last=True)
    assert eager.nhwc_group_norm and nhwc_norms(eager) > 0
    compiled = FixerRunner.from_checkpoint(default_checkpoint(), device="cpu", channels_last=True, compile=True)
    assert compiled.nhwc_group_norm and nhwc_norms(compiled) > 0  # measured faster compiled too (RESULTS.md)
    nchw = FixerRunner.from_checkpoint(default_checkpoint(), device="cpu", channels_last=False)
    assert not nchw.nhwc_group_norm and nhwc_norms(nchw) == 0
    off = FixerRunner.from_checkpoint(default_checkpoint(), device="cpu", channels_last=True, compile=True,
                                      nhwc_group_norm=False)
    assert not off.nhwc_group_norm and nhwc_norms(off) == 0


@pytest.mark.parametrize("groups,channels,hw", [(32, 128, (12, 20)), (4, 8, (1, 1)), (1, 6, (9, 3))])
def test_per_channel_statistics_equal_the_per_group_ones(groups, channels, hw):
    ref, ours = _pair(groups, channels, True)
    ours.channel_statistics = True
    torch.manual_seed(2)  # channel means far apart and far from zero: the between-channel term carries the variance
    x = (torch.randn(2, channels, *hw) + torch.randn(1, channels, 1, 1) * 20 + 50).contiguous(
        memory_format=torch.channels_last)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=1e-4)
    x64, ref64, ours64 = x.double(), ref.double(), ours.double()
    torch.testing.assert_close(ours64(x64), ref64(x64), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("groups,channels,hw", [(32, 128, (12, 20)), (4, 8, (1, 1)), (1, 6, (9, 3))])
def test_shifted_sum_statistics_equal_var_mean(groups, channels, hw):
    ref, ours = _pair(groups, channels, True)
    ours.channel_statistics, ours.shifted_sums = True, True
    torch.manual_seed(3)  # means 50x the spread: plain sums of squares would cancel away most of the variance
    x = (torch.randn(2, channels, *hw) + torch.randn(1, channels, 1, 1) * 20 + 50).contiguous(
        memory_format=torch.channels_last)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=1e-4)
    x64, ref64, ours64 = x.double(), ref.double(), ours.double()
    torch.testing.assert_close(ours64(x64), ref64(x64), atol=1e-11, rtol=1e-11)


@pytest.mark.parametrize("affine", [True, False])
def test_realized_affine_equals_the_inline_one_eager_and_compiled(affine, monkeypatch):
    import difix3d.fixer.channels_last_norm as cln

    ref, ours = _pair(8, 32, affine)
    ours.requires_grad_(False)  # a serving path: the opaque op has no backward
    ours.channel_statistics, ours.realized_affine, ours.realized_affine_min_elements = True, True, 0
    torch.manual_seed(4)
    x = (torch.randn(3, 32, 10, 14) * 2 + 5).contiguous(memory_format=torch.channels_last)
    calls = []
    op = cln.group_norm_scale_shift
    monkeypatch.setattr(cln, "group_norm_scale_shift", lambda *a: calls.append(1) or op(*a))
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)
    assert calls  # the realized path ran
    monkeypatch.setattr(cln, "group_norm_scale_shift", op)
    assert ours(x).is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(torch.compile(ours)(x), ref(x), atol=1e-5, rtol=1e-5)
    x64, ref64, ours64 = x.double(), ref.double(), ours.double()
    torch.testing.assert_close(ours64(x64), ref64(x64), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("realized", [False, True])
def test_a_group_norm_with_a_weight_and_no_bias(realized):
    """torch's GroupNorm(bias=False): a weight alone, on every path of ours."""
    try:
        ref = nn.GroupNorm(4, 16, eps=1e-6, bias=False)
    except TypeError:
        pytest.skip("this torch's GroupNorm has no bias argument")
    nn.init.normal_(ref.weight)
    ours = nn.GroupNorm(4, 16, eps=1e-6, bias=False)
    ours.load_state_dict(ref.state_dict())
    use_channels_last_group_norm(ours)
    ours.realized_affine, ours.realized_affine_min_elements = realized, 0
    x = (torch.randn(2, 16, 6, 5) * 2 + 1).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=2e-5, rtol=1e-5)
    ours.weight.requires_grad_(False)
    torch.testing.assert_close(ours(x), ref(x).detach(), atol=2e-5, rtol=1e-5)  # grad on, nothing trains


def test_realized_affine_steps_aside_whenever_a_gradient_flows():
    """The scale/shift op has no derivative: any gradient (a trainable bias alone, forward mode) takes the inline
    path, which gives nn.GroupNorm's gradients."""
    ref, ours = _pair(4, 8, True)
    ours.realized_affine, ours.realized_affine_min_elements = True, 0
    x = torch.randn(2, 8, 5, 6).contiguous(memory_format=torch.channels_last)
    ours.weight.requires_grad_(False), ref.weight.requires_grad_(False)  # the bias alone trains
    ours(x).pow(2).sum().backward()
    ref(x).pow(2).sum().backward()
    torch.testing.assert_close(ours.bias.grad, ref.bias.grad, atol=1e-5, rtol=1e-5)
    ours.requires_grad_(False), ref.requires_grad_(False)
    v = torch.randn_like(x)
    _, tangent = torch.func.jvp(ours, (x,), (v,))
    _, expected = torch.func.jvp(ref, (x,), (v,))
    torch.testing.assert_close(tangent, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("groups,channels,affine", [(32, 128, "both"), (32, 512, "none"), (2, 6, "both"),
                                                    (1, 5, "both"), (3, 12, "weight"), (24, 72, "bias")])
def test_triton_scale_shift_equals_the_pytorch_op(groups, channels, affine):
    """The one-kernel scale/shift (scale_shift_kernel.py) gives the PyTorch op's numbers, eagerly and inside a
    compiled graph, for power-of-two groups and channels per group and not, with a weight, a bias, both or none."""
    from difix3d.fixer import scale_shift_kernel
    from difix3d.fixer.channels_last_norm import group_norm_scale_shift

    assert scale_shift_kernel.available()
    torch.manual_seed(0)
    mean = torch.randn(3, channels, device="cuda") * 4
    var = torch.rand(3, channels, device="cuda") * 9
    weight = torch.randn(channels, device="cuda", dtype=torch.bfloat16) if affine in ("both", "weight") else None
    bias = torch.randn(channels, device="cuda", dtype=torch.bfloat16) if affine in ("both", "bias") else None
    expected = group_norm_scale_shift(mean, var, weight, bias, groups, 1e-6)
    got = scale_shift_kernel.group_norm_scale_shift_triton(mean, var, weight, bias, groups, 1e-6)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
    compiled = torch.compile(scale_shift_kernel.group_norm_scale_shift_triton, fullgraph=True)
    for e, g in zip(expected, compiled(mean, var, weight, bias, groups, 1e-6)):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=f"divisible by {channels + 1} groups"):
        scale_shift_kernel.group_norm_scale_shift_triton(mean, var, None, None, channels + 1, 1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_triton_scale_shift_runs_on_its_tensors_gpu_not_the_current_one():
    from difix3d.fixer import scale_shift_kernel
    from difix3d.fixer.channels_last_norm import group_norm_scale_shift

    mean, var = torch.randn(2, 64, device="cuda:1"), torch.rand(2, 64, device="cuda:1")
    assert torch.cuda.current_device() == 0
    got = scale_shift_kernel.group_norm_scale_shift_triton(mean, var, None, None, 32, 1e-6)
    for e, g in zip(group_norm_scale_shift(mean, var, None, None, 32, 1e-6), got):
        assert g.device == mean.device
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_served_norm_on_cuda_uses_the_triton_scale_shift_and_matches_group_norm(monkeypatch):
    from difix3d.fixer import scale_shift_kernel

    ref, ours = _pair(32, 128, True)
    ref, ours = ref.cuda().requires_grad_(False), ours.cuda().requires_grad_(False)
    ours.realized_affine_min_elements = 0
    calls = []
    fn = scale_shift_kernel.group_norm_scale_shift_triton
    monkeypatch.setattr(scale_shift_kernel, "group_norm_scale_shift_triton", lambda *a: calls.append(1) or fn(*a))
    x = (torch.randn(2, 128, 24, 40, device="cuda") * 3 + 2).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=2e-5, rtol=1e-5)
    assert calls
