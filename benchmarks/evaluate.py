"""Evaluation throughput: views/s for PSNR + SSIM + LPIPS at 576×1024 on one GPU (or CPU when there is none).

Two figures per run:
- stage=metrics: the metric kernels on images already on the device (what a GPU actor can sustain);
- stage=udf_with_io: difix3d.eval.pipeline.MetricsUDF on PNG files (decode + metrics), i.e. one actor's rate.
LPIPS uses the pretrained AlexNet backbone when it is in the torch hub cache, otherwise a random backbone
(``lpips_weights`` in the row says which; the speed is the same, the values are not).

    python benchmarks/evaluate.py [--height 576 --width 1024 --batch 8 --views 64]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch

from _common import Emitter
from difix3d.device import default_device
from difix3d.eval import metrics as M
from difix3d.eval.perceptual import build_lpips, lpips_availability
from difix3d.eval.pipeline import MetricsUDF
from difix3d.imageio import write_image

METRICS = ("psnr", "ssim", "lpips")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--height", type=int, default=576)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--views", type=int, default=64, help="views timed per figure")
    p.add_argument("--lpips-net", default="alex")
    p.add_argument("--no-write", action="store_true", help="print only, do not append to results/")
    args = p.parse_args()
    emitter = Emitter("evaluate", write=not args.no_write)
    device = default_device()
    weights = "pretrained" if lpips_availability(args.lpips_net, "pretrained").available else "random"
    settings = dict(metrics=",".join(METRICS), height=args.height, width=args.width, batch=args.batch,
                    lpips_net=args.lpips_net, lpips_weights=weights)

    # stage=metrics: device-resident images
    model = build_lpips(args.lpips_net, weights).to(device)
    gen = torch.Generator().manual_seed(0)
    target = torch.rand(args.batch, 3, args.height, args.width, generator=gen).to(device)  # [B, 3, H, W]
    preds = (target + 0.05 * torch.randn(target.shape, generator=gen).to(device)).clamp(0, 1)

    def step():
        with torch.no_grad():
            M.psnr(preds, target), M.ssim(preds, target), M.lpips(model, preds, target)

    step()  # warm-up (cuDNN autotune, allocator)
    _sync(device)
    steps = max(1, args.views // args.batch)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    emitter.emit("views_per_s", steps * args.batch / (time.perf_counter() - t0), "views/s", stage="metrics",
                 **settings)

    # stage=udf_with_io: PNG decode + metrics through the pipeline's actor class
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        gt = rng.integers(0, 256, (args.height, args.width, 3), dtype=np.uint8)
        render = np.clip(gt.astype(np.int16) + rng.integers(-12, 13, gt.shape), 0, 255).astype(np.uint8)
        write_image(os.path.join(tmp, "gt.png"), gt)
        write_image(os.path.join(tmp, "render.png"), render)
        n = args.batch
        batch = {"segment": np.array(["s"] * n, dtype=object),
                 "view": np.array([f"v{i}" for i in range(n)], dtype=object),
                 "method": np.array(["m"] * n, dtype=object),
                 "render_uri": np.array([os.path.join(tmp, "render.png")] * n, dtype=object),
                 "gt_uri": np.array([os.path.join(tmp, "gt.png")] * n, dtype=object)}
        udf = MetricsUDF(METRICS, lpips_net=args.lpips_net, lpips_weights=weights)
        out = udf(batch)
        assert (out["status"] == "ok").all(), out["error"]
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            udf(batch)
        _sync(device)
        emitter.emit("views_per_s", steps * n / (time.perf_counter() - t0), "views/s", stage="udf_with_io",
                     **settings)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
