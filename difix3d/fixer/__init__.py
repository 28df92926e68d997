"""The Difix fixer: model (``build_model``, ``DifixModel``), checkpoints, ``FixerRunner`` and the client protocol.

Imports are lazy so ``import difix3d.fixer.client`` stays cheap where only the protocol is needed.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "FixerConfig": "difix3d.fixer.config", "preset_config": "difix3d.fixer.config",
    "DifixModel": "difix3d.fixer.model", "build_model": "difix3d.fixer.model",
    "save_checkpoint": "difix3d.fixer.checkpoint", "load_checkpoint": "difix3d.fixer.checkpoint",
    "convert_checkpoint": "difix3d.fixer.checkpoint",
    "FixerRunner": "difix3d.fixer.runner",
    "FixerClient": "difix3d.fixer.client", "LocalFixerClient": "difix3d.fixer.client",
    "default_checkpoint": "difix3d.fixer.bundled",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'difix3d.fixer' has no attribute {name!r}")
