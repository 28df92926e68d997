"""What the fixer's memory-bound glue could reach on this GPU: one normalize + SiLU pass, written several ways.

The served fixer's largest Inductor kernels apply a group norm's scale and shift and SiLU to a channels_last bf16
activation (read once, written once). This times that pass at the VAE decoder's largest activation (batch 4,
128x576x1024) against a plain copy of the same bytes, and the per-channel moments that precede it:

- ``copy``: ``torch.Tensor.copy_``, the bandwidth ceiling;
- ``triton_affine``: scale and shift only (hand-written Triton, no activation);
- ``triton_silu_sigmoid`` / ``triton_silu_ex2_rcp`` / ``triton_silu_tanh``: + SiLU as Triton's ``sigmoid``
  (what Inductor emits), as PTX ``ex2.approx`` + ``rcp.approx``, and as ``0.5x(1 + tanh.approx(x/2))`` (one
  special-function instruction per element);
- ``inductor_silu``: the same pass compiled by torch.compile from PyTorch ops (F.silu), as the fixer is served;
- ``inductor_var_mean`` / ``inductor_shifted_sums``: the norm's per-channel moments as compiled today.

    python benchmarks/glue_roofline.py [--batch 4] [--shape 128x576x1024]

Prints GB/s per variant and the largest error of each SiLU against F.silu in float32; figures go to
benchmarks/results/glue_roofline.jsonl (metric ms_per_call, and tb_per_s; settings variant, shape).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from _common import Emitter, cuda_time_ms  # noqa: E402

ACTIVATIONS = {"none": 0, "sigmoid": 1, "ex2_rcp": 2, "tanh": 3}


@triton.jit
def _affine_act(x_ptr, scale_ptr, shift_ptr, y_ptr, n, channels, per_sample, ACT: tl.constexpr,
                BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    c = offs % channels
    sc = (offs // per_sample) * channels + c
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = x * tl.load(scale_ptr + sc, mask=mask, other=1.0) + tl.load(shift_ptr + sc, mask=mask, other=0.0)
    if ACT == 1:
        v = v * tl.sigmoid(v)
    elif ACT == 2:
        e = tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [v * -1.4426950408889634],
                                      dtype=tl.float32, is_pure=True, pack=1)
        r = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [1.0 + e], dtype=tl.float32,
                                      is_pure=True, pack=1)
        v = v * r
    elif ACT == 3:
        h = 0.5 * v
        t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [h], dtype=tl.float32, is_pure=True,
                                      pack=1)
        v = h + h * t
    tl.store(y_ptr + offs, v.to(y_ptr.dtype.element_ty), mask=mask)


def triton_affine_act(x, scale, shift, act: str, block: int = 2048):
    y = torch.empty_like(x)
    b, c, h, w = x.shape
    n = x.numel()
    _affine_act[(triton.cdiv(n, block),)](x, scale, shift, y, n, c, c * h * w, ACT=ACTIVATIONS[act], BLOCK=block,
                                          num_warps=8)
    return y


def time_ms(fn) -> float:
    return cuda_time_ms(fn, iters=50, warmup=5)  # the call counts the figures in RESULTS.md were taken with


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--shape", default="128x576x1024", help="CxHxW")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("glue_roofline.py measures CUDA kernels: run it on a GPU host")
    print(f"torch {torch.__version__}, triton {triton.__version__}", flush=True)
    emitter = Emitter("glue_roofline", write=not args.no_write)
    c, h, w = (int(v) for v in args.shape.split("x"))
    b = args.batch
    torch.manual_seed(0)
    x = torch.randn(b, c, h, w, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    scale = (torch.rand(b, c, device="cuda") + 0.5)
    shift = torch.randn(b, c, device="cuda")
    nbytes = 2 * x.numel() * x.element_size()
    shape = f"{b}x{c}x{h}x{w}"

    def record(variant: str, ms: float, moved: int = nbytes) -> None:
        tbs = moved / ms / 1e9
        print(f"{variant:28s} {ms * 1000:9.1f} us  {tbs:5.2f} TB/s", flush=True)
        emitter.emit("ms_per_call", ms, "ms", variant=variant, shape=shape)
        emitter.emit("tb_per_s", tbs, "TB/s", variant=variant, shape=shape)

    out = torch.empty_like(x)
    record("copy", time_ms(lambda: out.copy_(x)))
    exact = F.silu(x.float() * scale.view(b, c, 1, 1) + shift.view(b, c, 1, 1))
    for act in ACTIVATIONS:
        name = "triton_affine" if act == "none" else f"triton_silu_{act}"
        record(name, time_ms(lambda: triton_affine_act(x, scale, shift, act)))
        if act != "none":
            err = (triton_affine_act(x.float().contiguous(memory_format=torch.channels_last), scale, shift, act)
                   - exact).abs().max().item()
            print(f"{'':28s} max |error| vs F.silu in float32: {err:.2e}", flush=True)
            emitter.emit("max_abs_error", err, "", variant=name, shape=shape)

    def norm_silu(t, s, u):
        return F.silu(t.float() * s.view(b, c, 1, 1) + u.view(b, c, 1, 1)).to(t.dtype)

    exact_fn = torch.compile(norm_silu, dynamic=False)
    record("inductor_silu", time_ms(lambda: exact_fn(x, scale, shift)))
    xv = x.permute(0, 2, 3, 1).reshape(b, h * w, c)
    var_mean = torch.compile(lambda t: torch.var_mean(t.float(), dim=1, correction=0), dynamic=False)
    record("inductor_var_mean", time_ms(lambda: var_mean(xv)), nbytes // 2)

    def shifted(t):
        t = t.float()
        d = t - t[:, :1]
        s1 = d.sum(dim=1)
        return (d * d).sum(dim=1), s1

    shifted_fn = torch.compile(shifted, dynamic=False)
    record("inductor_shifted_sums", time_ms(lambda: shifted_fn(xv)), nbytes // 2)


if __name__ == "__main__":
    main()
