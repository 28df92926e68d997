"""Fixing-pool throughput and overhead: frames/s through the Ray pool (1 replica) vs calling FixerRunner in-process,
at 576x1024 with 1, 4 and 16 concurrent callers. Both sides run the same requests (``--request-frames`` frames each,
default = the pool's max batch, so batches match and the difference is the pool's own cost: object store, router,
actor calls). The issue's bar: overhead under 10% at saturation.

    python benchmarks/pool.py                 # sd-turbo on a GPU (random weights: speed only), tiny on CPU
    python benchmarks/pool.py --quick         # fewer frames, callers 1,4 (smoke run)
    python benchmarks/pool.py --request-frames 1   # 1-frame requests: shows cross-caller batching

Figures (benchmarks/results/pool.jsonl): frames_per_s (settings mode: pool|inprocess, callers), overhead_pct
(setting callers), plus the pool's mean batch size and p50/p99 latency per run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Emitter  # noqa: E402

import numpy as np  # noqa: E402


def make_checkpoint(preset: str, checkpoint: str | None, tmp: str) -> str:
    """The checkpoint to serve: ``--checkpoint``, the bundled tiny one, or random ``preset`` weights (speed only)."""
    if checkpoint:
        return checkpoint
    from difix3d.fixer import bundled

    if preset == "tiny":
        return bundled.default_checkpoint()
    from difix3d.fixer.checkpoint import save_checkpoint
    from difix3d.fixer.model import build_model

    return save_checkpoint(build_model(preset, seed=0), os.path.join(tmp, f"difix-{preset}"))


def frames_for(caller: int, n: int, h: int, w: int) -> np.ndarray:
    return np.random.default_rng(caller).integers(0, 256, (n, h, w, 3), dtype=np.uint8)  # [n, H, W, 3]


def run_inprocess(runner, callers: int, requests: int, request_frames: int, h: int, w: int) -> float:
    """``callers`` threads share one runner (it serializes them: one device), each fixing its own requests."""
    inputs = [frames_for(c, request_frames, h, w) for c in range(callers)]
    barrier = threading.Barrier(callers + 1)

    def caller(c):
        barrier.wait()
        for _ in range(requests):
            runner.fix(inputs[c])

    threads = [threading.Thread(target=caller, args=(c,)) for c in range(callers)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    _sync()
    return callers * requests * request_frames / (time.perf_counter() - t0)


def run_pool(client, callers: int, requests: int, request_frames: int, h: int, w: int, window: int) -> float:
    """``callers`` Ray tasks, each keeping ``window`` requests in flight through the pool, start together."""
    import ray

    @ray.remote(num_cpus=0)
    def caller(client, c, start_at):
        images = frames_for(c, request_frames, h, w)
        while time.time() < start_at:
            time.sleep(0.001)
        t0, pending = time.time(), []
        for _ in range(requests):
            pending.append(client.submit(images))
            if len(pending) >= window:
                pending.pop(0).result()
        for f in pending:
            f.result()
        return t0, time.time()

    start_at = time.time() + 2.0 + 0.2 * callers  # every task is scheduled and has its frames before the start
    spans = ray.get([caller.remote(client, c, start_at) for c in range(callers)])
    elapsed = max(e for _, e in spans) - min(s for s, _ in spans)
    return callers * requests * request_frames / elapsed


def _sync():
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
    except Exception:
        pass


def main() -> None:
    import torch

    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="sd-turbo" if cuda else "tiny", choices=("sd-turbo", "tiny"))
    p.add_argument("--checkpoint", default=None, help="serve this checkpoint instead of random preset weights")
    p.add_argument("--height", type=int, default=576)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--callers", default="1,4,16")
    p.add_argument("--frames", type=int, default=None, help="frames per run (split over callers); default 256 GPU")
    p.add_argument("--request-frames", type=int, default=4)
    p.add_argument("--max-batch-size", type=int, default=4)
    p.add_argument("--max-wait-ms", type=float, default=10.0)
    p.add_argument("--window", type=int, default=2, help="requests each caller keeps in flight")
    p.add_argument("--no-compile", action="store_true", help="eager bf16 on both sides (no torch.compile)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-write", action="store_true", help="print only; do not append to results/pool.jsonl")
    args = p.parse_args()
    if args.quick:
        args.callers = "1,4"
        if not cuda:
            args.height, args.width = 64, 96
    frames_total = args.frames or (256 if cuda else 32) // (4 if args.quick else 1)
    callers_list = [int(c) for c in args.callers.split(",")]
    device = "cuda" if cuda else "cpu"
    emitter = Emitter("pool", write=not args.no_write)
    compile_ = cuda and not args.no_compile
    base = {"compiled": compile_, "preset": args.preset, "height": args.height, "width": args.width, "request_frames": args.request_frames,
            "max_batch_size": args.max_batch_size, "replicas": 1}

    import ray

    from difix3d import pool
    from difix3d.fixer import FixerRunner

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_checkpoint(args.preset, args.checkpoint, tmp)
        h, w, rf = args.height, args.width, args.request_frames

        # batch sizes the runs can produce: whole requests up to max_batch_size (a 4-frame request never splits)
        warm_sizes = sorted({min(k * rf, args.max_batch_size) for k in range(1, args.max_batch_size // rf + 1)} or {rf})

        def requests_for(c):
            return max(1, frames_total // (c * rf))

        # in-process first (its own GPU memory is freed before the replica loads)
        runner = FixerRunner.from_checkpoint(ckpt, device=device, compile=compile_)
        for b in warm_sizes:  # warm up every batch size torch.compile specializes on
            runner.fix(frames_for(0, b, h, w))
        inproc = {}
        for c in callers_list:
            inproc[c] = run_inprocess(runner, c, requests_for(c), rf, h, w)
            emitter.emit("frames_per_s", inproc[c], "frames/s", mode="inprocess", callers=c, **base)
        del runner
        if cuda:
            torch.cuda.empty_cache()

        ray.init(include_dashboard=False, log_to_driver=False)
        client = pool.start_pool(ckpt, name="difix3d-bench-pool", min_replicas=1, max_replicas=1,
                                 num_gpus_per_replica=1.0 if cuda else 0.0, num_cpus_per_replica=1,
                                 max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
                                 max_inflight_frames=max(64, 4 * args.max_batch_size), stats_window_s=3600,
                                 compile=compile_)
        try:
            for b in warm_sizes:
                client.fix(frames_for(0, b, h, w))
            for c in callers_list:
                before = client.stats()
                fps = run_pool(client, c, requests_for(c), rf, h, w, args.window)
                after = client.stats()
                batches = after["batches"] - before["batches"]
                frames = after["frames_ok"] - before["frames_ok"]
                emitter.emit("frames_per_s", fps, "frames/s", mode="pool", callers=c,
                             mean_batch_size=frames / max(1, batches), latency_p50_ms=after["latency_p50_ms"],
                             latency_p99_ms=after["latency_p99_ms"], **base)
                emitter.emit("overhead_pct", 100.0 * (inproc[c] - fps) / inproc[c], "%", callers=c, **base)
        finally:
            pool.shutdown_pool("difix3d-bench-pool")
            ray.shutdown()


if __name__ == "__main__":
    main()
