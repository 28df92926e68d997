"""The Difix network: SD-Turbo's VAE encoder -> one UNet step at t=199 -> x0 -> VAE decoder with encoder skips.

Built from diffusers' ``UNet2DConditionModel`` and ``AutoencoderKL``. The encoder and decoder passes below call
diffusers' own submodules in their order (no forked files): we need the activations entering each encoder down block
and to add 1x1 skip convs of them before each decoder up block, which ``AutoencoderKL.encode/decode`` do not expose.
Skip convs live on ``vae.decoder`` as ``skip_conv_1..4`` and LoRA is a peft adapter ``vae_skip`` on the decoder, so our
keys are the official Difix keys (paper Sec. 4.1; official ``src/model.py``).
"""

from __future__ import annotations

import math

import torch
import torch.utils.checkpoint
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.unets.unet_2d_blocks import DownEncoderBlock2D, UpDecoderBlock2D
from peft import LoraConfig
from torch import nn

from difix3d.fixer.config import ADAPTER_NAME, LORA_ALPHA, FixerConfig, preset_config
from difix3d.fixer.reference_attention import install_multiview_attention


def build_model(preset: str = "tiny", seed: int = 0, device: str | torch.device | None = None) -> "DifixModel":
    """A Difix model of ``preset`` with random weights (seeded), in fp32 on ``device`` (CPU by default;
    ``"meta"`` builds without allocating, e.g. to count the 866 M parameters of ``sd-turbo``)."""
    config = preset_config(preset)
    with torch.device(device or "cpu"):
        gen = torch.random.fork_rng(devices=[]) if str(device or "cpu") != "meta" else _null()
        with gen:
            torch.manual_seed(seed)
            unet = UNet2DConditionModel(**config.unet)
            vae = AutoencoderKL(**config.vae)
            prompt = torch.randn(1, config.prompt_tokens, config.cross_attention_dim)  # untrained stand-in
            return DifixModel(config, unet, vae, prompt)


