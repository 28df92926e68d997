"""Cameras, scenes, readers/writers of scene formats, and synthetic driving segments."""

from difix3d.scene.camera import Camera
from difix3d.scene.scene import Scene, every_nth_split, load_scene

__all__ = ["Camera", "Scene", "every_nth_split", "load_scene"]
