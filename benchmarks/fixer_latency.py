"""Fixer latency: ms/frame of the sd-turbo Difix (random weights) at 576x1024, batch 1 and 4, with and without a
reference view, for the naive path (fp32 eager, as the original code runs) and ours (bf16, channels_last,
torch.compile). Times the model on device tensors (no host transfers), after warm-up, with CUDA synchronised.

    python benchmarks/fixer_latency.py            # full run on a GPU host
    python benchmarks/fixer_latency.py --quick    # fewer iterations, batch 1 only (smoke test; tiny preset on CPU)

Figures go to benchmarks/results/fixer_latency.jsonl (metrics ms_per_frame and speedup_vs_naive).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from _common import Emitter  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="few iterations, batch 1 only")
    p.add_argument("--preset", default=None, help="sd-turbo (default on CUDA) or tiny (default on CPU)")
    p.add_argument("--height", type=int, default=576)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--batches", default="1,4")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--compile-mode", default="default",
                   help="torch.compile mode of the optimized path ('none' disables compiling)")
    p.add_argument("--paths", default="naive,bf16_eager,optimized",
                   help="naive: fp32 eager; bf16_eager: bf16 + channels_last, no compile; optimized: + torch.compile")
    p.add_argument("--refs", default="false,true", help="comma list: without (false) and with (true) a reference")
    p.add_argument("--stage-compile", action="store_true",
                   help="with --profile: time the stages compiled too (one more compile each; default eager)")
    p.add_argument("--group-norm", default="auto", choices=["auto", "native", "nhwc"],
                   help="bf16 paths: nn.GroupNorm, or ours on NHWC views; auto = FixerRunner's default (nhwc)")
    p.add_argument("--norm-stats", default="auto", choices=["auto", "group", "channel", "channel_shifted_sums"],
                   help="NHWC group norm statistics: per group, per channel (var_mean), or per channel as shifted "
                        "sums; auto = FixerRunner's default")
    p.add_argument("--norm-affine", default="auto", choices=["auto", "inline", "realized"],
                   help="NHWC group norm with channel statistics: scale and shift per element (inline) or once per "
                        "sample and channel by an opaque op (realized); auto = ChannelsLastGroupNorm's default")
    p.add_argument("--upsample", default="auto", choices=["auto", "native", "transposed"],
                   help="bf16 paths: diffusers' nearest 2x + 3x3 conv, or one folded stride-2 transposed conv; "
                        "auto = FixerRunner's default")
    p.add_argument("--vae-attention", default="auto", choices=["auto", "sdpa", "wide"],
                   help="bf16 paths: the VAE's 512-wide attention heads through SDPA, or two GEMMs and a float32 "
                        "softmax; auto = FixerRunner's default")
    p.add_argument("--cudnn-benchmark-limit", type=int, default=None, metavar="N",
                   help="cuDNN algorithms tried per conv shape when autotuning (torch's default 10; 0 = all)")
    p.add_argument("--freezing", action="store_true",
                   help="optimized path: compile with Inductor's freezing (weights as constants, folded)")
    p.add_argument("--inductor", metavar="KEY=VALUE", action="append", default=[],
                   help="set a torch._inductor.config option for the compiled path (repeatable), e.g. "
                        "coordinate_descent_tuning=True")
    p.add_argument("--gpu-lock", metavar="FILE", default=None,
                   help="hold an exclusive lock on FILE while timing or profiling, so that several runs can compile "
                        "side by side on one GPU and still be timed one at a time")
    p.add_argument("--gpu-share", type=int, default=1, metavar="N",
                   help="with --gpu-lock: N runs share the GPU; each waits (up to 15 min) until all N have compiled "
                        "before its first timing, so no compile's autotuning runs beside a timing")
    p.add_argument("--bandwidth", metavar="FILE", default=None,
                   help="instead of timing: compile the last of --paths (default mode) with Inductor's bandwidth "
                        "profile on, run one forward at the first batch and append each Triton kernel's ms, GB and "
                        "GB/s to FILE")
    p.add_argument("--no-write", action="store_true", help="print only, do not append to results/")
    p.add_argument("--profile", metavar="FILE", default=None,
                   help="after timing, profile the last path at the first batch size without a reference and write "
                        "its CUDA kernel table (top 40 by device time) to FILE")
    args = p.parse_args()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    preset = args.preset or ("sd-turbo" if cuda else "tiny")
    if not cuda and (args.height, args.width) == (576, 1024):
        args.height, args.width = 64, 96  # CPU smoke test only: the figures that matter come from a GPU host
    batches = [1] if args.quick else [int(b) for b in args.batches.split(",")]
    refs = [r.strip().lower() for r in args.refs.split(",")]
    if not refs or set(refs) - {"true", "false"}:
        p.error(f"--refs: expected a comma list of true/false, got {args.refs!r}")
    refs = [r == "true" for r in refs]
    iters, warmup = (3, 2) if args.quick else (args.iters, args.warmup)
    emitter = Emitter("fixer_latency", write=not args.no_write)
    inductor = apply_inductor_options(args.inductor)
    if args.cudnn_benchmark_limit is not None:
        torch.backends.cudnn.benchmark_limit = args.cudnn_benchmark_limit
    global GPU_LOCK, GPU_SHARE
    GPU_LOCK, GPU_SHARE = args.gpu_lock, args.gpu_share if args.gpu_lock else 1
    from difix3d.fixer.channels_last_norm import ChannelsLastGroupNorm

    if args.norm_stats != "auto":
        ChannelsLastGroupNorm.channel_statistics = args.norm_stats.startswith("channel")
        ChannelsLastGroupNorm.shifted_sums = args.norm_stats == "channel_shifted_sums"
    if args.norm_affine != "auto":
        ChannelsLastGroupNorm.realized_affine = args.norm_affine == "realized"
    norm_affine = "realized" if ChannelsLastGroupNorm.realized_affine else "inline"
    norm_stats = "group" if not ChannelsLastGroupNorm.channel_statistics else (
        "channel_shifted_sums" if ChannelsLastGroupNorm.shifted_sums else "channel")

    from difix3d.fixer.model import build_model

    if args.bandwidth:
        bandwidth_profile(args, preset, device, batches[0])
        return
    naive_ms = {}
    for path in args.paths.split(","):
        model = build_model(preset, seed=0).eval().requires_grad_(False)
        group_norm = resolve_choice(args.group_norm, "nhwc", "native", path, cuda)
        upsample = resolve_choice(args.upsample, "transposed", "native", path, cuda)
        vae_attention = resolve_choice(args.vae_attention, "wide", "sdpa", path, cuda)
        fwd = prepare(model, path, device, args.compile_mode, group_norm, upsample, vae_attention, args.freezing)
        dtype = torch.float32 if path == "naive" else (torch.bfloat16 if cuda else torch.float32)
        for batch in batches:
            for ref in refs:
                ms = time_forward(fwd, batch, ref, args.height, args.width, device, dtype, path != "naive",
                                  iters, warmup)
                settings = dict(path=path, batch=batch, ref=ref, height=args.height, width=args.width,
                                preset=preset, compile_mode=args.compile_mode if path == "optimized" else "none",
                                group_norm=group_norm,
                                norm_stats=norm_stats if group_norm == "nhwc" else "none",
                                norm_affine=norm_affine if group_norm == "nhwc" else "none", upsample=upsample,
                                vae_attention=vae_attention, freezing=args.freezing and path == "optimized",
                                cudnn_benchmark_limit=torch.backends.cudnn.benchmark_limit)
                if inductor and path == "optimized":
                    settings["inductor"] = inductor
                emitter.emit("ms_per_frame", ms, "ms", **settings)
                if path == "naive":
                    naive_ms[(batch, ref)] = ms
                elif (batch, ref) in naive_ms:
                    emitter.emit("speedup_vs_naive", naive_ms[(batch, ref)] / ms, "x", **settings)
        if args.profile and path == args.paths.split(",")[-1]:
            kinds = write_profile(fwd, batches[0], args.height, args.width, device, dtype, path != "naive",
                                  args.profile, stage_compile=args.stage_compile)
            if kinds:  # the GPU's own time per frame: steadier between runs than the wall clock
                profiled = {**settings, "batch": batches[0], "ref": False,
                            "kernel_kinds": {k: round(v, 4) for k, v in sorted(kinds.items())}}
                emitter.emit("kernel_ms_per_frame", sum(kinds.values()), "ms", **profiled)
        del model, fwd
        if cuda:
            torch.cuda.empty_cache()


@torch.no_grad()
def bandwidth_profile(args, preset: str, device: torch.device, batch: int) -> None:
    """``--bandwidth``: each Inductor kernel of one forward timed alone, with the bytes its arguments hold (Inductor's
    ``profile_bandwidth``): which of the memory-bound kernels run below the GPU's bandwidth."""
    from torch._inductor import config

    from difix3d.fixer.model import build_model

    if device.type != "cuda":
        raise SystemExit("--bandwidth profiles Triton kernels: run it on a GPU host")
    config.profile_bandwidth = True
    config.profile_bandwidth_output = os.path.abspath(args.bandwidth)
    config.benchmark_harness = False  # torch 2.11 calls the harness without its arguments when an output is set
    path = args.paths.split(",")[-1]
    model = build_model(preset, seed=0).eval().requires_grad_(False)
    fwd = prepare(model, path, device, "default", resolve_choice(args.group_norm, "nhwc", "native", path, True),
                  resolve_choice(args.upsample, "transposed", "native", path, True),
                  resolve_choice(args.vae_attention, "wide", "sdpa", path, True))
    x = (torch.rand(batch, 3, args.height, args.width, device=device, dtype=torch.bfloat16) * 2 - 1)
    fwd(x.contiguous(memory_format=torch.channels_last), None)
    sync(device)
    print(f"# kernel bandwidths of one forward (batch {batch}) appended to {args.bandwidth}", flush=True)


