"""Fixer presets: the real SD-Turbo (SD 2.1-base) architecture and a tiny one on the same code path.

Numbers come from Difix3D+ (arXiv 2503.01774, Sec. 4.1: SD-Turbo, one step at tau = 200 i.e. timestep 199) and the
SD-Turbo / SD 2.1-base diffusers configs (unet/config.json, vae/config.json, scheduler/scheduler_config.json).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# torch.compile's modes (FixerRunner, the pool and the fleet take one); the two with CUDA graphs replay recorded
# kernels instead of launching them one by one, which took the compiled sd-turbo fixer from 37.0 to 31.2 ms per
# 576x1024 frame at batch 1 on an H200 (benchmarks/RESULTS.md). Here, away from torch, for the command lines
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")

# LoRA targets of the official Difix / pix2pix-turbo code: a module of the VAE *decoder* named so, or whose name ends
# in "." + one of them, is wrapped (the official Difix code lists the decoder's matching modules by full name; the
# frozen encoder gets none, see difix3d.fixer.model.decoder_lora_modules).
LORA_TARGETS = ("conv1", "conv2", "conv_in", "conv_shortcut", "conv", "conv_out",
                "skip_conv_1", "skip_conv_2", "skip_conv_3", "skip_conv_4",
                "to_k", "to_q", "to_v", "to_out.0")
LORA_ALPHA = 8  # peft's LoraConfig default, which the official code keeps: a delta is scaled by alpha / rank
ADAPTER_NAME = "vae_skip"  # the official adapter name, so .pkl keys match ours


@dataclass
class FixerConfig:
    """Everything needed to rebuild a :class:`~difix3d.fixer.model.DifixModel` (stored in checkpoints' config.json)."""

    preset: str = "sd-turbo"
    unet: dict[str, Any] = field(default_factory=dict)  # UNet2DConditionModel config kwargs
    vae: dict[str, Any] = field(default_factory=dict)  # AutoencoderKL config kwargs
    timestep: int = 199  # tau = 200 beats 600 by 2 dB (paper, Table 1 / Sec. 4.1)
    # DDPM schedule of SD 2.1 / SD-Turbo (scheduler_config.json): scaled_linear 0.00085..0.012, 1000 steps
    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_train_timesteps: int = 1000
    lora_rank: int = 4  # official rank_vae default (Difix train script --lora_rank_vae 4)
    lora_targets: tuple[str, ...] = LORA_TARGETS  # decoder modules, by name or name suffix
    skip_gamma: float = 1.0  # official decoder.gamma
    skip_init: float = 1e-5  # official skip_conv init (nn.init.constant_(w, 1e-5))
    prompt: str = "remove degradation"  # official Difix prompt
    prompt_tokens: int = 77  # CLIP max length; embedding shape [1, prompt_tokens, cross_attention_dim]
    sample_posterior: bool = False  # True: sample the VAE posterior like the original; False: its mean (deterministic)

    @property
    def cross_attention_dim(self) -> int:
        return int(self.unet["cross_attention_dim"])

    @property
    def vae_channels(self) -> tuple[int, ...]:
        return tuple(self.vae["block_out_channels"])

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FixerConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown fixer config keys: {sorted(unknown)}")
        d = dict(d)
        if "lora_targets" in d:
            d["lora_targets"] = tuple(d["lora_targets"])
        return cls(**d)


# SD 2.1-base / SD-Turbo unet/config.json (865.9 M params)
SD_TURBO_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
    norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True, freq_shift=0,
)
# SD 2.1 vae/config.json (83.7 M params)
SD_TURBO_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32, act_fn="silu", sample_size=768, scaling_factor=0.18215,
)

# Tiny: same block types and depth of downsampling (VAE /8, 4 skip convs), widths small enough that the bundled
# checkpoint stays a few MB and a 64x96 image runs on CPU in well under a second.
TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=(2, 4), use_linear_projection=True,
    norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True, freq_shift=0,
)
TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
    block_out_channels=(32, 32, 64, 64),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32, act_fn="silu", sample_size=64, scaling_factor=0.18215,
)

PRESETS = {"sd-turbo": (SD_TURBO_UNET, SD_TURBO_VAE), "tiny": (TINY_UNET, TINY_VAE)}


def preset_config(preset: str = "sd-turbo", **overrides: Any) -> FixerConfig:
    """The :class:`FixerConfig` of a named preset (``"sd-turbo"`` or ``"tiny"``)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown fixer preset {preset!r}; choose one of {sorted(PRESETS)}")
    unet, vae = PRESETS[preset]
    return FixerConfig(preset=preset, unet=_listify(unet), vae=_listify(vae), **overrides)


def _listify(d: dict[str, Any]) -> dict[str, Any]:
    """Tuples → lists so the config JSON round-trips to an equal dict."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
