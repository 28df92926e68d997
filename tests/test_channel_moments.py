"""The Triton per-channel moments behind group norm's statistics on CUDA: checked on the CPU through Triton's
interpreter (a subprocess, as the interpreter is chosen at import), and against nn.GroupNorm on a GPU."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from difix3d.fixer import channel_moments
from difix3d.fixer.channels_last_norm import use_channels_last_group_norm

pytestmark = pytest.mark.skipif(not channel_moments.available(), reason="needs triton")


def test_rows_per_program_tiles_the_rows():
    assert channel_moments.rows_per_program(1, 10, 128) == channel_moments.BLOCK_R
    per = channel_moments.rows_per_program(1, 576 * 1024, 128)
    assert per % channel_moments.BLOCK_R == 0 and 576 * 1024 / per <= 2 * channel_moments.TARGET_PROGRAMS
    assert channel_moments.rows_per_program(64, 10**7, 512) == 4096  # capped


def test_channel_var_mean_rejects_other_layouts():
    with pytest.raises(ValueError, match=r"contiguous \[B, R, C\]"):
        channel_moments.channel_var_mean(torch.zeros(2, 8, 4, 4))


def test_kernel_matches_float64_var_mean_in_the_interpreter():
    """Several tiles per band, a short last band and tile, channels beyond one block, large means (cancellation)."""
    script = textwrap.dedent("""
        import torch
        from difix3d.fixer import channel_moments as cm
        cm.TARGET_PROGRAMS = 3  # long bands: many tiles merged per program
        torch.manual_seed(0)
        for shape, dtype in [((2, 1000, 256), torch.bfloat16), ((1, 3001, 130), torch.float32),
                             ((3, 7, 40), torch.float32)]:
            x = (torch.randn(*shape) * 3 + torch.linspace(-500, 500, shape[-1])).to(dtype)
            var, mean = cm.channel_var_mean(x)
            assert var.dtype == mean.dtype == torch.float32 and var.shape == mean.shape == (shape[0], shape[2])
            rv, rm = torch.var_mean(x.double(), dim=1, correction=0)
            mean_err = (mean.double() - rm).abs().max() / rm.abs().max()  # float32 accumulation: ~1e-7 relative
            assert mean_err < 1e-5, (shape, mean_err)
            assert ((var.double() - rv).abs() / rv).max() < 1e-4, (shape, ((var.double() - rv).abs() / rv).max())
        print("ok")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.parametrize("compiled", [False, True])
def test_group_norm_with_triton_statistics_matches_nn_group_norm_on_cuda(compiled):
    torch.manual_seed(0)
    ref = torch.nn.GroupNorm(32, 256, eps=1e-6)
    torch.nn.init.normal_(ref.weight)
    torch.nn.init.normal_(ref.bias)
    ref = ref.to("cuda", torch.bfloat16)
    ours = torch.nn.GroupNorm(32, 256, eps=1e-6).to("cuda", torch.bfloat16)
    ours.load_state_dict(ref.state_dict())
    use_channels_last_group_norm(ours)
    assert ours.channel_statistics and ours.triton_statistics
    x = (torch.randn(2, 256, 72, 130, device="cuda") * 4 + 20).to(torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last)
    run = torch.compile(ours, dynamic=False, fullgraph=True) if compiled else ours  # no graph break at the op
    with torch.no_grad():
        got, want = run(x).float(), ref(x.contiguous()).float()
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert (got - want).abs().max() < 0.05 * want.abs().max()
    assert (got - want).abs().mean() < 1e-2