GPU_LOCK: str | None = None  # --gpu-lock
GPU_SHARE = 1  # --gpu-share


@contextlib.contextmanager
def gpu_alone():
    """Exclusive use of the GPU among runs that share ``--gpu-lock`` (a no-op without it); the first time, after all
    ``--gpu-share`` runs are ready (compiled)."""
    global GPU_SHARE
    if GPU_LOCK is None:
        yield
        return
    if GPU_SHARE > 1:
        ready = GPU_LOCK + ".ready"
        os.makedirs(ready, exist_ok=True)
        open(os.path.join(ready, str(os.getpid())), "w").close()
        deadline = time.monotonic() + 900
        while len(os.listdir(ready)) < GPU_SHARE and time.monotonic() < deadline:
            time.sleep(1.0)
        GPU_SHARE = 1
    with open(GPU_LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def apply_inductor_options(pairs: list[str]) -> dict:
    """``--inductor KEY=VALUE`` onto ``torch._inductor.config`` (dotted keys reach sub-configs); values parsed as
    Python literals where they are ones. Returns what was set, for the figures' settings."""
    import ast

    from torch._inductor import config

    applied = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise SystemExit(f"--inductor: expected KEY=VALUE, got {pair!r}")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        *parents, name = key.split(".")
        owner = config
        for part in parents:
            owner = getattr(owner, part, None)
        if owner is None or not hasattr(owner, name):
            raise SystemExit(f"--inductor: torch._inductor.config has no option {key!r}")
        setattr(owner, name, value)
        applied[key] = value
    return applied


def resolve_choice(choice: str, ours: str, original: str, path: str, cuda: bool) -> str:
    """A serving rewrite's setting on a path: the original on the naive path and off CUDA; ``auto`` = ours, as
    ``FixerRunner`` runs."""
    if path == "naive" or not cuda:
        return original
    return ours if choice == "auto" else choice


def prepare(model, path: str, device: torch.device, compile_mode: str, group_norm: str = "native",
            upsample: str = "native", vae_attention: str = "sdpa", freezing: bool = False):
    """naive: fp32 eager, NCHW, LoRA unmerged (the original code). bf16_eager: LoRA merged, bf16 weights,
    channels_last (with ``group_norm="nhwc"``, group norms computed on NHWC views; ``upsample="transposed"``,
    upsamplers as folded transposed convs; ``vae_attention="wide"``, the VAE's wide heads as two GEMMs). optimized:
    that plus torch.compile."""
    if path == "naive":
        return model.to(device)
    if path not in ("optimized", "bf16_eager"):
        raise SystemExit(f"unknown path {path!r}")
    model.merge_lora()  # decoder LoRA folded into the base convs: no extra low-rank kernels at full resolution
    if upsample == "transposed":
        from difix3d.fixer.transposed_upsample import use_transposed_upsample

        use_transposed_upsample(model)  # folded in float32, before the cast
    if vae_attention == "wide":
        from difix3d.fixer.wide_head_attention import use_wide_head_attention

        use_wide_head_attention(model)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        model = model.to(device, torch.bfloat16).to(memory_format=torch.channels_last)
        if group_norm == "nhwc":
            from difix3d.fixer.channels_last_norm import use_channels_last_group_norm

            use_channels_last_group_norm(model)
    else:
        model = model.to(device)
    if compile_mode != "none" and path == "optimized":
        if freezing:  # Inductor folds what depends only on weights (the time embedding, the prompt's keys/values)
            from torch._inductor import list_mode_options

            options = {**list_mode_options(compile_mode), "freezing": True}
            model = torch.compile(model, options=options, dynamic=False)
        else:
            model = torch.compile(model, mode=compile_mode, dynamic=False)
    return model


@torch.no_grad()
def time_forward(fwd, batch, ref, h, w, device, dtype, channels_last, iters, warmup) -> float:
    x = torch.rand(batch, 3, h, w, device=device, dtype=dtype) * 2 - 1
    r = torch.rand_like(x) if ref else None
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        r = None if r is None else r.contiguous(memory_format=torch.channels_last)
    for _ in range(warmup):  # includes compilation for this shape
        fwd(x, r)
    sync(device)
    with gpu_alone():
        for _ in range(2):  # settle again after waiting for the GPU
            fwd(x, r)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            fwd(x, r)
        sync(device)
        return (time.perf_counter() - t0) * 1000.0 / (iters * batch)


@torch.no_grad()
def write_profile(fwd, batch, h, w, device, dtype, channels_last, path: str, iters: int = 3,
                  stage_compile: bool = False) -> dict[str, float]:
    """Kernel table of a few warm forwards: where the milliseconds go (convolutions vs norms vs attention). Returns
    GPU ms per frame by kind of kernel (empty off CUDA)."""
    from torch.profiler import ProfilerActivity, profile

    x = torch.rand(batch, 3, h, w, device=device, dtype=dtype) * 2 - 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    fwd(x, None)
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with gpu_alone(), profile(activities=activities) as prof:
        for _ in range(iters):
            fwd(x, None)
        sync(device)
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    averages = prof.key_averages()
    table = averages.table(sort_by=sort, row_limit=60, max_name_column_width=90)
    kinds = kernel_kinds(averages, iters * batch) if device.type == "cuda" else ""
    if device.type == "cuda":
        trace = path + ".trace.json"
        prof.export_chrome_trace(trace)
        kinds += "\n" + idle_gaps(trace, iters, batch)
        os.remove(trace)  # tens of MB; the summary is what is kept
    head = f"# {iters} forwards, batch {batch}, {h}x{w}, no reference\n"
    with open(path, "w") as f:  # the kernel tables first: the stage timings below compile and may fail alone
        f.write(f"{head}{kinds}\n{table}\n")
    print(kinds, table, sep="\n", flush=True)
    stages = stage_breakdown(getattr(fwd, "_orig_mod", fwd), x, compiled=stage_compile and hasattr(fwd, "_orig_mod"))
    with open(path, "w") as f:
        f.write(f"{head}{stages}\n{kinds}\n{table}\n")
    print(stages, flush=True)
    if device.type != "cuda":
        return {}
    return {kind: us / 1000 / (iters * batch) for kind, us in kernel_totals(averages)[0].items()}


# kernel name -> kind, first match wins. Inductor's kernels go first: their names list the ops they fuse, and one
# that adds a conv's bias says "convolution" (an earlier order counted those as cuDNN's); cuDNN's attention kernels
# also say "fprop", so attention comes before convolution
KERNEL_KINDS = (("inductor reduction", re.compile(r"^triton_(red|per)_")),
                ("inductor pointwise", re.compile(r"^triton_poi_")),
                ("attention", re.compile(r"fmha|sdpa|flash|attention", re.I)),
                ("convolution", re.compile(r"fprop|dgrad|conv|implicit_gemm", re.I)),
                ("gemm", re.compile(r"gemm|nvjet|cutlass|cublas", re.I)),
                ("other", re.compile(r"")))


def kernel_kind(name: str) -> str:
    return next(k for k, pattern in KERNEL_KINDS if pattern.search(name))


def kernel_totals(averages) -> tuple[dict[str, float], dict[str, list]]:
    """GPU microseconds by kind of kernel (leaf kernels only, not the aten ops that launch them), and each kind's
    kernels as (us, calls, name)."""
    totals: dict[str, float] = {}
    top: dict[str, list] = {}
    for event in averages:
        us = getattr(event, "self_device_time_total", 0.0)
        if us <= 0 or event.key.startswith("aten::") or event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        kind = kernel_kind(event.key)
        totals[kind] = totals.get(kind, 0.0) + us
        top.setdefault(kind, []).append((us, event.count, event.key))
    return totals, top


def kernel_kinds(averages, frames: int) -> str:
    """GPU milliseconds per frame by kind of kernel, and the 20 costliest kernels of each of the two Inductor kinds
    and of the rest: where the time above the convolutions goes."""
    totals, top = kernel_totals(averages)
    total = sum(totals.values()) or 1.0
    lines = [f"{'kernel kind':20s} {'ms/frame':>9s} {'share':>6s}"]
    for kind, us in sorted(totals.items(), key=lambda kv: -kv[1]):
        lines.append(f"{kind:20s} {us / 1000 / frames:9.3f} {us / total:6.1%}")
    lines.append(f"{'all kernels':20s} {total / 1000 / frames:9.3f}")
    for kind in ("inductor reduction", "inductor pointwise", "other"):
        rows = sorted(top.get(kind, []), reverse=True)[:20]
        if rows:
            lines.append(f"\n{kind}: us/frame  calls/frame  kernel")
            lines += [f"  {us / frames:9.1f} {count / frames:6.1f}  {key[:110]}" for us, count, key in rows]
    return "\n".join(lines) + "\n"


def idle_gaps(trace_path: str, forwards: int, batch: int, top: int = 15) -> str:
    """Where the GPU waits between kernels (what the kernel sums miss): from a chrome trace of ``forwards`` forwards,
    the kernels per forward, the idle time per frame, the gaps by size, and the kernel pairs with the most idle
    time between them (names cut at 60 characters)."""
    import json

    with open(trace_path) as f:
        events = json.load(f).get("traceEvents", [])
    gpu = sorted((e["ts"], e["ts"] + e.get("dur", 0), e["name"]) for e in events
                 if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memset", "gpu_memcpy"))
    if len(gpu) < 2:
        return "idle gaps: no GPU events in the trace\n"
    gaps, pairs = [], {}
    end, prev = gpu[0][1], gpu[0][2]
    for start, stop, name in gpu[1:]:
        if start > end:
            gap = start - end
            gaps.append(gap)
            key = (prev[:60], name[:60])
            n, us = pairs.get(key, (0, 0.0))
            pairs[key] = (n + 1, us + gap)
        if stop >= end:
            end, prev = stop, name
    frames = forwards * batch
    span = gpu[-1][1] - gpu[0][0]
    lines = [f"idle gaps: {len(gpu) / forwards:.0f} GPU events per forward; span {span / 1000 / frames:.3f} ms/frame, "
             f"idle {sum(gaps) / 1000 / frames:.3f} ms/frame in {len(gaps) / forwards:.0f} gaps per forward"]
    for lo, hi in ((0, 2), (2, 5), (5, 10), (10, 50), (50, float("inf"))):
        sel = [g for g in gaps if lo <= g < hi]
        lines.append(f"  gaps {lo:>3}-{hi:<4} us: {len(sel) / forwards:7.1f} per forward, "
                     f"{sum(sel) / 1000 / frames:.3f} ms/frame")
    lines.append(f"idle us/frame  gaps/forward  after -> before")
    for (a, b), (n, us) in sorted(pairs.items(), key=lambda kv: -kv[1][1])[:top]:
        lines.append(f"  {us / frames:9.1f} {n / forwards:6.1f}  {a} -> {b}")
    return "\n".join(lines) + "\n"


@torch.no_grad()
def stage_breakdown(model, x, compiled: bool, iters: int = 5) -> str:
    """ms and achieved TFLOP/s of encode, denoise (UNet) and decode, each timed alone (compiled alone when the
    forward was compiled): the stage furthest from the roofline is the one to work on."""
    from torch.utils.flop_counter import FlopCounterMode

    z, skips = model.encode(x)
    z0 = model.denoise(z)
    stages = {"encode": (model.encode, (x,)), "denoise": (model.denoise, (z,)), "decode": (model.decode, (z0, skips))}
    lines = [f"{'stage':8s} {'ms':>8s} {'TFLOP':>8s} {'TFLOP/s':>8s}"]
    for name, (fn, args) in stages.items():
        try:
            with FlopCounterMode(display=False) as counter:
                fn(*args)
            flops = counter.get_total_flops()
        except TypeError:  # torch's counter rejects some calls (bmm with out_dtype, wide-head attention's GEMMs)
            flops = float("nan")
        run = torch.compile(fn, dynamic=False) if compiled else fn
        for _ in range(3):
            run(*args)
        sync(x.device)
        t0 = time.perf_counter()
        for _ in range(iters):
            run(*args)
        sync(x.device)
        ms = (time.perf_counter() - t0) * 1000.0 / iters
        lines.append(f"{name:8s} {ms:8.2f} {flops / 1e12:8.3f} {flops / 1e9 / max(ms, 1e-6):8.1f}")
    return "\n".join(lines)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    main()
