"""One entry point that builds any representation for a scene, so callers (the progressive loop, the fleet job,
benchmarks) pick a backend by name: ``--representation 3dgs|nerfacto``.

The NeRF backend is imported only when asked for: nerfstudio is the optional extra ``difix3d[nerf]``.
"""

from __future__ import annotations

from typing import Any

import torch

from difix3d.recon.base import Representation

KINDS = ("3dgs", "nerfacto")


def default_config(kind: str, iterations: int | None = None, tiny: bool = False) -> Any:
    """The backend's config (paper defaults, or its ``tiny()`` CPU preset), optionally with a training budget."""
    _check_kind(kind)
    if kind == "3dgs":
        from difix3d.recon.gaussians import GaussianConfig as cls
    else:
        from difix3d.recon.nerf import NerfConfig as cls
    if tiny:
        return cls.tiny(**({} if iterations is None else {"iterations": iterations}))
    return cls() if iterations is None else cls(iterations=iterations)


def make_representation(kind: str, scene: Any, config: Any = None, device: torch.device | str | None = None,
                        seed: int | None = None) -> Representation:
    """A fresh ``kind`` representation of ``scene`` (initialized from its training split).

    config: the backend's config (``GaussianConfig`` for "3dgs", ``NerfConfig`` for "nerfacto"), None for its
    defaults. seed: the random initialization (3DGS random points; NeRF weights and ray sampling); None keeps
    ``NerfConfig.seed`` for NeRF and 0 for 3DGS, a number overrides both."""
    _check_kind(kind)
    if seed is None:
        seed = int(getattr(config, "seed", 0) or 0) if kind == "nerfacto" else 0
    torch.manual_seed(seed)
    if kind == "3dgs":
        from difix3d.recon.gaussians import GaussianConfig, GaussianSplat

        _check_config(kind, config, GaussianConfig)
        return GaussianSplat.from_scene(scene, config, device, seed=seed)
    from difix3d.recon.nerf import NerfConfig, NerfactoScene

    _check_config(kind, config, NerfConfig)
    return NerfactoScene.from_scene(scene, config, device, seed=seed)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown representation {kind!r}: expected one of {', '.join(KINDS)}")


def _check_config(kind: str, config: Any, cls: type) -> None:
    if config is not None and not isinstance(config, cls):
        raise TypeError(f"representation {kind!r} takes a {cls.__name__}, got {type(config).__name__}")
