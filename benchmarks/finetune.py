"""Fine-tuning throughput and memory on a GPU host, and the held-out gain of a trained fixer.

  python benchmarks/finetune.py --gpus 1                       # sd-turbo, 576x1024, batch 1: samples/s, peak GB
  python benchmarks/finetune.py --gpus 8 --height 512 --width 512 --batch 4
  python benchmarks/finetune.py --heldout s3://b/pairs-val --checkpoint path/to/fixer   # heldout_psnr_gain_db

Figures (JSON lines, also appended to benchmarks/results/finetune.jsonl): ``samples_per_s`` (all GPUs together,
after ``--steps // 2`` warm-up steps) and ``peak_mem_gb`` (max over GPUs) with ``preset``, ``height``, ``width``,
``batch``, ``gpus``; ``heldout_psnr_gain_db`` (fixed vs degraded, mean over held-out pairs).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import subprocess
import sys
import tempfile

import numpy as np

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "finetune.jsonl")


def emit(metric: str, value: float, unit: str, **settings) -> None:
    """One figure as a JSON line (DESIGN.md, Testing and measuring)."""
    import torch

    row = {"benchmark": "finetune", "metric": metric, "value": float(value), "unit": unit,
           "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
           "date": dt.date.today().isoformat(), "commit": _commit(),
           "command": "python " + " ".join(shlex.quote(a) for a in sys.argv), **settings}
    line = json.dumps(row)
    print(line, flush=True)
    if os.environ.get("DIFIX3D_BENCH_NO_WRITE"):  # smoke runs on CPU must not land in the results
        return
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "a") as f:
        f.write(line + "\n")


def throughput(args: argparse.Namespace) -> None:
    import ray

    from difix3d.train.config import FinetuneConfig, LossWeights
    from difix3d.train.pairs import write_pair_shard
    from difix3d.train.trainer import finetune

    work = tempfile.mkdtemp(prefix="difix3d-bench-finetune-")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(max(8, 2 * args.gpus * args.batch)):  # synthetic pairs: speed does not depend on content
        target = rng.integers(0, 256, (args.height, args.width, 3), dtype=np.uint8)
        rows.append({"degraded": target, "target": target, "reference": target if args.ref else None,
                     "scene": f"bench-{i}", "camera": "cam"})
    write_pair_shard(os.path.join(work, "pairs", "shard-000.parquet"), rows)
    warmup = args.steps // 2
    cfg = FinetuneConfig(
        train_shards=os.path.join(work, "pairs"), init=args.init or args.preset, name="bench",
        storage_path=os.path.join(work, "runs"), num_workers=max(1, args.gpus), use_gpu=args.gpus > 0,
        cpus_per_worker=args.cpus_per_worker, steps=args.steps, batch_size=args.batch, height=args.height,
        width=args.width, gradient_checkpointing=args.gradient_checkpointing, use_reference=args.ref,
        optimizer=args.optimizer, gpu_memory_limit_gib=args.memory_limit_gib,
        perceptual_weights=args.vgg_weights or "random",  # the stand-in costs the same FLOPs as the real VGG16
        loss=LossWeights(gram_warmup_steps=0),  # Gram on from step 0: the slowest step is what we measure
        log_every=warmup, val_every=10**9, val_rows=0, ckpt_every=10**9, max_failures=0)
    ray.init()
    result = finetune(cfg)
    settings = dict(preset=args.preset, height=args.height, width=args.width, batch=args.batch, gpus=args.gpus,
                    ref=args.ref, gradient_checkpointing=args.gradient_checkpointing, steps=args.steps - warmup,
                    # what --gradient-checkpointing covers, and the optimizer (the 51 GB figure predates both)
                    checkpointed="unet,vae_layers,lpips" if args.gradient_checkpointing else "",
                    optimizer=args.optimizer + ("_fused" if args.optimizer == "adamw" and args.gpus > 0 else ""),
                    memory_limit_gib=args.memory_limit_gib)
    emit("samples_per_s", result.metrics["samples_per_s"], "samples/s", **settings)
    if "peak_mem_gb" in result.metrics:
        emit("peak_mem_gb", result.metrics["peak_mem_gb"], "GB", **settings)
    if "peak_reserved_gb" in result.metrics:
        emit("peak_reserved_gb", result.metrics["peak_reserved_gb"], "GB", **settings)


def heldout_gain(args: argparse.Namespace) -> None:
    import torch

    from difix3d.eval.metrics import ssim
    from difix3d.fixer.checkpoint import load_checkpoint
    from difix3d.imageio import to_tensor
    from difix3d.train.data import ShardIndex, read_rows

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_checkpoint(args.checkpoint, device=device)
    rows = read_rows(ShardIndex.build(args.heldout), args.max_rows)
    gains, before_all, after_all, ssim_before, ssim_after = [], [], [], [], []
    with torch.no_grad():
        for r in rows:
            h, w = (r["target"].shape[0] // 8) * 8, (r["target"].shape[1] // 8) * 8  # the fixer needs multiples of 8
            x, t = (to_tensor(r[k][:h, :w]).to(device) * 2 - 1 for k in ("degraded", "target"))
            ref = to_tensor(r["reference"][:h, :w]).to(device) * 2 - 1 if r["reference"] is not None else None
            out = model(x, ref)
            before, after = (_psnr(a, t) for a in (x, out))
            before_all.append(before)
            after_all.append(after)
            gains.append(after - before)
            ssim_before.append(float(ssim((x + 1) / 2, (t + 1) / 2).mean()))
            ssim_after.append(float(ssim((out.clamp(-1, 1) + 1) / 2, (t + 1) / 2).mean()))
    settings = dict(preset=model.config.preset, checkpoint=args.checkpoint, heldout=args.heldout, pairs=len(rows),
                    psnr_before_db=float(np.mean(before_all)), psnr_after_db=float(np.mean(after_all)),
                    ssim_before=float(np.mean(ssim_before)), ssim_after=float(np.mean(ssim_after)))
    emit("heldout_psnr_gain_db", float(np.mean(gains)), "dB", **settings)


def _psnr(a, b) -> float:
    mse = float((((a - b) / 2) ** 2).mean())
    return 100.0 if mse == 0 else 10.0 * float(np.log10(1.0 / mse))


def _commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True, stderr=subprocess.DEVNULL,
                                       cwd=os.path.dirname(os.path.abspath(__file__))).strip()
    except Exception:
        return "unknown"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=1, help="Ray Train workers, one GPU each (0: one CPU worker)")
    p.add_argument("--preset", default="sd-turbo", choices=["sd-turbo", "tiny"])
    p.add_argument("--init", default="", help="start from this checkpoint instead of the random preset")
    p.add_argument("--height", type=int, default=576)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1, help="per GPU")
    p.add_argument("--steps", type=int, default=20, help="half warm-up, half measured")
    p.add_argument("--ref", action=argparse.BooleanOptionalAction, default=True, help="train with reference views")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "adamw8bit"])
    p.add_argument("--cpus-per-worker", type=float, default=4)
    p.add_argument("--memory-limit-gib", type=float, default=0.0,
                   help="cap each GPU's allocator (e.g. 23: does it fit a 24 GiB card?); beyond it the run fails")
    p.add_argument("--vgg-weights", default="", help="local torchvision vgg16 weights (default: random stand-in)")
    p.add_argument("--heldout", default="", help="held-out pair shards: measure --checkpoint's PSNR gain instead")
    p.add_argument("--checkpoint", default="", help="fixer checkpoint for --heldout")
    p.add_argument("--max-rows", type=int, default=200)
    args = p.parse_args()
    if args.heldout:
        if not args.checkpoint:
            p.error("--heldout needs --checkpoint")
        heldout_gain(args)
    else:
        throughput(args)


if __name__ == "__main__":
    main()
