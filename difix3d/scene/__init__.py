"""Cameras, scenes, readers/writers of scene formats, and synthetic driving segments."""

from difix3d.scene.camera import Camera

__all__ = ["Camera"]
