"""difix3d: Difix3D+ (CVPR 2025) as a Ray application — single-step diffusion fixing of 3D reconstructions."""

__version__ = "0.1.0"
