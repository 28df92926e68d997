"""Feature networks behind LPIPS and FID/KID, and the missing-weights policy.

Pretrained weights never download here: before a network is built, the file it would load is looked up in the
torch hub cache (``<hub>/checkpoints/<file>``, where torchvision and torch-fidelity keep them). When it is not
there, the metric is reported unavailable with the reason (:class:`Availability`) and the other metrics go on.
Stand-ins with random weights exist for tests and offline smoke runs; their values are not comparable to
published figures.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from difix3d.errors import MissingWeightsError

# torchvision backbones that the lpips package builds (lpips/pretrained_networks.py); the linear heads ship in the
# lpips wheel (lpips/weights/v0.1/<net>.pth), the backbones come from torchvision's download.
_LPIPS_BACKBONE_URLS = {
    "alex": "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
    "vgg": "https://download.pytorch.org/models/vgg16-397923af.pth",
    "squeeze": "https://download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth",
}
# torch-fidelity's InceptionV3 port of the TF FID network (what torchmetrics' FID uses by default).
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")


@dataclass(frozen=True)
class Availability:
    """Whether a metric's network can be built on this machine, and why not."""

    available: bool
    reason: str = ""


def hub_checkpoint(url: str, hub_dir: str | None = None) -> str:
    """Where ``torch.hub.load_state_dict_from_url(url)`` would keep its file."""
    return os.path.join(hub_dir or torch.hub.get_dir(), "checkpoints", os.path.basename(url))


# ---------------------------------------------------------------- LPIPS

def lpips_availability(net: str = "alex", weights: str | Callable = "pretrained",
                       hub_dir: str | None = None) -> Availability:
    if callable(weights):
        return Availability(True)
    if net not in _LPIPS_BACKBONE_URLS:
        return Availability(False, f"unknown LPIPS backbone {net!r}; choose from {sorted(_LPIPS_BACKBONE_URLS)}")
    if importlib.util.find_spec("lpips") is None:
        return Availability(False, "the lpips package is not installed (pip install lpips)")
    head = _lpips_head_path(net)
    if not os.path.isfile(head):
        return Availability(False, f"LPIPS linear weights missing from the lpips package: {head}")
    if weights == "random":
        return Availability(True)
    if weights != "pretrained":
        return Availability(False, f"unknown LPIPS weights {weights!r} (pretrained | random | a callable)")
    path = hub_checkpoint(_LPIPS_BACKBONE_URLS[net], hub_dir)
    if not os.path.isfile(path):
        return Availability(False, f"LPIPS {net} backbone weights not found at {path} (no download here); fetch "
                                   f"{_LPIPS_BACKBONE_URLS[net]} into that folder (or --lpips-weights random: a "
                                   "stand-in whose values are not comparable to published LPIPS)")
    return Availability(True)


def build_lpips(net: str = "alex", weights: str | Callable = "pretrained", hub_dir: str | None = None) -> nn.Module:
    """An ``lpips.LPIPS`` in eval mode; raises :class:`MissingWeightsError` instead of downloading."""
    if callable(weights):
        return weights().eval()
    avail = lpips_availability(net, weights, hub_dir)
    if not avail.available:
        raise MissingWeightsError(avail.reason)
    import lpips as lpips_pkg

    if hub_dir:
        torch.hub.set_dir(hub_dir)  # torchvision then reads the backbone from the file checked above
    model = lpips_pkg.LPIPS(net=net, pnet_rand=(weights == "random"), verbose=False)
    return model.eval().requires_grad_(False)


def _lpips_head_path(net: str) -> str:
    spec = importlib.util.find_spec("lpips")
    return os.path.join(os.path.dirname(spec.origin), "weights", "v0.1", f"{net}.pth")


# ---------------------------------------------------------------- FID / KID features

def feature_availability(kind: str | Callable = "inception", hub_dir: str | None = None) -> Availability:
    if callable(kind) or kind == "random":
        return Availability(True)
    if kind != "inception":
        return Availability(False, f"unknown FID features {kind!r} (inception | random | a callable)")
    if importlib.util.find_spec("torch_fidelity") is None:
        return Availability(False, "torch-fidelity is not installed (pip install torch-fidelity); it provides the "
                                   "InceptionV3 network of FID/KID")
    path = hub_checkpoint(INCEPTION_URL, hub_dir)
    if not os.path.isfile(path):
        return Availability(False, f"InceptionV3 weights not found at {path} (no download here); fetch "
                                   f"{INCEPTION_URL} into that folder (or --fid-features random: a stand-in whose "
                                   "values are not comparable to published FID/KID)")
    return Availability(True)


def build_feature_net(kind: str | Callable = "inception", hub_dir: str | None = None,
                      random_dim: int = 64) -> nn.Module:
    """A module mapping float ``[B, 3, H, W]`` in [0, 1] to features ``[B, D]``, with ``num_features = D``."""
    if callable(kind):
        return kind().eval()
    if kind == "random":
        return RandomFeatureNet(random_dim).eval()
    avail = feature_availability(kind, hub_dir)
    if not avail.available:
        raise MissingWeightsError(avail.reason)
    return InceptionFeatures(hub_checkpoint(INCEPTION_URL, hub_dir)).eval()


# how images are resized to Inception's 299x299: the TF-style bilinear resize of the original FID code, which
# torch-fidelity and pytorch-fid reproduce (torchmetrics' default antialiased resize gives other features for
# frames larger than 299: FID/KID not comparable with published figures)
INCEPTION_RESIZE = "bilinear-tf"


class InceptionFeatures(nn.Module):
    """torchmetrics' InceptionV3 (torch-fidelity port) 2048-d pool features from float images in [0, 1], resized to
    299 as the original FID code does (``INCEPTION_RESIZE``)."""

    num_features = 2048

    def __init__(self, weights_path: str):
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                      feature_extractor_weights_path=weights_path, antialias=False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W] in [0, 1] -> [B, 2048]
        x = (images.clamp(0, 1) * 255.0).round().to(torch.uint8)  # the network expects uint8 and resizes to 299
        return self.net(x).reshape(images.shape[0], -1).float()


class RandomFeatureNet(nn.Module):
    """Stand-in feature extractor: two strided convs + global average pool, weights fixed by ``seed`` so every
    worker builds the same network. For tests and offline smoke runs only: its FID is not the published FID."""

    def __init__(self, num_features: int = 64, seed: int = 0):
        super().__init__()
        self.num_features = num_features
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(16, num_features, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if p.ndim > 1 else 0.1))
        self.requires_grad_(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W] in [0, 1] -> [B, D]
        return self.body(images * 2.0 - 1.0).flatten(1)


def metric_availability(metrics: tuple[str, ...], lpips_net: str, lpips_weights: Any, fid_features: Any,
                        hub_dir: str | None) -> dict[str, Availability]:
    """Availability of each requested metric; PSNR and SSIM need no weights."""
    out = {}
    for m in metrics:
        if m == "lpips":
            out[m] = lpips_availability(lpips_net, lpips_weights, hub_dir)
        elif m in ("fid", "kid"):
            out[m] = feature_availability(fid_features, hub_dir)
        else:
            out[m] = Availability(True)
    return out
