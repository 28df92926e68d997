"""A procedural street with exact ground truth: analytic ray casting of planes, axis-aligned boxes and cylinders.

World frame = the ego frame at the segment's first frame (x forward along the road, y left, z up, metres), so a
segment written in the driving layout loads back in the same frame. Colour is a pure function of the surface point
and its normal (photo texture × tint, painted lane lines, façade windows, Lambert shading from a fixed sun): every
camera that sees a point sees the same colour, which is what makes the ground truth exact for *any* camera.
Only the sky (no surface) depends on the view direction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from difix3d.device import default_device
from difix3d.scene.camera import Camera
from difix3d.scene.textures import TEXTURE_NAMES, load_textures, sample_texture

_TEX = {n: i for i, n in enumerate(TEXTURE_NAMES)}
_SUN = torch.tensor([0.45, 0.25, 0.86])
_SUN = _SUN / _SUN.norm()
_FAR = 400.0  # metres: rays that hit nothing nearer see the sky
_EPS = 1e-4


@dataclass
class StreetLayout:
    """Dimensions of the street (metres). Four 3.5 m lanes; the ego drives near the centre line."""

    road_half_width: float = 7.0
    road_center_y: float = 1.75  # the ego starts in the right-hand lane; lane changes go left (+y)
    sidewalk_width: float = 3.0
    sidewalk_height: float = 0.15
    x_min: float = -40.0
    x_max: float = 200.0


class StreetScene:
    """Road, sidewalks, grass verges, building façades, parked cars and poles; deterministic by ``seed``."""

    def __init__(self, seed: int = 0, layout: StreetLayout | None = None, length: float | None = None,
                 device: str | torch.device | None = "cpu"):
        self.seed = int(seed)
        self.layout = layout or StreetLayout()
        if length is not None:  # cover a trajectory of ``length`` metres plus what the cameras see beyond it
            self.layout.x_max = max(self.layout.x_max, float(length) + 160.0)
        self._materials: list[tuple] = []  # (texture, tint rgb, tile metres, flags, uv offset)
        boxes: list[tuple[np.ndarray, np.ndarray, int]] = []  # (min [3], max [3], material)
        self._build(boxes)
        self.box_min = torch.tensor(np.array([b[0] for b in boxes]), dtype=torch.float32)  # [B, 3]
        self.box_max = torch.tensor(np.array([b[1] for b in boxes]), dtype=torch.float32)  # [B, 3]
        self.box_mat = torch.tensor([b[2] for b in boxes], dtype=torch.long)  # [B]
        mats = self._materials
        self.mat_tex = torch.tensor([m[0] for m in mats], dtype=torch.long)  # [M]
        self.mat_tint = torch.tensor([m[1] for m in mats], dtype=torch.float32)  # [M, 3]
        self.mat_tile = torch.tensor([m[2] for m in mats], dtype=torch.float32)  # [M]
        self.mat_flags = torch.tensor([m[3] for m in mats], dtype=torch.long)  # [M] 1 lanes, 2 windows
        self.mat_offset = torch.tensor([m[4] for m in mats], dtype=torch.float32)  # [M]
        self.textures = load_textures()
        far = 1e6  # the dummy object each padded index list points at: an empty box, a pole far away
        self._bmin = torch.cat([self.box_min, torch.full((1, 3), far)])  # [B+1, 3]
        self._bmax = torch.cat([self.box_max, torch.full((1, 3), -far)])
        self._bmat = torch.cat([self.box_mat, torch.zeros(1, dtype=torch.long)])
        self._pxy = torch.cat([self.cyl["xy"], torch.full((1, 2), far)])  # [P+1, 2]
        r, h, P = self.cyl["r"], self.cyl["h"], len(self.cyl["xy"])
        lo = torch.cat([self.box_min, torch.cat([self.cyl["xy"] - r, torch.zeros(P, 1)], 1)])  # [B+P, 3]
        hi = torch.cat([self.box_max, torch.cat([self.cyl["xy"] + r, torch.full((P, 1), h)], 1)])
        bits = torch.tensor([[(k >> a) & 1 for a in range(3)] for k in range(8)], dtype=torch.bool)  # [8, 3]
        self._corners = torch.where(bits[None], hi[:, None], lo[:, None])  # [B+P, 8, 3] bounding-box corners
        # CUDA renders a 576x1024 view in milliseconds; CPU is the default so ground truth is bit-stable in tests
        self.device = default_device(device)
        for k, v in list(vars(self).items()):
            if isinstance(v, torch.Tensor):
                setattr(self, k, v.to(self.device))
        self.cyl["xy"] = self.cyl["xy"].to(self.device)

    # --- public API

    def render(self, camera: Camera, tile: int = 16, chunk: int = 1 << 15) -> np.ndarray:
        return self._render(camera, tile, chunk)

    def _render(self, camera: Camera, tile: int, chunk: int) -> np.ndarray:
        """Exact ground truth at ``camera`` (pixel centres, no distortion): uint8 [H, W, 3].

        Rays go in ``tile``×``tile`` pixel tiles, each tested only against the objects inside its own frustum
        (tiles grouped by object count so padding stays small): a street has ~100 boxes, a tile sees a few."""
        H, W, dev = camera.height, camera.width, self.device
        rows, cols = -(-H // tile), -(-W // tile)
        steps = torch.arange(tile, dtype=torch.float32, device=dev)
        j, i = torch.meshgrid(steps, steps, indexing="xy")
        r, c = torch.meshgrid(torch.arange(rows, device=dev), torch.arange(cols, device=dev), indexing="ij")
        u = (c.reshape(-1, 1) * tile + j.reshape(1, -1)) + 0.5  # [tiles, tile*tile]
        v = (r.reshape(-1, 1) * tile + i.reshape(1, -1)) + 0.5
        origin, dirs = camera_rays(camera, torch.stack([u.reshape(-1), v.reshape(-1)], 1))
        dirs = dirs.reshape(rows * cols, tile * tile, 3)
        visible = self._visible(camera, tile, rows, cols)  # [tiles, N] bool
        counts = visible.sum(1)
        order = torch.argsort(counts)
        rgb = torch.empty(rows * cols, tile * tile, 3, device=dev)
        per_group = max(1, chunk // (tile * tile))
        for g in range(0, len(order), per_group):
            tiles = order[g:g + per_group]
            bidx, pidx = self._object_lists(visible[tiles], tile * tile)
            d = dirs[tiles].reshape(-1, 3)
            rgb[tiles] = self._shade_rays(origin.expand_as(d), d, bidx, pidx).reshape(len(tiles), tile * tile, 3)
        image = rgb.reshape(rows, cols, tile, tile, 3).permute(0, 2, 1, 3, 4).reshape(rows * tile, cols * tile, 3)
        return _to_u8(image[:H, :W].reshape(-1, 3)).reshape(H, W, 3)

    def colors_at(self, camera: Camera, uv: torch.Tensor | np.ndarray, chunk: int = 1 << 15) -> np.ndarray:
        """uint8 [N, 3] colours seen through sub-pixel positions ``uv`` [N, 2] (pixel units, OpenCV)."""
        return self._colors_at(camera, uv, chunk)

    def _colors_at(self, camera: Camera, uv, chunk: int) -> np.ndarray:
        origin, dirs = camera_rays(camera, self._uv(uv))
        bidx, pidx = self._object_lists(self._visible(camera), 1)
        out = []
        for s in range(0, len(dirs), chunk):
            d = dirs[s:s + chunk]
            out.append(self._shade_rays(origin.expand_as(d), d, bidx.expand(len(d), -1), pidx.expand(len(d), -1)))
        return _to_u8(torch.cat(out)) if out else np.zeros((0, 3), np.uint8)

    def depth_at(self, camera: Camera, uv: torch.Tensor | np.ndarray) -> np.ndarray:
        """Camera-space depth (z, metres) of the first surface through ``uv`` [N, 2]; inf where only sky."""
        return self._depth_at(camera, uv)

    def _depth_at(self, camera: Camera, uv) -> np.ndarray:
        origin, dirs = camera_rays(camera, self._uv(uv))
        bidx, pidx = self._object_lists(self._visible(camera), 1)
        t, *_ = self._intersect(origin.expand_as(dirs), dirs, bidx.expand(len(dirs), -1), pidx.expand(len(dirs), -1))
        fwd = torch.as_tensor(camera.rotation_c2w[:, 2], dtype=torch.float32, device=self.device)
        return (t * (dirs @ fwd)).cpu().numpy()

    def sample_points(self, n: int, seed: int | None = None, x_range: tuple[float, float] | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
        """``n`` points on visible surfaces, area-weighted (float32 [n, 3]), and their exact colours (uint8 [n, 3])."""
        g = torch.Generator().manual_seed(self.seed * 7919 + 17 if seed is None else int(seed))
        x0, x1 = x_range or (self.layout.x_min, self.layout.x_max)
        pts, nrm, mat = [], [], []
        need = n
        for _ in range(20):  # rejection of points buried inside boxes: a few rounds are enough
            p, q, m = self._sample_surfaces(max(need * 2, 1024), g, x0, x1)
            ok = ~self._inside_any_box(p)
            pts.append(p[ok]), nrm.append(q[ok]), mat.append(m[ok])
            need -= int(ok.sum())
            if need <= 0:
                break
        p, q, m = torch.cat(pts)[:n], torch.cat(nrm)[:n], torch.cat(mat)[:n]
        p, q, m = p.to(self.device), q.to(self.device), m.to(self.device)
        colors = _to_u8(self._shade(p, q, m))
        return p.cpu().numpy().astype(np.float32), colors

    def _uv(self, uv) -> torch.Tensor:
        return torch.as_tensor(np.asarray(uv), dtype=torch.float32, device=self.device).reshape(-1, 2)  # [N, 2]

    # --- geometry

    def _material(self, tex: str, tint, tile: float, flags: int = 0, offset: float = 0.0) -> int:
        self._materials.append((_TEX[tex], tuple(float(c) for c in tint), float(tile), flags, float(offset)))
        return len(self._materials) - 1

    def _build(self, boxes: list) -> None:
        """One random stream per (kind, side): a longer street only appends objects, the rest stay put."""
        L = self.layout
        self.mat_road = self._material("gravel", (0.36, 0.36, 0.38), 3.0, flags=1)
        self.mat_grass = self._material("grass", (0.35, 0.55, 0.25), 2.0)
        walk = self._material("moon", (0.72, 0.70, 0.66), 2.5)
        edge = L.road_half_width + L.sidewalk_width
        for side in (-1.0, 1.0):
            lo, hi = sorted((L.road_center_y + side * L.road_half_width, L.road_center_y + side * edge))
            boxes.append((np.array([L.x_min, lo, 0.0]), np.array([L.x_max, hi, L.sidewalk_height]), walk))
            k = int(side > 0)
            self._build_facades(np.random.default_rng([self.seed, 1, k]), boxes, side, edge)
            self._build_cars(np.random.default_rng([self.seed, 2, k]), boxes, side)
        self.cyl = self._build_poles(self.seed)

    def _build_facades(self, rng, boxes, side: float, edge: float) -> None:
        L = self.layout
        x = L.x_min
        while x < L.x_max:
            width, gap = rng.uniform(6.0, 16.0), rng.uniform(0.0, 4.0)
            setback, depth, height = rng.uniform(0.5, 4.0), rng.uniform(6.0, 12.0), rng.uniform(5.0, 20.0)
            tex = "brick" if rng.uniform() < 0.6 else "moon"
            tint = rng.uniform(0.45, 0.95, size=3) * np.array([1.0, 0.85, 0.75]) if tex == "brick" else \
                rng.uniform(0.55, 0.9, size=3)
            mat = self._material(tex, tint, rng.uniform(1.5, 4.0), flags=2, offset=rng.uniform())
            y_in = L.road_center_y + side * (edge + setback)
            lo, hi = sorted((y_in, y_in + side * depth))
            boxes.append((np.array([x, lo, 0.0]), np.array([x + width, hi, height]), mat))
            x += width + gap

    def _build_cars(self, rng, boxes, side: float) -> None:
        L = self.layout
        x = L.x_min + rng.uniform(0.0, 10.0)
        y_c = L.road_center_y + side * (L.road_half_width - 1.1)
        while x < L.x_max:
            tint = rng.uniform(0.1, 0.95, size=3)
            body = self._material("gravel", tint, 1.0, offset=rng.uniform())
            glass = self._material("moon", (0.2, 0.25, 0.3), 1.0, offset=rng.uniform())
            length = rng.uniform(3.8, 4.8)
            boxes.append((np.array([x, y_c - 0.9, 0.25]), np.array([x + length, y_c + 0.9, 1.0]), body))
            boxes.append((np.array([x + 0.25 * length, y_c - 0.8, 1.0]),
                          np.array([x + 0.8 * length, y_c + 0.8, 1.5]), glass))
            x += length + rng.uniform(2.0, 25.0)

    def _build_poles(self, seed: int) -> dict:
        L = self.layout
        centres, radius, height = [], 0.12, 6.0
        for side in (-1.0, 1.0):
            rng = np.random.default_rng([seed, 3, int(side > 0)])
            x = L.x_min + rng.uniform(0.0, 8.0)
            while x < L.x_max:
                centres.append((x, L.road_center_y + side * (L.road_half_width + 0.6)))
                x += rng.uniform(12.0, 30.0)
        mat = self._material("moon", (0.55, 0.57, 0.6), 0.5)
        c = torch.tensor(centres, dtype=torch.float32).reshape(-1, 2)
        return {"xy": c, "r": radius, "h": height, "mat": mat}

    def _visible(self, camera: Camera, tile: int | None = None, rows: int = 1, cols: int = 1) -> torch.Tensor:
        """Objects (boxes, then poles) not outside the frustum of each tile: [rows*cols, B+P] bool (one row for the
        whole image when ``tile`` is None). Exact conservative culling: a convex object whose 8 corners all lie
        behind one frustum plane is outside; plus the near plane and ``_FAR``."""
        V = torch.as_tensor(camera.viewmat, dtype=torch.float32, device=self.device)
        pc = self._corners @ V[:3, :3].T + V[:3, 3]  # [N, 8, 3] camera coords
        fx, fy, cx, cy = (float(camera.K[0, 0]), float(camera.K[1, 1]), float(camera.K[0, 2]), float(camera.K[1, 2]))
        step_u, step_v = (tile, tile) if tile else (camera.width, camera.height)
        u0 = torch.arange(cols, dtype=torch.float32, device=self.device) * step_u  # tile edges in pixels
        v0 = torch.arange(rows, dtype=torch.float32, device=self.device) * step_v
        x, y, z = pc[None, ..., 0], pc[None, ..., 1], pc[None, ..., 2]  # [1, N, 8]
        # u >= u0  <=>  fx x + (cx - u0) z >= 0 (z > 0); likewise for the other three sides
        col_out = ((fx * x + (cx - u0)[:, None, None] * z) < 0).all(2) | \
                  ((-fx * x + (u0 + step_u - cx)[:, None, None] * z) < 0).all(2)  # [cols, N]
        row_out = ((fy * y + (cy - v0)[:, None, None] * z) < 0).all(2) | \
                  ((-fy * y + (v0 + step_v - cy)[:, None, None] * z) < 0).all(2)  # [rows, N]
        behind = (pc[..., 2] < _EPS).all(1) | (pc[..., 2] > _FAR).all(1)  # [N]
        out = row_out[:, None] | col_out[None] | behind
        return ~out.reshape(rows * cols, -1)

    def _object_lists(self, visible: torch.Tensor, rays_per_row: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-ray padded index lists ([R, b] boxes, [R, p] poles) from [G, B+P] visibility, padded with the
        never-hit dummy object; each row of ``visible`` covers ``rays_per_row`` consecutive rays."""
        B = len(self.box_min)

        def lists(mask: torch.Tensor, dummy: int) -> torch.Tensor:
            n = int(mask.sum(1).max()) if mask.numel() else 0
            if n == 0:
                return torch.full((mask.shape[0], 1), dummy, dtype=torch.long, device=mask.device)
            idx = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :n]  # visible first
            ok = torch.gather(mask, 1, idx)
            return torch.where(ok, idx, torch.full_like(idx, dummy))

        bidx = lists(visible[:, :B], B)
        pidx = lists(visible[:, B:], len(self.cyl["xy"]))
        return bidx.repeat_interleave(rays_per_row, 0), pidx.repeat_interleave(rays_per_row, 0)

    def _intersect(self, o: torch.Tensor, d: torch.Tensor, bidx: torch.Tensor, pidx: torch.Tensor):
        """First hit along rays o, d [R, 3] among boxes ``bidx`` [R, b] and poles ``pidx`` [R, p] (and the ground):
        (t [R] (inf: none), normal [R, 3], material [R] (-1: sky))."""
        R = len(d)
        inf = torch.full((R,), float("inf"), device=d.device)
        # ground plane z = 0 (material resolved by region in _shade)
        tg = torch.where(d[:, 2] < -1e-9, -o[:, 2] / d[:, 2].clamp(max=-1e-9), inf)
        hit = (tg > _EPS) & (tg < _FAR)
        t_best = torch.where(hit, tg, inf)
        normal = torch.zeros(R, 3, device=d.device)
        normal[:, 2] = hit.float()
        mat = torch.where(hit, self.mat_road, -1)
        # boxes: slab test
        inv = 1.0 / torch.where(d.abs() < 1e-12, torch.full_like(d, 1e-12), d)  # [R, 3]
        t1 = (self._bmin[bidx] - o[:, None]) * inv[:, None]  # [R, b, 3]
        t2 = (self._bmax[bidx] - o[:, None]) * inv[:, None]
        tnear, axis = torch.minimum(t1, t2).max(dim=2)  # [R, b]
        tfar = torch.maximum(t1, t2).min(dim=2).values
        tnear = torch.where((tnear <= tfar) & (tnear > _EPS), tnear, float("inf"))
        tb, j = tnear.min(dim=1)  # [R]
        better = tb < t_best
        ax = axis.gather(1, j[:, None])  # [R, 1]
        n = torch.zeros(R, 3, device=d.device).scatter_(1, ax, -torch.sign(d.gather(1, ax)))
        t_best = torch.where(better, tb, t_best)
        normal = torch.where(better[:, None], n, normal)
        mat = torch.where(better, self._bmat[bidx.gather(1, j[:, None])[:, 0]], mat)
        # vertical cylinders (poles), side surface only: |o_xy + t d_xy - c|² = r²
        c, r, h = self._pxy[pidx], self.cyl["r"], self.cyl["h"]  # [R, p, 2]
        oc = o[:, None, :2] - c
        dxy = d[:, None, :2]
        a = (dxy ** 2).sum(-1).clamp(min=1e-12)
        b = 2 * (oc * dxy).sum(-1)
        disc = b * b - 4 * a * ((oc ** 2).sum(-1) - r * r)
        tc = (-b - disc.clamp(min=0).sqrt()) / (2 * a)
        z = o[:, None, 2] + tc * d[:, None, 2]
        tc = torch.where((disc >= 0) & (tc > _EPS) & (z >= 0) & (z <= h), tc, float("inf"))
        tp, j = tc.min(dim=1)
        better = tp < t_best
        p = o + torch.where(better, tp, 0.0)[:, None] * d
        cj = c.gather(1, j[:, None, None].expand(R, 1, 2))[:, 0]
        n = torch.cat([(p[:, :2] - cj) / r, torch.zeros(R, 1, device=d.device)], 1)
        t_best = torch.where(better, tp, t_best)
        normal = torch.where(better[:, None], n, normal)
        mat = torch.where(better, self.cyl["mat"], mat)
        return t_best, normal, mat

    def _shade_rays(self, o, d, bidx, pidx) -> torch.Tensor:
        t, n, m = self._intersect(o, d, bidx, pidx)
        rgb = _sky(d)
        hit = m >= 0
        if hit.any():
            p = o[hit] + t[hit, None] * d[hit]
            rgb[hit] = self._shade(p, n[hit], m[hit])
        return rgb

    def _shade(self, p: torch.Tensor, n: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """Colour [N, 3] in [0, 1] of surface points p [N, 3] with normals n [N, 3] and materials m [N]."""
        L = self.layout
        on_ground = (m == self.mat_road) & ((p[:, 1] - L.road_center_y).abs() > L.road_half_width)
        m = torch.where(on_ground, torch.full_like(m, self.mat_grass), m)
        axis = n.abs().argmax(1)
        u = torch.where(axis == 0, p[:, 1], p[:, 0])  # planar mapping by the dominant normal axis
        v = torch.where(axis == 2, p[:, 1], p[:, 2])
        tile = self.mat_tile[m]
        offset = self.mat_offset[m]  # neighbouring objects of one texture do not line up
        g = sample_texture(self.textures, self.mat_tex[m], u / tile + offset, v / tile + offset)  # [N]
        rgb = self.mat_tint[m] * (0.35 + 0.65 * g)[:, None]
        flags = self.mat_flags[m]
        lanes = (flags == 1) & _lane_paint(p[:, 0], p[:, 1] - L.road_center_y, L.road_half_width)
        paint = torch.tensor([0.92, 0.92, 0.88], device=p.device) * (0.8 + 0.2 * g)[:, None]
        rgb = torch.where(lanes[:, None], paint, rgb)
        windows = (flags == 2) & (axis != 2) & _window(u, p[:, 2])
        rgb = torch.where(windows[:, None], torch.tensor([0.18, 0.24, 0.32], device=p.device) + 0.15 * g[:, None], rgb)
        lambert = 0.6 + 0.4 * (n @ _SUN.to(n.device)).clamp(min=0.0)
        return (rgb * lambert[:, None]).clamp(0.0, 1.0)

    def _sample_surfaces(self, n: int, g: torch.Generator, x0: float, x1: float):
        """Area-weighted candidates on the ground strip, box faces (no bottoms) and pole sides."""
        L = self.layout
        y_half = L.road_half_width + L.sidewalk_width + 25.0  # the ground strip sampled, around the road centre
        box_min, box_max, box_mat, pole_xy = (t.cpu() for t in (self.box_min, self.box_max, self.box_mat,
                                                                 self.cyl["xy"]))  # sampling runs on the CPU
        inrange = (box_max[:, 0] > x0) & (box_min[:, 0] < x1)
        bmin, bmax, bmat = box_min[inrange], box_max[inrange], box_mat[inrange]
        size = bmax - bmin  # [b, 3]
        # faces: +x, -x, +y, -y, +z  (axis, sign)
        faces = [(0, 1.0), (0, -1.0), (1, 1.0), (1, -1.0), (2, 1.0)]
        areas = [torch.full((1,), (x1 - x0) * 2 * y_half)]
        for ax, _ in faces:
            o1, o2 = [a for a in range(3) if a != ax]
            areas.append(size[:, o1] * size[:, o2])
        ncyl = len(pole_xy)
        areas.append(torch.full((ncyl,), 2 * np.pi * self.cyl["r"] * self.cyl["h"]))
        area = torch.cat(areas)
        pick = torch.multinomial(area / area.sum(), n, replacement=True, generator=g)  # [n]
        r = torch.rand(n, 3, generator=g)
        pts, nrm, mat = torch.zeros(n, 3), torch.zeros(n, 3), torch.zeros(n, dtype=torch.long)
        # ground
        sel = pick == 0
        pts[sel] = torch.stack([x0 + r[sel, 0] * (x1 - x0), L.road_center_y + (r[sel, 1] * 2 - 1) * y_half,
                                torch.zeros(int(sel.sum()))], 1)
        nrm[sel] = torch.tensor([0.0, 0.0, 1.0])
        mat[sel] = self.mat_road
        start, b = 1, len(bmin)
        for ax, sign in faces:
            sel = (pick >= start) & (pick < start + b)
            j = pick[sel] - start
            p = bmin[j] + r[sel] * size[j]
            p[:, ax] = bmax[j, ax] if sign > 0 else bmin[j, ax]
            pts[sel] = p
            nn = torch.zeros(int(sel.sum()), 3)
            nn[:, ax] = sign
            nrm[sel], mat[sel] = nn, bmat[j]
            start += b
        sel = pick >= start
        j = pick[sel] - start
        ang = r[sel, 0] * 2 * np.pi
        dirs = torch.stack([torch.cos(ang), torch.sin(ang), torch.zeros_like(ang)], 1)
        pts[sel] = torch.cat([pole_xy[j] + self.cyl["r"] * dirs[:, :2], (r[sel, 1] * self.cyl["h"])[:, None]], 1)
        nrm[sel], mat[sel] = dirs, self.cyl["mat"]
        return pts, nrm, mat

    def _inside_any_box(self, p: torch.Tensor) -> torch.Tensor:
        """Points inside some box (or pole): hidden surface, e.g. ground under a sidewalk. Strictly inside across x
        and y and below the top, but from the bottom face up: boxes stand on the ground (z = 0), so ground points in a
        footprint lie on the bottom face, which is hidden too."""
        e = 1e-3
        lo, hi, xy = self.box_min.cpu(), self.box_max.cpu(), self.cyl["xy"].cpu()
        margin = torch.tensor([e, e, -e])  # the bottom face counts as inside
        inside = ((p[:, None] > lo[None] + margin) & (p[:, None] < hi[None] - e)).all(-1).any(1)
        dxy = ((p[:, None, :2] - xy[None]) ** 2).sum(-1)
        in_pole = ((dxy < (self.cyl["r"] - e) ** 2) & (p[:, None, 2] < self.cyl["h"] - e)).any(1)
        return inside | in_pole


def camera_rays(camera: Camera, uv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """World ray origin [1, 3] and unit directions [N, 3] through pixel positions ``uv`` [N, 2] (pinhole)."""
    dev = uv.device
    K = torch.as_tensor(camera.K, dtype=torch.float32, device=dev)
    x = (uv[:, 0] - K[0, 2]) / K[0, 0]
    y = (uv[:, 1] - K[1, 2]) / K[1, 1]
    dc = torch.stack([x, y, torch.ones_like(x)], 1)  # camera coords, z forward
    R = torch.as_tensor(camera.rotation_c2w, dtype=torch.float32, device=dev)
    d = dc @ R.T
    d = d / d.norm(dim=1, keepdim=True)
    return torch.as_tensor(camera.position, dtype=torch.float32, device=dev)[None], d


def _sky(d: torch.Tensor) -> torch.Tensor:
    """Vertical gradient from a pale horizon to a deeper zenith blue; below the horizon, the horizon colour."""
    e = d[:, 2].clamp(0.0, 1.0)[:, None] ** 0.6
    horizon = torch.tensor([0.80, 0.86, 0.92], device=d.device)
    zenith = torch.tensor([0.30, 0.50, 0.82], device=d.device)
    return horizon * (1 - e) + zenith * e


def _lane_paint(x: torch.Tensor, y: torch.Tensor, road_half: float) -> torch.Tensor:
    """Dashed lane lines every 3.5 m (3 m paint, 6 m gap), a solid centre line and solid edge lines; ``y`` from
    the road's centre."""
    width = 0.075
    near_line = ((y / 3.5) - torch.round(y / 3.5)).abs() * 3.5 < width
    dashed = near_line & (torch.remainder(x, 9.0) < 3.0)
    centre = y.abs() < width * 2
    edge = (y.abs() - (road_half - 0.25)).abs() < width
    return (dashed | centre | edge) & (y.abs() < road_half)


def _window(u: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """A grid of windows (1.4 × 1.6 m per 3 × 3 m bay) above the ground floor."""
    fu, fz = torch.remainder(u, 3.0), torch.remainder(z, 3.0)
    return (z > 3.0) & (fu > 0.8) & (fu < 2.2) & (fz > 0.7) & (fz < 2.3)


def _to_u8(rgb: torch.Tensor) -> np.ndarray:
    return (rgb.clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).cpu().numpy()
