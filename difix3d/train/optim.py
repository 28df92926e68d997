"""The fine-tuning optimizer: AdamW with fp32 state (torch; fused on CUDA) or with 8-bit state (torchao).

AdamW keeps two fp32 moments per trained parameter: ~7 GB for sd-turbo's 866 M-parameter UNet, half of what a
576x1024 step holds besides activations. torchao's ``AdamW8bit`` (block-wise quantized moments, as bitsandbytes'
8-bit Adam) stores them in ~1.7 GB; its update is compiled by torch.compile on the first step, once per parameter
shape: 168 s for the tiny preset's 52 shapes on 2 CPU cores (0.6 s a step after), minutes for sd-turbo. Later
steps pay nothing; the first one is logged so a run does not look stalled.
"""

from __future__ import annotations

import logging
from typing import Iterable

import torch

log = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "adamw8bit")


def build_optimizer(name: str, params: Iterable[torch.nn.Parameter], *, lr: float, betas: tuple[float, float],
                    eps: float, weight_decay: float, device: torch.device) -> torch.optim.Optimizer:
    """``name`` in :data:`OPTIMIZERS`; raises ValueError for others and ImportError naming the package to install."""
    params = list(params)
    if name == "adamw":
        # fused on CUDA: one kernel, and no foreach temporaries as large as the UNet (GBs at the peak)
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                 fused=device.type == "cuda")
    if name == "adamw8bit":
        try:
            from torchao.optim import AdamW8bit
        except ImportError as e:
            raise ImportError(f"optimizer 'adamw8bit' needs torchao: pip install 'difix3d[lowmem]' (or torchao) "
                              f"({e})") from None
        shapes = len({tuple(p.shape) for p in params})
        log.warning("adamw8bit: the first step compiles torchao's update for %d parameter shapes (minutes, once per "
                    "process); later steps are fast", shapes)
        return AdamW8bit(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}: expected one of {', '.join(OPTIMIZERS)}")


def load_optimizer_state(opt: torch.optim.Optimizer, state: dict, name: str, device: torch.device) -> None:
    """``opt.load_state_dict(state)``, keeping this device's AdamW kernel choice: ``load_state_dict`` restores every
    param group's saved ``fused``/``foreach`` flags, so a run saved on CPU (or before fused AdamW) would resume on
    the foreach path, whose temporaries are as large as the UNet."""
    opt.load_state_dict(state)
    if name == "adamw":
        for group in opt.param_groups:
            group["fused"], group["foreach"] = device.type == "cuda", None
