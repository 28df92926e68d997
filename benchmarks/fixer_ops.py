"""The fixer's serving rewrites, one operation at a time, against diffusers' own path in the same run.

- ``upsample``: diffusers' ``Upsample2D`` (nearest 2x, then 3x3 conv) vs ``TransposedUpsample2D`` (one stride-2
  transposed conv with folded taps) at the three upsamplers of sd-turbo's VAE decoder for a 576x1024 frame.
- ``group_norm``: group norm + SiLU (a resnet's first half) at the VAE's largest activations: ``nn.GroupNorm``, and
  ``ChannelsLastGroupNorm`` with statistics per group (a reduction over strided rows) or per channel (coalesced, then
  combined per group).
- ``vae_attention``: the VAE mid-block attention (one 512-wide head over 9216 latent pixels) through diffusers'
  ``AttnProcessor2_0`` (PyTorch's SDPA) vs ``WideHeadAttnProcessor`` (two GEMMs and a float32 softmax).
- ``unet_attention``: the UNet's widest self-attention (5 heads of 64 over the 9216 tokens of 72x128 latents) through
  each of PyTorch's SDPA backends (flash, cuDNN, memory-efficient), eager: which kernel the default choice leaves.

bf16, channels_last, eager and torch.compile'd, ms per call (CUDA events, after warm-up).

    python benchmarks/fixer_ops.py [--batches 1,4] [--no-compile] [--ops group_norm] [--inductor KEY=VALUE]

Figures go to benchmarks/results/fixer_ops.jsonl (metric ms_per_call; settings op, impl, shape, batch, compiled).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from _common import Emitter  # noqa: E402
from fixer_latency import apply_inductor_options  # noqa: E402

# (channels, input height, input width) of the decoder's upsamplers for a 576x1024 frame (72x128 latents)
UPSAMPLERS = [(512, 72, 128), (512, 144, 256), (256, 288, 512)]
NORMS = [(128, 576, 1024), (256, 576, 1024), (512, 288, 512)]  # the largest group-norm inputs of the VAE
UNET_ATTENTION = (320, 72, 128)  # the UNet's first level for 72x128 latents: 5 heads of 64


class HeadsSDPA(torch.nn.Module):
    """Self-attention kernel alone over an NHWC activation's tokens (q = k = v, heads of 64) on one SDPA backend
    (``None``: PyTorch's own choice)."""

    def __init__(self, backend):
        super().__init__()
        self.backend = backend

    def forward(self, x):
        from torch.nn.attention import sdpa_kernel

        b, c, h, w = x.shape
        t = x.permute(0, 2, 3, 1).reshape(b, h * w, c // 64, 64).transpose(1, 2)
        if self.backend is None:
            return torch.nn.functional.scaled_dot_product_attention(t, t, t)
        with sdpa_kernel([self.backend]):
            return torch.nn.functional.scaled_dot_product_attention(t, t, t)


@torch.no_grad()
def time_call(fn, x, iters: int, warmup: int) -> float:
    for _ in range(warmup):
        fn(x)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn(x)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,4")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--no-compile", action="store_true", help="eager only")
    p.add_argument("--ops", default="upsample,group_norm,vae_attention,unet_attention", help="comma list of the operations to time")
    p.add_argument("--inductor", metavar="KEY=VALUE", action="append", default=[],
                   help="set a torch._inductor.config option for the compiled rows (repeatable)")
    p.add_argument("--no-write", action="store_true", help="print only, do not append to results/")
    args = p.parse_args()
    inductor = apply_inductor_options(args.inductor)
    if not torch.cuda.is_available():
        raise SystemExit("fixer_ops.py measures CUDA kernels: run it on a GPU host")
    torch.backends.cudnn.benchmark = True
    emitter = Emitter("fixer_ops", write=not args.no_write)
    batches = [int(b) for b in args.batches.split(",")]
    compiles = [False] if args.no_compile else [False, True]

    from diffusers.models.attention_processor import Attention
    from diffusers.models.upsampling import Upsample2D

    from difix3d.fixer.channels_last_norm import use_channels_last_group_norm
    from difix3d.fixer.transposed_upsample import use_transposed_upsample
    from difix3d.fixer.wide_head_attention import use_wide_head_attention

    def cases():
        for c, h, w in UPSAMPLERS:
            base = Upsample2D(c, use_conv=True, out_channels=c)
            ours = copy.deepcopy(base)
            assert use_transposed_upsample(torch.nn.Sequential(ours)) == 1
            yield "upsample", f"{c}x{h}x{w}", (c, h, w), {"diffusers": base, "transposed": ours}
        for c, h, w in NORMS:
            impls = {}
            for name in ("native", "nhwc_group_stats", "nhwc_channel_stats", "nhwc_channel_shifted_sums"):
                norm = torch.nn.GroupNorm(32, c, eps=1e-6)
                if name != "native":
                    use_channels_last_group_norm(norm)
                    norm.channel_statistics = name != "nhwc_group_stats"
                    norm.shifted_sums = name == "nhwc_channel_shifted_sums"
                impls[name] = torch.nn.Sequential(norm, torch.nn.SiLU())
            yield "group_norm", f"{c}x{h}x{w}", (c, h, w), impls
        attn = Attention(512, heads=1, dim_head=512, norm_num_groups=32, residual_connection=True, bias=True,
                         upcast_softmax=True, _from_deprecated_attn_block=True)
        ours = copy.deepcopy(attn)
        assert use_wide_head_attention(ours) == 1
        yield "vae_attention", "512x72x128", (512, 72, 128), {"sdpa": attn, "wide": ours}
        from torch.nn.attention import SDPBackend

        c, h, w = UNET_ATTENTION
        yield "unet_attention", f"{c}x{h}x{w}", (c, h, w), {
            "default": HeadsSDPA(None), "flash": HeadsSDPA(SDPBackend.FLASH_ATTENTION),
            "cudnn": HeadsSDPA(SDPBackend.CUDNN_ATTENTION), "efficient": HeadsSDPA(SDPBackend.EFFICIENT_ATTENTION)}

    ops = set(args.ops.split(","))
    for op, shape, (c, h, w), impls in cases():
        if op not in ops:
            continue
        for batch in batches:
            x = torch.randn(batch, c, h, w, device="cuda", dtype=torch.bfloat16)
            x = x.contiguous(memory_format=torch.channels_last)
            outs = {}
            for name, module in impls.items():
                module = module.to("cuda", torch.bfloat16).to(memory_format=torch.channels_last).eval()
                for compiled in compiles:
                    if compiled and op == "unet_attention":
                        continue  # the same kernels compiled or not
                    fn = torch.compile(module, dynamic=False) if compiled else module
                    try:
                        ms = time_call(fn, x, args.iters, args.warmup)
                    except RuntimeError as e:  # an SDPA backend that cannot take this shape or device
                        print(f"# {op} {shape} b{batch}: {name} unavailable: {str(e).splitlines()[0]}", flush=True)
                        continue
                    extra = {"inductor": inductor} if compiled and inductor else {}
                    emitter.emit("ms_per_call", ms, "ms", op=op, impl=name, shape=shape, batch=batch,
                                 compiled=compiled, **extra)
                    with torch.no_grad():
                        outs[name] = fn(x).float()
            first, *rest = outs.values()
            for name, out in zip(list(outs)[1:], rest):
                err = (out - first).abs().max().item() / max(first.abs().max().item(), 1e-6)
                print(f"# {op} {shape} b{batch}: {name} vs {list(outs)[0]} max rel diff {err:.2e}", flush=True)
            torch.compiler.reset()


if __name__ == "__main__":
    main()
