"""Activation memory of the fixer's VAE decoder in training, per up block and per layer (resnet / upsampler).

With gradient checkpointing the backward pass recomputes one checkpointed piece at a time, so the largest piece sets
the activation peak: this measures what each piece saves for backward (bytes passed to autograd's saved-tensor hooks
under bf16 autocast) at a small size on the CPU and scales it to the target size (activations grow with H×W).

    python benchmarks/activation_memory.py                       # sd-turbo, measured at 72x128, scaled to 576x1024

Figures (benchmarks/results/activation_memory.jsonl): ``saved_gb_per_view`` with settings ``block``, ``layer``
(``all`` for the whole block).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from _common import Emitter  # noqa: E402


def saved_bytes(fn, *args) -> tuple[torch.Tensor, int]:
    """(fn(*args), bytes of the tensors autograd saves for backward while running it under bf16 autocast)."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        out = fn(*args)
    return out, total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="sd-turbo")
    p.add_argument("--measure-height", type=int, default=72)
    p.add_argument("--measure-width", type=int, default=128)
    p.add_argument("--height", type=int, default=576, help="size the figures are scaled to")
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()

    from difix3d.fixer.model import build_model

    model = build_model(args.preset)
    model.prepare_for_training()
    model.train()
    dec = model.vae.decoder
    scale = (args.height * args.width) / (args.measure_height * args.measure_width)
    emitter = Emitter("activation_memory", write=not args.no_write)
    settings = dict(preset=args.preset, height=args.height, width=args.width,
                    measured_at=f"{args.measure_height}x{args.measure_width}", autocast="bf16")
    x = torch.rand(1, 3, args.measure_height, args.measure_width) * 2 - 1
    with torch.no_grad():
        z, skips = model.encode(x)
        h = dec.mid_block(dec.conv_in(z / model.vae.config.scaling_factor), None)

    def gb(n: int) -> float:
        return n * scale / 1e9

    for i, block in enumerate(dec.up_blocks):
        h = (h + getattr(dec, f"skip_conv_{i + 1}")(skips[-1 - i] * model.config.skip_gamma)).detach()
        out, whole = saved_bytes(block, h.requires_grad_(True), None)
        emitter.emit("saved_gb_per_view", gb(whole), "GB", block=f"up_blocks.{i}", layer="all", **settings)
        layer_in = h
        for j, resnet in enumerate(block.resnets):
            layer_in, n = saved_bytes(resnet, layer_in, None)
            emitter.emit("saved_gb_per_view", gb(n), "GB", block=f"up_blocks.{i}", layer=f"resnets.{j}", **settings)
        for j, sampler in enumerate(block.upsamplers or []):
            layer_in, n = saved_bytes(sampler, layer_in)
            emitter.emit("saved_gb_per_view", gb(n), "GB", block=f"up_blocks.{i}", layer=f"upsamplers.{j}",
                         **settings)
        h = out.detach()


if __name__ == "__main__":
    main()
