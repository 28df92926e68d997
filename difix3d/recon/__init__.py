"""3D representations (3DGS on gsplat; a NeRF backend later) and their training loop."""
