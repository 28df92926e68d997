"""Activation memory of the fixer's VAE decoder in training, per up block and per layer (resnet / upsampler).

With gradient checkpointing the backward pass recomputes one checkpointed piece at a time, so the largest piece sets
the activation peak: this measures what each piece saves for backward (bytes passed to autograd's saved-tensor hooks
under bf16 autocast) on the CPU at two small sizes and extrapolates linearly in H×W to the target size (activations
grow with H×W; the bf16 weight copies autocast saves do not).

    python benchmarks/activation_memory.py         # sd-turbo, measured at 72x128 and 144x256, extrapolated to 576x1024

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
    p.add_argument("--measure-sizes", default="72x128,144x256", help="two sizes HxW to measure at")
    p.add_argument("--height", type=int, default=576, help="size the figures are extrapolated to")
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.measure_sizes.split(",")]
    if len(sizes) != 2 or sizes[0][0] * sizes[0][1] == sizes[1][0] * sizes[1][1]:
        p.error("--measure-sizes needs two sizes with different pixel counts, e.g. 72x128,144x256")

    from difix3d.fixer.model import build_model

    model = build_model(args.preset)
    model.prepare_for_training()
    model.train()
    (a, b), (c, d) = sizes
    small, large = pieces(model, a, b), pieces(model, c, d)
    emitter = Emitter("activation_memory", write=not args.no_write)
    settings = dict(preset=args.preset, height=args.height, width=args.width, measured_at=args.measure_sizes,
                    autocast="bf16")
    target = args.height * args.width
    for key in small:  # bytes = fixed + per_pixel * H * W, fitted through the two sizes
        per_pixel = (large[key] - small[key]) / (c * d - a * b)
        fixed = small[key] - per_pixel * a * b
        block, layer = key
        emitter.emit("saved_gb_per_view", (fixed + per_pixel * target) / 1e9, "GB", block=block, layer=layer,
                     **settings)


def pieces(model, height: int, width: int) -> dict[tuple[str, str], int]:
    """{(block, layer): bytes saved for backward} of the decoder's up blocks for one view at height x width."""
    dec = model.vae.decoder
    x = torch.rand(1, 3, height, width) * 2 - 1
    with torch.no_grad():
        z, skips = model.encode(x)
        h = dec.mid_block(dec.conv_in(z / model.vae.config.scaling_factor), None)
    out_bytes = {}
    for i, block in enumerate(dec.up_blocks):
        name = f"up_blocks.{i}"
        h = (h + getattr(dec, f"skip_conv_{i + 1}")(skips[-1 - i] * model.config.skip_gamma)).detach()
        out, out_bytes[(name, "all")] = saved_bytes(block, h.requires_grad_(True), None)
        layer_in = h
        for j, resnet in enumerate(block.resnets):
            layer_in, out_bytes[(name, f"resnets.{j}")] = saved_bytes(resnet, layer_in, None)
        for j, sampler in enumerate(block.upsamplers or []):
            layer_in, out_bytes[(name, f"upsamplers.{j}")] = saved_bytes(sampler, layer_in)
        h = out.detach()
    return out_bytes


if __name__ == "__main__":
    main()
