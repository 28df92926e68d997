"""The fine-tuning optimizer: AdamW with fp32 state (torch; fused on CUDA) or with 8-bit state (torchao).

AdamW keeps two fp32 moments per trained parameter: ~7 GB for sd-turbo's 866 M-parameter UNet, half of what a
576x1024 step holds besides activations. torchao's ``AdamW8bit`` (block-wise quantized moments, as bitsandbytes'
8-bit Adam) stores them in ~1.7 GB; its update is compiled by torch.compile on the first step, once per parameter
shape: 168 s for the tiny preset's 52 shapes on 2 CPU cores (0.6 s a step after), minutes for sd-turbo. Later
steps pay nothing; the first one is logged so a run does not look stalled.

A saved optimizer state numbers its parameters; the training state records their names beside it
(:func:`trained_parameter_names`), so a run resumed by a model whose trained parameters changed keeps the moments of
those that remain (:func:`load_optimizer_state`). States saved before names were recorded follow the order of the
model of then (:func:`trained_parameter_names_before_decoder_only_lora`).
"""

from __future__ import annotations

import logging
from typing import Iterable

import torch

from difix3d.errors import CheckpointError

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


def load_optimizer_state(opt: torch.optim.Optimizer, state: dict, name: str, device: torch.device, *,
                         names: list[str] | None = None, saved_names: list[str] | None = None,
                         source: str = "optimizer state") -> None:
    """``opt.load_state_dict(state)``, keeping this device's AdamW kernel choice: ``load_state_dict`` restores every
    param group's saved ``fused``/``foreach`` flags, so a run saved on CPU (or before fused AdamW) would resume on
    the foreach path, whose temporaries are as large as the UNet.

    With ``names`` (of ``opt``'s parameters, in order) and ``saved_names`` (of ``state``'s), the saved moments are
    matched to the parameters by name: those of parameters gone from the model are dropped, a parameter new to it
    starts without moments. A LoRA-wrapped layer's weight is the same parameter as the plain layer's
    (``x.base_layer.weight`` = ``x.weight``): the adapter may come or go. Names that do not fit the state, or moments
    whose shape differs from their parameter's, are a CheckpointError naming ``source``."""
    if names is not None and saved_names is not None:
        state = _matched_by_name(opt, state, names, saved_names, source)
    opt.load_state_dict(state)
    if name == "adamw":
        for group in opt.param_groups:
            group["fused"], group["foreach"] = device.type == "cuda", None


def trained_parameter_names(model: torch.nn.Module) -> list[str]:
    """The names of ``model``'s trained parameters, in the optimizer's order (``DifixModel.trainable_parameters()``)."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def trained_parameter_names_before_decoder_only_lora(model: torch.nn.Module) -> list[str]:
    """The trained parameters of ``model`` (a DifixModel prepared for training) named and ordered as a model built
    before the VAE's LoRA wrapped the decoder only: the target suffixes also matched layers of the encoder, whose
    adapters trained with the rest of the VAE under ``train_vae`` (frozen otherwise). A training state of then records
    no names; its optimizer state follows this order. The encoder is wrapped again as it was, by peft (on the meta
    device: no weights), so the adapters' names and places are peft's own."""
    from diffusers import AutoencoderKL
    from peft import LoraConfig, inject_adapter_in_model

    from difix3d.fixer.config import ADAPTER_NAME, LORA_ALPHA

    names = trained_parameter_names(model)
    trained_encoder = [n for n in names if n.startswith("vae.encoder.")]
    if not trained_encoder:  # a frozen encoder: its adapters were frozen too, nothing else changed
        return names
    with torch.device("meta"):
        encoder = AutoencoderKL.from_config(model.vae.config).encoder
        plain = ["vae.encoder." + n for n, _ in encoder.named_parameters()]
        inject_adapter_in_model(LoraConfig(r=model.config.lora_rank, lora_alpha=LORA_ALPHA,
                                           target_modules=list(model.config.lora_targets)),
                                encoder, adapter_name=ADAPTER_NAME)
    first = names.index(trained_encoder[0])
    if trained_encoder != plain or names[first:first + len(plain)] != plain:
        raise ValueError("the encoder is trained in part: a model built before the decoder-only LoRA trained all or "
                         "none of it")
    return names[:first] + ["vae.encoder." + n for n, _ in encoder.named_parameters()] + names[first + len(plain):]


def _matched_by_name(opt: torch.optim.Optimizer, state: dict, names: list[str], saved_names: list[str],
                     source: str) -> dict:
    """``state`` renumbered for ``opt``, whose parameters are ``names`` (see :func:`load_optimizer_state`)."""
    params = [p for group in opt.param_groups for p in group["params"]]
    if len(names) != len(params):
        raise ValueError(f"{len(names)} names for the optimizer's {len(params)} parameters")
    saved_ids = [i for group in state["param_groups"] for i in group["params"]]
    if len(saved_ids) != len(saved_names):
        raise CheckpointError(source, f"its optimizer state holds {len(saved_ids)} parameters and names "
                                      f"{len(saved_names)}")
    if len(state["param_groups"]) != len(opt.param_groups):
        raise CheckpointError(source, f"its optimizer state has {len(state['param_groups'])} parameter groups, the "
                                      f"optimizer {len(opt.param_groups)}")
    saved_id = {_same_parameter(n): i for n, i in zip(saved_names, saved_ids)}
    moments = {}
    for j, (name, p) in enumerate(zip(names, params)):
        i = saved_id.get(_same_parameter(name))
        if i is None or i not in state["state"]:
            continue
        for k, v in state["state"][i].items():
            if torch.is_tensor(v) and v.dim() > 0 and tuple(v.shape) != tuple(p.shape):
                raise CheckpointError(source, f"the optimizer's {k} of {name} is {tuple(v.shape)}, the parameter "
                                              f"{tuple(p.shape)}")
        moments[j] = state["state"][i]
    groups, j = [], 0
    for saved_group, group in zip(state["param_groups"], opt.param_groups):
        settings = {k: v for k, v in saved_group.items() if k not in ("params", "param_names")}
        groups.append(settings | {"params": list(range(j, j + len(group["params"])))})
        j += len(group["params"])
    dropped = sorted(set(saved_id) - set(map(_same_parameter, names)))
    fresh = [n for n in names if _same_parameter(n) not in saved_id]
    if dropped:
        log.info("%s: the optimizer state of %d parameters no longer trained dropped (%s)", source, len(dropped),
                 _some(dropped))
    if fresh:
        log.warning("%s: %d trained parameters have no saved optimizer state and start without moments (%s)", source,
                    len(fresh), _some(fresh))
    return {"state": moments, "param_groups": groups}


def _some(names: list[str], n: int = 4) -> str:
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


def _same_parameter(name: str) -> str:
    """A layer's weight is one parameter whether or not a LoRA adapter wraps the layer (peft: ``base_layer``)."""
    return name.replace(".base_layer.", ".")
