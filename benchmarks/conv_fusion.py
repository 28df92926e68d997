"""Can cuDNN take the fixer's glue into its convolutions, or run them in FP8? Measured against the plain conv.

After the serving rewrites the fixer's time is cuDNN's convolutions (near the roofline) plus memory-bound glue around
them: each group norm reads a conv's output for its moments, then reads it again to write ``SiLU(x * scale +
shift)`` for the next conv. Two ways out would come from cuDNN itself, through its graph API (the
``nvidia-cudnn-frontend`` package, not a dependency of difix3d):

- **fusion**: the norm's scale/shift and SiLU as the next conv's prologue, and the next norm's statistics as its
  epilogue (``genstats``), so the glue never touches memory;
- **FP8**: e4m3 inputs and weights (per-tensor and per-output-channel scales, bf16 output), twice the tensor-core
  rate on Hopper. Timed without quantizing the input (a served FP8 conv would also pay that pass).

This builds each pattern as a cuDNN graph, times every plan cuDNN offers (up to 8, CUDA events) and the best, and
reports a pattern cuDNN refuses with its reason. Shapes are the VAE's: ``--fusion-shape`` one sample (fusion would
run per sample: the norm's scale and statistics are per sample), ``--fp8-shapes`` batch 4.

    pip install nvidia-cudnn-frontend   # on the GPU host
    python benchmarks/conv_fusion.py [--fusion-shape 256x288x512] [--fp8-shapes 128x576x1024,512x144x256]

Figures go to benchmarks/results/conv_fusion.jsonl: metric ``ms`` (settings ``pattern``, ``dtype``, ``shape``,
``batch``, ``plan``; a refused pattern has ``supported: false`` and its reason) and, for FP8, ``rel_rms_err`` against
the float32 conv.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from _common import Emitter, cuda_time_ms  # noqa: E402

# (name, ops, dtype): ops run in order on the conv input X; "conv" is the 3x3 conv; "genstats" ends the graph with
# the per-channel sum and sum of squares of the tensor so far (also written out)
FUSION_PATTERNS = [
    ("conv", ["conv"], torch.bfloat16),
    ("conv+bias", ["conv", "bias"], torch.bfloat16),
    ("conv+bias+add", ["conv", "bias", "add"], torch.bfloat16),
    ("conv+genstats", ["conv", "genstats"], torch.bfloat16),
    ("conv+genstats", ["conv", "genstats"], torch.float16),
    ("scale+bias+swish+conv", ["scale", "bias", "swish", "conv"], torch.bfloat16),
    ("scale+bias+swish+conv", ["scale", "bias", "swish", "conv"], torch.float16),
    ("scale+bias+relu+conv", ["scale", "bias", "relu", "conv"], torch.float16),
    ("scale+bias+relu+conv+genstats", ["scale", "bias", "relu", "conv", "genstats"], torch.float16),
]


def parse_shape(text: str) -> tuple[int, int, int]:
    c, h, w = (int(v) for v in text.lower().split("x"))
    return c, h, w


def nhwc(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


class Graphs:
    def __init__(self):
        import cudnn

        self.cudnn = cudnn
        self.handle = cudnn.create_handle()
        self.types = {torch.bfloat16: cudnn.data_type.BFLOAT16, torch.float16: cudnn.data_type.HALF,
                      torch.float8_e4m3fn: cudnn.data_type.FP8_E4M3, torch.float32: cudnn.data_type.FLOAT}

    def graph(self):
        c = self.cudnn
        return c.pygraph(io_data_type=c.data_type.BFLOAT16, intermediate_data_type=c.data_type.FLOAT,
                         compute_data_type=c.data_type.FLOAT, handle=self.handle)

    def best_plan(self, g, feeds) -> tuple[float, str]:
        """Finalize the graph, time up to 8 of its plans; (ms, plan name) of the fastest. Raises when cuDNN refuses
        the graph."""
        c = self.cudnn
        g.validate()
        g.build_operation_graph()
        g.create_execution_plans([c.heur_mode.A, c.heur_mode.FALLBACK])
        g.check_support()
        g.build_plans(c.build_plan_policy.ALL)
        best = (float("inf"), "")
        failure = None
        c.set_stream(self.handle, torch.cuda.current_stream().cuda_stream)
        for i in range(min(g.get_execution_plan_count(), 8)):
            try:
                ws = torch.empty(max(g.get_workspace_size_plan_at_index(i), 1), device="cuda", dtype=torch.uint8)
                ms = cuda_time_ms(lambda: g.execute_plan_at_index(feeds, ws, i, handle=self.handle))
            except Exception as error:  # a plan that fails to run is skipped, the others still count
                failure = error
                continue
            best = min(best, (ms, g.get_plan_name_at_index(i)))
        if best[1] == "":
            raise RuntimeError(f"no plan ran; the last one: {failure}")
        return best

    def fusion(self, ops, dtype, c, h, w):
        x = nhwc(torch.randn(1, c, h, w, device="cuda", dtype=dtype))
        weight = nhwc(torch.randn(c, c, 3, 3, device="cuda", dtype=dtype) / (9 * c) ** 0.5)
        g = self.graph()
        t = X = g.tensor_like(x)
        W = g.tensor_like(weight)
        feeds = {X: x, W: weight}
        for op in ops:
            if op in ("scale", "bias"):
                v = torch.randn(1, c, 1, 1, device="cuda", dtype=dtype)
                V = g.tensor_like(v)
                feeds[V] = v
                t = g.scale(input=t, scale=V) if op == "scale" else g.bias(input=t, bias=V)
            elif op == "swish":
                t = g.swish(input=t)
            elif op == "relu":
                t = g.relu(input=t)
            elif op == "conv":
                t = g.conv_fprop(image=t, weight=W, padding=[1, 1], stride=[1, 1], dilation=[1, 1])
            elif op == "add":
                r = nhwc(torch.randn(1, c, h, w, device="cuda", dtype=dtype))
                R = g.tensor_like(r)
                feeds[R] = r
                t = g.add(a=t, b=R)
            elif op == "genstats":
                t.set_output(True).set_data_type(self.types[dtype])
                feeds[t] = nhwc(torch.empty(1, c, h, w, device="cuda", dtype=dtype))
                for s in g.genstats(input=t):
                    s.set_output(True).set_data_type(self.cudnn.data_type.FLOAT)
                    feeds[s] = torch.empty(1, c, 1, 1, device="cuda")
                t = None
        if t is not None:
            t.set_output(True).set_data_type(self.types[dtype])
            feeds[t] = nhwc(torch.empty(1, c, h, w, device="cuda", dtype=dtype))
        return self.best_plan(g, feeds)

    def conv_epilogue(self, x, weight, epilogue):
        """conv(x, weight) then ``epilogue`` [(op, tensor)] of per-tensor/per-channel scale and bias; bf16 out.
        Returns ((ms, plan), output)."""
        g = self.graph()
        X, W = g.tensor_like(x), g.tensor_like(weight)
        feeds = {X: x, W: weight}
        t = g.conv_fprop(image=X, weight=W, padding=[1, 1], stride=[1, 1], dilation=[1, 1],
                         compute_data_type=self.cudnn.data_type.FLOAT)
        for op, v in epilogue:
            V = g.tensor_like(v)
            feeds[V] = v
            t = g.scale(input=t, scale=V) if op == "scale" else g.bias(input=t, bias=V)
        t.set_output(True).set_data_type(self.cudnn.data_type.BFLOAT16)
        y = nhwc(torch.empty(x.shape[0], weight.shape[0], x.shape[2], x.shape[3], device="cuda",
                             dtype=torch.bfloat16))
        feeds[t] = y
        best = self.best_plan(g, feeds)
        g.execute(feeds, torch.empty(max(g.get_workspace_size(), 1), device="cuda", dtype=torch.uint8),
                  handle=self.handle)
        torch.cuda.synchronize()
        return best, y


def refusal(error: Exception) -> str:
    """cuDNN's reasons, one line: the distinct 'Reason:' clauses of its message."""
    reasons = []
    for part in str(error).split("Reason: ")[1:]:
        reason = part.split("\n")[0].strip()
        if reason and reason not in reasons and not reason.startswith(("(CUDNN_STATUS", "ptr->", "finalize",
                                                                      "check_for_support", "initial_compat")):
            reasons.append(reason)
    return "; ".join(reasons)[:400] or str(error)[:400]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--fusion-shape", default="256x288x512", help="CxHxW of the fusion patterns (batch 1)")
    p.add_argument("--fp8-shapes", default="128x576x1024,256x288x512,256x576x1024,512x144x256,512x288x512",
                   help="comma list of CxHxW for the FP8 convs (batch --batch, C in = C out, 3x3)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("conv_fusion.py measures cuDNN on a GPU; no CUDA device here")
    try:
        graphs = Graphs()
    except ImportError:
        raise SystemExit("conv_fusion.py needs cuDNN's Python frontend: pip install nvidia-cudnn-frontend")
    torch.backends.cudnn.benchmark = True
    emitter = Emitter("conv_fusion", write=not args.no_write)
    base = dict(cudnn=graphs.cudnn.backend_version())

    c, h, w = parse_shape(args.fusion_shape)
    x = nhwc(torch.randn(1, c, h, w, device="cuda", dtype=torch.bfloat16))
    weight = nhwc(torch.randn(c, c, 3, 3, device="cuda", dtype=torch.bfloat16))
    emitter.emit("ms", cuda_time_ms(lambda: F.conv2d(x, weight, padding=1)), "ms", pattern="torch conv", dtype="bfloat16",
                 shape=args.fusion_shape, batch=1, supported=True, **base)
    for name, ops, dtype in FUSION_PATTERNS:
        settings = dict(pattern=name, dtype=str(dtype).replace("torch.", ""), shape=args.fusion_shape, batch=1, **base)
        try:
            ms, plan = graphs.fusion(ops, dtype, c, h, w)
        except Exception as error:  # cuDNN refused the graph: that is the finding
            emitter.emit("ms", float("nan"), "ms", supported=False, reason=refusal(error), **settings)
            continue
        emitter.emit("ms", ms, "ms", supported=True, plan=plan, **settings)

    for shape in args.fp8_shapes.split(","):
        c, h, w = parse_shape(shape)
        torch.manual_seed(0)
        x = nhwc(F.silu(torch.randn(args.batch, c, h, w, device="cuda")).bfloat16())  # a normalized activation
        weight = nhwc((torch.randn(c, c, 3, 3, device="cuda") / (9 * c) ** 0.5).bfloat16())
        bias = torch.randn(1, c, 1, 1, device="cuda").bfloat16() * 0.1
        ref = F.conv2d(x.float(), weight.float(), bias.flatten().float(), padding=1)
        common = dict(shape=shape, batch=args.batch, **base)

        def record(pattern, dtype, run):
            try:
                (ms, plan), y = run()
            except Exception as error:
                emitter.emit("ms", float("nan"), "ms", pattern=pattern, dtype=dtype, supported=False,
                             reason=refusal(error), **common)
                return
            emitter.emit("ms", ms, "ms", pattern=pattern, dtype=dtype, supported=True, plan=plan, **common)
            err = (y.float() - ref).square().mean().sqrt() / ref.square().mean().sqrt()
            emitter.emit("rel_rms_err", err.item(), "", pattern=pattern, dtype=dtype, **common)

        emitter.emit("ms", cuda_time_ms(lambda: F.conv2d(x, weight, padding=1)), "ms", pattern="torch conv",
                     dtype="bfloat16", supported=True, **common)
        record("conv+bias", "bfloat16", lambda: graphs.conv_epilogue(x, weight, [("bias", bias)]))
        sx = x.float().abs().amax() / 448  # e4m3's largest finite value
        x8 = nhwc((x.float() / sx).to(torch.float8_e4m3fn))
        sw = weight.float().abs().amax() / 448
        w8 = nhwc((weight.float() / sw).to(torch.float8_e4m3fn))
        record("conv+scale+bias (per-tensor)", "float8_e4m3fn", lambda: graphs.conv_epilogue(
            x8, w8, [("scale", (sx * sw).reshape(1, 1, 1, 1)), ("bias", bias)]))
        swc = weight.float().abs().amax(dim=(1, 2, 3)) / 448
        w8c = nhwc((weight.float() / swc.view(-1, 1, 1, 1)).to(torch.float8_e4m3fn))
        record("conv+scale+bias (per-channel)", "float8_e4m3fn", lambda: graphs.conv_epilogue(
            x8, w8c, [("scale", (sx * swc).reshape(1, c, 1, 1).contiguous()), ("bias", bias)]))


if __name__ == "__main__":
    main()
