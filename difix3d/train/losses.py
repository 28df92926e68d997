"""The Difix training loss: L2 + LPIPS(VGG) + a Gram (style) loss on VGG16 features, as in the original training.

One VGG16 backbone serves both perceptual terms: ``lpips.LPIPS(net="vgg")`` already exposes relu1_2 ... relu5_3,
the exact layers of the original Gram loss, and its input scaling equals the ImageNet normalisation the original
applies before its separate torchvision VGG16, so a second copy of the network would only cost memory.

Pretrained VGG16 weights never download here: :func:`build_perceptual_net` raises :class:`MissingWeightsError`
saying what to fetch, unless the caller asks for a random stand-in (tests) or names a local weights file.
"""

from __future__ import annotations

import os
import random

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from difix3d.errors import CheckpointError, MissingWeightsError
from difix3d.train.config import GRAM_LAYER_WEIGHTS, LossWeights

VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"  # torchvision's VGG16 (what lpips loads)

RANDOM_HINT = ("pass --allow-random-perceptual (perceptual_weights='random') to train with a random stand-in "
               "network (smoke tests only), or --vgg-weights PATH (perceptual_weights=PATH) for a local copy")


class DifixLoss(nn.Module):
    """``loss(pred, target, step)`` → dict of scalar tensors ``total``, ``l2``, ``lpips``, ``gram``.

    ``pred`` and ``target`` are float ``[N, 3, H, W]`` in [-1, 1] (N = batch × views: the reference view is
    supervised too). The Gram term starts after ``weights.gram_warmup_steps`` and sees one random crop shared
    by prediction and target.
    """

    def __init__(self, weights: LossWeights, perceptual: nn.Module | None = None, seed: int = 0,
                 checkpointing: bool = False):
        super().__init__()
        self.weights = weights
        self.checkpointing = checkpointing  # recompute LPIPS's full-resolution VGG activations in backward
        needs_net = weights.lpips > 0 or weights.gram > 0
        if needs_net and perceptual is None:
            raise ValueError("LPIPS/Gram weights are non-zero: pass a perceptual network (build_perceptual_net)")
        self.perceptual = perceptual.eval().requires_grad_(False) if perceptual is not None else None
        self._crop_rng = random.Random(seed)

    def train(self, mode: bool = True) -> "DifixLoss":  # the VGG stays in eval mode
        super().train(mode)
        if self.perceptual is not None:
            self.perceptual.eval()
        return self

    def forward(self, pred: torch.Tensor, target: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        w = self.weights
        zero = pred.new_zeros((), dtype=torch.float32)
        l2 = F.mse_loss(pred.float(), target.float())
        lp = self._lpips(pred, target).mean().float() if w.lpips > 0 else zero
        gram = zero
        if w.gram > 0 and step >= w.gram_warmup_steps:
            p, t = shared_random_crop(pred, target, w.gram_crop, self._crop_rng)
            gram = gram_loss(self.vgg_features(p), self.vgg_features(t), w.gram_layers)
        total = w.l2 * l2 + w.lpips * lp + w.gram * gram
        return {"total": total, "l2": l2.detach(), "lpips": lp.detach(), "gram": gram.detach()}

    def _lpips(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self.perceptual, pred, target, use_reentrant=False)
        return self.perceptual(pred, target)

    def vgg_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """VGG16 relu1_2 ... relu5_3 of ``x`` in [-1, 1] (the LPIPS backbone with its ImageNet scaling)."""
        out = self.perceptual.net(self.perceptual.scaling_layer(x))
        return out._asdict()


def gram_loss(pred_feats: dict[str, torch.Tensor], target_feats: dict[str, torch.Tensor],
              layer_weights: dict[str, float] = GRAM_LAYER_WEIGHTS) -> torch.Tensor:
    """Weighted Gram-matrix distance over the VGG layers, normalised by each layer's C·H·W as in the original.

    Gram matrices are per sample (``[N, C, C]``); the original multiplies features across the whole batch, which
    also matches unrelated images against each other.
    """
    total = 0.0
    for layer, weight in layer_weights.items():
        fp, ft = pred_feats[layer].float(), target_feats[layer].float()  # [N, C, h, w]
        _, c, h, wd = fp.shape
        # Gram matrices in fp32 even inside a bf16 autocast region (autocast would run bmm in bf16): the loss is the
        # small difference of two large, nearly equal matrices, which bf16 rounding swamps
        with torch.autocast(device_type=fp.device.type, enabled=False):
            total = total + weight * torch.mean((gram_matrix(fp) - gram_matrix(ft)) ** 2) / (c * h * wd)
    return total


def gram_matrix(feats: torch.Tensor) -> torch.Tensor:
    n, c, h, w = feats.shape  # [N, C, h, w] -> [N, C, C]
    f = feats.reshape(n, c, h * w)
    return torch.bmm(f, f.transpose(1, 2))


def shared_random_crop(a: torch.Tensor, b: torch.Tensor, size: int, rng: random.Random
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random ``size`` × ``size`` window (clipped to the image) of both ``[N, 3, H, W]`` tensors."""
    h, w = a.shape[-2:]
    ch, cw = min(size, h), min(size, w)
    top, left = rng.randint(0, h - ch), rng.randint(0, w - cw)
    return a[..., top:top + ch, left:left + cw], b[..., top:top + ch, left:left + cw]


def build_perceptual_net(weights: str = "pretrained", hub_dir: str | None = None, seed: int = 0) -> nn.Module:
    """``lpips.LPIPS(net="vgg")`` with VGG16 weights from the torch hub cache (``"pretrained"``), a local torchvision
    ``vgg16`` state dict (a path), or seeded random weights (``"random"``: identical on every worker).

    Raises :class:`MissingWeightsError` naming the file to fetch when the pretrained weights are not here.
    """
    from difix3d.eval.perceptual import build_lpips, hub_checkpoint

    if weights == "pretrained":
        path = hub_checkpoint(VGG16_URL, hub_dir)
        if not os.path.isfile(path):  # said here, once: build_lpips's own message tells evaluation's flags
            raise MissingWeightsError(f"VGG16 weights for the LPIPS/Gram training losses are missing: {path} not "
                                      f"found (no download here). Fetch {VGG16_URL} to {path}, or {RANDOM_HINT}")
        return build_lpips("vgg", "pretrained", hub_dir)
    if weights == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return build_lpips("vgg", _random_vgg_lpips)
    return _lpips_from_vgg16_file(weights)


def _random_vgg_lpips() -> nn.Module:
    """LPIPS(vgg) with a random backbone, built without VGG16's 120 M-parameter classifier: lpips only keeps
    ``.features``, and initialising the classifier takes seconds on every worker start."""
    import types

    import lpips
    import lpips.pretrained_networks as pn
    from torchvision.models.vgg import VGG, cfgs, make_layers

    class _FeaturesOnly(VGG):
        def __init__(self):
            nn.Module.__init__(self)
            self.features = make_layers(cfgs["D"])
            for m in self.features.modules():  # torchvision's VGG init for convs
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                    nn.init.constant_(m.bias, 0)

    real_tv = pn.tv
    pn.tv = types.SimpleNamespace(vgg16=lambda **_: _FeaturesOnly())
    try:
        model = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
    finally:
        pn.tv = real_tv
    return model


def _lpips_from_vgg16_file(path: str) -> nn.Module:
    """LPIPS(vgg) whose backbone is loaded from a torchvision ``vgg16`` state dict at ``path``."""
    from difix3d.eval.perceptual import build_lpips

    if not os.path.isfile(path):
        raise MissingWeightsError(f"VGG16 weights file not found: {path} (fetch {VGG16_URL}), or {RANDOM_HINT}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling problem is a bad file
        raise CheckpointError(path, f"not a torch state dict ({e})") from e
    model = build_lpips("vgg", "random")
    backbone = {}
    for name, _ in model.net.named_parameters():  # "slice1.0.weight" -> torchvision "features.0.weight"
        key = "features." + name.split(".", 1)[1]
        if key not in state:
            raise CheckpointError(path, f"not a torchvision vgg16 state dict: missing {key}")
        backbone[name] = state[key]
    model.net.load_state_dict(backbone, strict=True)
    return model.eval().requires_grad_(False)
