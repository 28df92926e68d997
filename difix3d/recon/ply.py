"""The standard 3DGS PLY layout (the Inria code's ``save_ply``; what SuperSplat, gsplat viewers and others open):
binary little-endian float32 vertices with x, y, z, nx, ny, nz, f_dc_0..2, f_rest_0..(3·(K−1)−1), opacity,
scale_0..2, rot_0..3. Values are stored pre-activation (log-scales, opacity logits, raw quaternions w, x, y, z), and
f_rest is channel-major (all red coefficients, then green, then blue), as Inria writes it.
"""

from __future__ import annotations

import numpy as np
import torch

from difix3d import storage
from difix3d.errors import InputError


def write_ply(uri: str, params: dict[str, torch.Tensor]) -> None:
    """Write Gaussians {means [N,3], scales [N,3], quats [N,4], opacities [N], sh0 [N,1,3], shN [N,K-1,3]}."""
    means = _np(params["means"])
    N = means.shape[0]
    f_dc = _np(params["sh0"]).reshape(N, 3)
    shN = _np(params["shN"])
    shN = shN.reshape(N, shN.shape[1] if shN.ndim == 3 else 0, 3)  # [N, K-1, 3]; K-1 = 0 at SH degree 0
    f_rest = shN.transpose(0, 2, 1).reshape(N, 3 * shN.shape[1])  # [N, 3·(K−1)] channel-major
    columns = {"x": means[:, 0], "y": means[:, 1], "z": means[:, 2],
               "nx": np.zeros(N, np.float32), "ny": np.zeros(N, np.float32), "nz": np.zeros(N, np.float32)}
    columns.update({f"f_dc_{i}": f_dc[:, i] for i in range(3)})
    columns.update({f"f_rest_{i}": f_rest[:, i] for i in range(f_rest.shape[1])})
    columns["opacity"] = _np(params["opacities"]).reshape(N)
    columns.update({f"scale_{i}": _np(params["scales"])[:, i] for i in range(3)})
    columns.update({f"rot_{i}": _np(params["quats"])[:, i] for i in range(4)})
    vertex = np.empty(N, dtype=[(name, "<f4") for name in columns])
    for name, col in columns.items():
        vertex[name] = col
    header = "ply\nformat binary_little_endian 1.0\n" f"element vertex {N}\n"
    header += "".join(f"property float {name}\n" for name in columns) + "end_header\n"
    storage.write_bytes(uri, header.encode("ascii") + vertex.tobytes())


def read_ply(uri: str) -> dict[str, torch.Tensor]:
    """Read a 3DGS PLY written by us or by the Inria code → the same dict :func:`write_ply` takes."""
    data = storage.read_bytes(uri)
    end = data.find(b"end_header\n")
    if not data.startswith(b"ply\n") or end < 0:
        raise InputError(uri, "not a PLY file (no 'ply' magic or no 'end_header')")
    header = data[:end].decode("ascii", errors="replace").splitlines()
    if "format binary_little_endian 1.0" not in header:
        raise InputError(uri, "only binary_little_endian PLY is supported")
    N, names = None, []
    for line in header:
        parts = line.split()
        if parts[:2] == ["element", "vertex"]:
            N = int(parts[2])
        elif parts[:1] == ["property"]:
            if parts[1] != "float":
                raise InputError(uri, f"property {parts[-1]} is {parts[1]}, expected float")
            names.append(parts[2])
    required = ["x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity", *(f"scale_{i}" for i in range(3)),
                *(f"rot_{i}" for i in range(4))]
    missing = [n for n in required if n not in names]
    if N is None or missing:
        raise InputError(uri, f"not a 3DGS PLY: missing {'vertex element' if N is None else missing}")
    body = data[end + len(b"end_header\n"):]
    dtype = np.dtype([(n, "<f4") for n in names])
    if len(body) < N * dtype.itemsize:
        raise InputError(uri, f"truncated: {len(body)} bytes of vertex data, expected {N * dtype.itemsize}")
    v = np.frombuffer(body, dtype=dtype, count=N)
    n_rest = sum(n.startswith("f_rest_") for n in names)
    if n_rest % 3:
        raise InputError(uri, f"{n_rest} f_rest properties: not a multiple of 3")
    f_rest = np.stack([v[f"f_rest_{i}"] for i in range(n_rest)], axis=1) if n_rest else np.zeros((N, 0), np.float32)

    def cols(*ns):
        return torch.from_numpy(np.stack([v[n] for n in ns], axis=1).copy())

    return {
        "means": cols("x", "y", "z"),
        "scales": cols("scale_0", "scale_1", "scale_2"),
        "quats": cols("rot_0", "rot_1", "rot_2", "rot_3"),
        "opacities": torch.from_numpy(v["opacity"].copy()),
        "sh0": cols("f_dc_0", "f_dc_1", "f_dc_2").reshape(N, 1, 3),
        "shN": torch.from_numpy(f_rest.reshape(N, 3, n_rest // 3).transpose(0, 2, 1).copy()),  # [N, K-1, 3]
    }


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float32, copy=False)