class DifixModel(nn.Module):
    """``forward(x, ref=None)``: x, ref ``[B, 3, H, W]`` in [-1, 1] (H, W multiples of 8) -> fixed ``[B, 3, H, W]``.

    ``unet`` and ``vae`` are plain diffusers models with their base weights; this module adds the skip convs, the LoRA
    adapter and the reference-view attention to them. ``prompt_embeds`` ``[1, 77, D]`` is the cached text embedding of
    ``config.prompt`` so serving never loads a text encoder.
    """

    def __init__(self, config: FixerConfig, unet: UNet2DConditionModel, vae: AutoencoderKL,
                 prompt_embeds: torch.Tensor):
        super().__init__()
        self.config = config
        self.unet = unet
        self.vae = vae
        _attach_skip_convs(vae, config.skip_init)
        vae.add_adapter(LoraConfig(r=config.lora_rank, lora_alpha=LORA_ALPHA, init_lora_weights="gaussian",
                                   target_modules=decoder_lora_modules(vae, config.lora_targets)),
                        adapter_name=ADAPTER_NAME)
        self._views_procs = install_multiview_attention(unet)
        self.register_buffer("prompt_embeds", prompt_embeds.reshape(1, config.prompt_tokens, -1).clone())
        alpha_bar = _alphas_cumprod(config)[config.timestep].item()
        self.sqrt_alpha_bar = math.sqrt(alpha_bar)
        self.sqrt_one_minus_alpha_bar = math.sqrt(1.0 - alpha_bar)
        self.vae_checkpointing = False  # recompute the VAE's activations in backward (enable_gradient_checkpointing)

    # --- forward -------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, ref: torch.Tensor | None = None) -> torch.Tensor:
        b = x.shape[0]  # x: [B, 3, H, W]
        if ref is not None:
            if ref.shape != x.shape:
                raise ValueError(f"ref shape {tuple(ref.shape)} differs from input shape {tuple(x.shape)}")
            views, v = torch.stack([x, ref], dim=1).flatten(0, 1), 2  # [(B V), 3, H, W], a sample's views adjacent
        else:
            views, v = x, 1
        z, skips = self.encode(views)  # [(B V), 4, H/8, W/8]
        z0 = self.denoise(z, num_views=v)
        if v > 1:  # only the input view is decoded; its reference only served attention
            z0, skips = z0[::v], [s[::v] for s in skips]
        out = self.decode(z0, skips)  # [B, 3, H, W]
        assert out.shape[0] == b
        return out.clamp(-1.0, 1.0)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Image [N, 3, H, W] -> scaled latent [N, 4, H/8, W/8] and the activations entering each down block."""
        enc = self.vae.encoder
        h = enc.conv_in(x)
        skips = []
        for block in enc.down_blocks:
            skips.append(h)
            h = self._run_block(block, h)
        h = enc.conv_out(enc.conv_act(enc.conv_norm_out(self._run_block(enc.mid_block, h))))
        if self.vae.quant_conv is not None:
            h = self.vae.quant_conv(h)
        mean, logvar = h.chunk(2, dim=1)
        z = mean
        if self.config.sample_posterior:  # the original samples; the mean is deterministic and what we serve
            z = mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * torch.randn_like(mean)
        return z * self.vae.config.scaling_factor, skips

    def denoise(self, z: torch.Tensor, num_views: int = 1) -> torch.Tensor:
        """One UNet epsilon-prediction at t=199 on z treated as x_t (no added noise) -> x0 = (z - sqrt(1-a) eps)/sqrt(a)."""
        for proc in self._views_procs:
            proc.num_views = num_views
        n = z.shape[0]
        t = torch.full((n,), self.config.timestep, device=z.device, dtype=torch.long)
        emb = self.prompt_embeds.to(z.dtype).expand(n, -1, -1)  # [N, 77, D]
        eps = self.unet(z, t, encoder_hidden_states=emb, return_dict=False)[0]
        return (z - self.sqrt_one_minus_alpha_bar * eps) / self.sqrt_alpha_bar

    def decode(self, z0: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        """Scaled latent [B, 4, h, w] -> image [B, 3, 8h, 8w]; adds skip_conv_i(gamma * encoder act) before up block i."""
        dec = self.vae.decoder
        z = z0 / self.vae.config.scaling_factor
        if self.vae.post_quant_conv is not None:
            z = self.vae.post_quant_conv(z)
        h = self._run_block(dec.mid_block, dec.conv_in(z), None)
        h = h.to(next(iter(dec.up_blocks.parameters())).dtype)
        gamma = self.config.skip_gamma
        for i, block in enumerate(dec.up_blocks):
            skip = skips[-1 - i]
            # gamma 1 (the default) needs no scaled copy of a full-resolution activation
            h = h + getattr(dec, f"skip_conv_{i + 1}")(skip if gamma == 1.0 else skip * gamma)
            h = self._run_block(block, h, None)
        return dec.conv_out(dec.conv_act(dec.conv_norm_out(h)))

    def _run_block(self, block: nn.Module, h: torch.Tensor, *args) -> torch.Tensor:
        """``block(h, *args)``, through activation checkpointing while training with ``vae_checkpointing`` on.

        The full-resolution decoder holds most of a training step's activations: recomputing a whole up block in
        backward would still hold ~5.5 GB per 576x1024 view at once, so resnet/sampler blocks (diffusers'
        ``Up/DownEncoderBlock2D``: resnets, then up/downsamplers) are checkpointed one layer at a time (~3 GB).
        """
        if not (self.vae_checkpointing and self.training and torch.is_grad_enabled()):
            return block(h, *args)
        checkpoint = torch.utils.checkpoint.checkpoint
        if not isinstance(block, (DownEncoderBlock2D, UpDecoderBlock2D)):  # e.g. mid blocks: whole
            return checkpoint(block, h, *args, use_reentrant=False)
        temb = args[0] if args else None
        for resnet in block.resnets:  # the block's own forward, one checkpoint per layer
            h = checkpoint(resnet, h, temb, use_reentrant=False)
        samplers = block.upsamplers if isinstance(block, UpDecoderBlock2D) else block.downsamplers
        for sampler in samplers or []:
            h = checkpoint(sampler, h, use_reentrant=False)
        return h

    # --- serving -------------------------------------------------------------------------------------------------
    def merge_lora(self) -> int:
        """Fold the VAE's LoRA deltas into their base weights for inference; returns the number of layers merged.

        Unmerged, every LoRA-wrapped conv of the full-resolution decoder runs two extra low-rank convs and an add:
        memory-bound kernels on the most expensive part of the model. Keys and parameters stay as they are (peft
        keeps the adapters and marks them merged); ``save_checkpoint`` writes a merged model with ``lora_B`` zeroed,
        so it loads back with the same outputs.
        """
        from peft.tuners.tuners_utils import BaseTunerLayer

        merged = 0
        for module in self.vae.modules():
            if isinstance(module, BaseTunerLayer) and not module.merged:
                module.merge()
                merged += 1
        return merged

    # --- training ------------------------------------------------------------------------------------------------
    def prepare_for_training(self, train_vae: bool = False) -> dict[str, int]:
        """The paper's pattern: UNet fully trainable, decoder LoRA and skip convs trainable, encoder frozen.
        ``train_vae``: the whole VAE trainable as well (a preset built from random weights has no pretrained
        autoencoder to keep). Returns the parameter counts (``unet``, ``decoder_lora``, ``skip_convs``, ``vae_base``,
        ``trainable``, ``frozen``)."""
        self.requires_grad_(False)
        self.unet.requires_grad_(True)
        for name, p in self.vae.named_parameters():
            if train_vae or (name.startswith("decoder.") and ("lora_" in name or ".skip_conv_" in name)):
                p.requires_grad_(True)
        return self.parameter_counts()

    def enable_gradient_checkpointing(self) -> None:
        """Trade compute for memory in training: diffusers' UNet checkpointing plus layer-by-layer checkpointing of
        the VAE passes (ours, since :meth:`encode`/:meth:`decode` call the blocks themselves; see :meth:`_run_block`).
        Gradients are unchanged."""
        self.unet.enable_gradient_checkpointing()
        self.vae_checkpointing = True

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def parameter_counts(self) -> dict[str, int]:
        named = dict(self.named_parameters())
        trainable = {n: p for n, p in named.items() if p.requires_grad}
        return {
            "unet": sum(p.numel() for n, p in trainable.items() if n.startswith("unet.")),
            "decoder_lora": sum(p.numel() for n, p in trainable.items()
                                if n.startswith("vae.decoder.") and "lora_" in n and ".skip_conv_" not in n),
            "skip_convs": sum(p.numel() for n, p in trainable.items() if ".skip_conv_" in n),
            "vae_base": sum(p.numel() for n, p in trainable.items()
                            if n.startswith("vae.") and "lora_" not in n and ".skip_conv_" not in n),
            "trainable": sum(p.numel() for p in trainable.values()),
            "frozen": sum(p.numel() for n, p in named.items() if not p.requires_grad),
        }


def skip_conv_channels(vae_channels: tuple[int, ...] | list[int]) -> list[tuple[int, int]]:
    """(in, out) of skip_conv_1..4: encoder down-block inputs (deepest first) -> decoder up-block inputs.
    SD: (512, 512), (256, 512), (128, 512), (128, 256)."""
    c = list(vae_channels)
    enc_inputs = [c[0]] + c[:-1]  # conv_in output, then each block's output feeding the next
    rev = c[::-1]
    dec_inputs = [rev[0]] + rev[:-1]
    return list(zip(enc_inputs[::-1], dec_inputs))


def decoder_lora_modules(vae: AutoencoderKL, targets: tuple[str, ...] | list[str]) -> list[str]:
    """Full names of the VAE decoder's modules that the LoRA adapter wraps: each named as a target or ending in
    ``"." + target`` (peft's rule for a name list). The encoder gets none, as in the official Difix code: it is frozen,
    so its adapters would stay zero while their extra convs slowed every full-resolution encoder pass."""
    names = [n for n, _ in vae.named_modules()
             if n.startswith("decoder.") and any(n == t or n.endswith("." + t) for t in targets)]
    if not names:
        raise ValueError(f"no module of the VAE decoder matches the LoRA targets {list(targets)}")
    return names


def _attach_skip_convs(vae: AutoencoderKL, init: float) -> None:
    for i, (cin, cout) in enumerate(skip_conv_channels(vae.config.block_out_channels)):
        conv = nn.Conv2d(cin, cout, kernel_size=1, bias=False)
        if conv.weight.device.type != "meta":
            nn.init.constant_(conv.weight, init)  # near-zero: the decoder starts as SD-Turbo's (official init 1e-5)
        setattr(vae.decoder, f"skip_conv_{i + 1}", conv)


def _alphas_cumprod(config: FixerConfig) -> torch.Tensor:
    """DDPM scaled_linear schedule of SD 2.1 in float32, as diffusers' DDPMScheduler computes it."""
    betas = torch.linspace(config.beta_start ** 0.5, config.beta_end ** 0.5, config.num_train_timesteps,
                           dtype=torch.float32, device="cpu") ** 2
    return torch.cumprod(1.0 - betas, dim=0)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
