"""3D Gaussian Splatting (Kerbl et al., SIGGRAPH 2023) on gsplat: the model, its optimizers and densification.

Parameters follow gsplat's ``simple_trainer`` layout (means, log-scales, quats, opacity logits, SH DC ``sh0`` and
rest ``shN``), one Adam per parameter as gsplat's strategies require, and gsplat's ``DefaultStrategy`` for
densification. Rendering goes through :func:`difix3d.recon.rasterize.rasterize`: gsplat's kernels on CUDA, our
torch compositing on CPU, same API.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from gsplat.strategy import DefaultStrategy
from gsplat.strategy.ops import reset_opa
from torch import Tensor

from difix3d.device import default_device
from difix3d.errors import InputError
from difix3d.recon.base import RenderOutput, Representation, common_size
from difix3d.recon.losses import photometric_loss
from difix3d.recon.ply import read_ply, write_ply
from difix3d.recon.rasterize import rasterize
from difix3d.scene.camera import Camera

log = logging.getLogger(__name__)

SH_C0 = 0.28209479177387814  # degree-0 SH basis: rgb = SH_C0 · f_dc + 0.5
PAPER_STEPS = 30_000  # the 3DGS paper's / gsplat simple_trainer's iteration budget the schedules are tuned for


@dataclass
class GaussianConfig:
    """3DGS hyper-parameters. Defaults: gsplat ``examples/simple_trainer.py`` (= the 3DGS paper's, Kerbl et al.
    2023, Sec. 7.1); schedules are given for 30 000 steps and scaled to ``iterations``."""

    iterations: int = PAPER_STEPS  # the training budget; schedule fields below are scaled by iterations / 30 000
    sh_degree: int = 3  # final SH degree (paper: 3)
    sh_degree_interval: int = 1000  # raise the SH degree every this many steps (at 30k)
    ssim_lambda: float = 0.2  # loss = 0.8·L1 + 0.2·(1 − SSIM) (paper Eq. 7)
    # learning rates (simple_trainer); the means lr is × scene_scale and decays ×0.01 over the budget
    means_lr: float = 1.6e-4
    means_lr_final_factor: float = 0.01
    scales_lr: float = 5e-3
    quats_lr: float = 1e-3
    opacities_lr: float = 5e-2
    sh0_lr: float = 2.5e-3
    shN_lr: float = 2.5e-3 / 20
    batch_size: int = 1  # views per step; lrs scale by sqrt(batch_size) as in simple_trainer
    # initialization (simple_trainer): opacity 0.1, isotropic scale = mean distance to the 3 nearest neighbours
    init_opacity: float = 0.1
    init_scale: float = 1.0
    init_num_random: int = 100_000  # random init when the scene has no points (simple_trainer: 100k)
    init_extent: float = 3.0  # random points up to init_extent · scene_scale in front of the cameras
    # densification: gsplat DefaultStrategy thresholds (at 30k steps: refine 500..15 000 every 100, reset 3000)
    prune_opa: float = 0.005
    grow_grad2d: float = 0.0002
    grow_scale3d: float = 0.01
    prune_scale3d: float = 0.1
    refine_start_iter: int = 500
    refine_stop_iter: int = 15_000
    refine_every: int = 100
    reset_every: int = 3000
    densify: bool = True
    background: tuple[float, float, float] = (0.0, 0.0, 0.0)
    render_chunk: int = 8  # cameras per rasterization call in render()
    backend: str = "auto"  # rasterizer: "auto" (gsplat on CUDA, torch elsewhere), "gsplat" or "torch"

    def __post_init__(self) -> None:
        try:  # a background set as JSON ([1, 1, 1]) comes as ints: gsplat's CUDA kernels take float32 only
            background = tuple(float(v) for v in self.background)
        except (TypeError, ValueError):
            background = ()
        if len(background) != 3 or not all(0.0 <= v <= 1.0 for v in background):
            raise ValueError(f"background: expected 3 numbers in [0, 1] (RGB), got {self.background!r}")
        self.background = background

    def scaled(self, steps_at_30k: int, minimum: int = 1) -> int:
        """A schedule length given for 30 000 steps, scaled to this config's ``iterations``."""
        return max(minimum, int(round(steps_at_30k * self.iterations / PAPER_STEPS)))

    def make_strategy(self) -> DefaultStrategy:
        return DefaultStrategy(
            prune_opa=self.prune_opa, grow_grad2d=self.grow_grad2d, grow_scale3d=self.grow_scale3d,
            prune_scale3d=self.prune_scale3d, refine_start_iter=self.scaled(self.refine_start_iter),
            refine_stop_iter=self.scaled(self.refine_stop_iter) if self.densify else 0,
            refine_every=self.scaled(self.refine_every, minimum=5), reset_every=self.scaled(self.reset_every),
        )

    @classmethod
    def tiny(cls, iterations: int = 300, **kw) -> "GaussianConfig":
        """Small budget for CPU tests and demos: degree-1 SH, few random points, densification every 5 % of the
        budget until half of it with a 10× higher gradient threshold (keeps CPU runs to a few thousand Gaussians),
        no opacity reset (at a few hundred steps, opacities cannot recover from one), and a 10× colour lr (at
        2.5e-3 Adam moves a colour ~0.07 per 100 steps: too slow to converge in such a budget)."""
        return cls(iterations=iterations, **{
            "sh_degree": 1, "init_num_random": 2000, "refine_start_iter": 1500, "refine_every": 1500,
            "grow_grad2d": 0.002, "sh0_lr": 2.5e-2, "shN_lr": 2.5e-2 / 20,
            "reset_every": PAPER_STEPS, **kw})


class GaussianSplat(Representation):
    """A 3DGS scene: render cameras, take optimizer steps, densify, save/resume, export PLY."""

    PARAM_NAMES = ("means", "scales", "quats", "opacities", "sh0", "shN")

    def __init__(self, params: dict[str, Tensor], config: GaussianConfig, scene_scale: float = 1.0,
                 device: torch.device | str | None = None):
        self.config = config
        self.device = default_device(device)
        self.scene_scale = float(scene_scale)
        self.strategy = config.make_strategy()
        self._step = 0
        self._sh_floor = 0  # SH degree already trained (a model read from a PLY renders with all its bands)
        self._build(params)
        self.strategy.check_sanity(self.params, self.optimizers)
        self.strategy_state = self.strategy.initialize_state(scene_scale=self.scene_scale)

    # ---- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_points(cls, points, colors, config: GaussianConfig | None = None, device=None,
                    scene_scale: float | None = None) -> "GaussianSplat":
        """Gaussians at points [N, 3] with colours [N, 3] (uint8 or float in [0, 1]), as simple_trainer inits."""
        config = config or GaussianConfig()
        points = torch.as_tensor(np.asarray(points), dtype=torch.float32).reshape(-1, 3)
        colors = np.asarray(colors)
        if colors.ndim != 2 or colors.shape[-1] != 3:
            raise ValueError(f"from_points: colours must be [N, 3] (RGB), got shape {list(colors.shape)}")
        if np.issubdtype(colors.dtype, np.integer):  # 0..255 whatever the integer type
            if colors.size and (colors.min() < 0 or colors.max() > 255):
                raise ValueError(f"from_points: integer colours outside 0..255 ({colors.min()}..{colors.max()})")
            colors = colors.astype(np.uint8)
        colors = torch.as_tensor(colors)
        if points.shape[0] == 0 or points.shape[0] != colors.shape[0]:
            raise ValueError(f"from_points: {points.shape[0]} points and {colors.shape[0]} colours")
        if not torch.isfinite(points).all():
            raise ValueError("from_points: points contain NaN or inf")
        colors = colors.float() / 255.0 if colors.dtype == torch.uint8 else colors.float()
        N = points.shape[0]
        dist = _mean_knn_distance(points.numpy(), k=3)  # [N]
        K = (config.sh_degree + 1) ** 2
        params = {
            "means": points,
            "scales": torch.log(dist * config.init_scale).unsqueeze(-1).repeat(1, 3),
            "quats": torch.rand(N, 4),  # simple_trainer: random rotations
            "opacities": torch.logit(torch.full((N,), config.init_opacity)),
            "sh0": ((colors.clamp(0, 1) - 0.5) / SH_C0).unsqueeze(1),  # [N, 1, 3]
            "shN": torch.zeros(N, K - 1, 3),
        }
        if scene_scale is None:
            scene_scale = float(torch.linalg.norm(points - points.mean(0), dim=-1).median()) or 1.0
        return cls(params, config, scene_scale=scene_scale, device=device)

    @classmethod
    def from_scene(cls, scene, config: GaussianConfig | None = None, device=None,
                   split: str = "train", seed: int = 0) -> "GaussianSplat":
        """From ``scene.points``/``point_colors`` when present, else random points inside the training frusta.

        scene_scale = 1.1 × the largest distance of a training camera from their mean (gsplat's parser), or the
        points' median spread when the cameras barely move."""
        config = config or GaussianConfig()
        _check_pinhole(scene)
        idx = scene.splits.get(split) or list(range(len(scene.cameras)))
        cams = [scene.cameras[i] for i in idx]
        centres = np.stack([c.position for c in cams])
        scene_scale = 1.1 * float(np.linalg.norm(centres - centres.mean(0), axis=1).max())
        points = getattr(scene, "points", None)
        if points is not None and len(points) > 0:
            colors = getattr(scene, "point_colors", None)
            colors = np.full((len(points), 3), 128, np.uint8) if colors is None else colors
            if scene_scale < 1e-6:
                scene_scale = float(np.median(np.linalg.norm(points - centres.mean(0), axis=1)))
        else:
            scene_scale = scene_scale if scene_scale > 1e-6 else 1.0
            points, colors = random_points_in_frusta(cams, config.init_num_random,
                                                     config.init_extent * scene_scale, seed=seed)
        return cls.from_points(points, colors, config, device=device, scene_scale=scene_scale)

    @classmethod
    def from_ply(cls, uri: str, config: GaussianConfig | None = None, device=None,
                 scene_scale: float = 1.0) -> "GaussianSplat":
        params = read_ply(uri)
        if params["means"].shape[0] == 0:
            raise InputError(uri, "holds no Gaussians (0 vertices): nothing to render or train")
        K = params["shN"].shape[1] + 1
        config = config or GaussianConfig(sh_degree=int(math.isqrt(K)) - 1)
        if (config.sh_degree + 1) ** 2 != K:
            raise InputError(uri, f"{K} SH coefficients per colour, config expects degree {config.sh_degree}")
        model = cls(params, config, scene_scale=scene_scale, device=device)
        model._sh_floor = config.sh_degree  # its higher bands were trained: render and train with them from step 0
        return model

    def _build(self, params: dict[str, Tensor]) -> None:
        """(Re)create parameters, one Adam each (gsplat strategies require it), and the means lr schedule."""
        cfg, bs = self.config, self.config.batch_size
        missing = [k for k in self.PARAM_NAMES if k not in params]
        if missing:
            raise ValueError(f"Gaussian parameters missing {missing}")
        rest = (cfg.sh_degree + 1) ** 2 - 1
        if params["shN"].ndim != 3 or params["shN"].shape[1] != rest:
            raise ValueError(f"shN has shape {tuple(params['shN'].shape)}: SH degree {cfg.sh_degree} needs "
                             f"[N, {rest}, 3]")
        self.params = torch.nn.ParameterDict(
            {k: torch.nn.Parameter(params[k].detach().to(self.device, torch.float32).clone())
             for k in self.PARAM_NAMES})
        lrs = {"means": cfg.means_lr * self.scene_scale, "scales": cfg.scales_lr, "quats": cfg.quats_lr,
               "opacities": cfg.opacities_lr, "sh0": cfg.sh0_lr, "shN": cfg.shN_lr}
        self.optimizers = {  # batch scaling as simple_trainer: lr·√B, eps/√B, betas 1 − B·(1 − β)
            k: torch.optim.Adam([{"params": self.params[k], "lr": lrs[k] * math.sqrt(bs), "name": k}],
                                eps=1e-15 / math.sqrt(bs), betas=(1 - bs * (1 - 0.9), 1 - bs * (1 - 0.999)))
            for k in self.PARAM_NAMES}
        self.means_scheduler = torch.optim.lr_scheduler.ExponentialLR(
            self.optimizers["means"], gamma=cfg.means_lr_final_factor ** (1.0 / max(1, cfg.iterations)))

    # ---- Representation -----------------------------------------------------------------------------------
    @property
    def num_primitives(self) -> int:
        return int(self.params["means"].shape[0])

    @property
    def step(self) -> int:
        return self._step

    @property
    def active_sh_degree(self) -> int:
        grown = self._step // self.config.scaled(self.config.sh_degree_interval)
        return min(max(grown, self._sh_floor), self.config.sh_degree)

    def rasterize(self, cameras: list[Camera], sh_degree: int | None = None,
                  render_mode: str = "RGB") -> tuple[Tensor, Tensor, dict]:
        """Differentiable render → (colors [C, H, W, 3|4], alphas [C, H, W, 1], meta) as gsplat returns them."""
        W, H = common_size(cameras)
        p = self.params
        viewmats = torch.stack([c.torch_viewmat(self.device) for c in cameras])  # [C, 4, 4]
        Ks = torch.stack([c.torch_K(self.device) for c in cameras])  # [C, 3, 3]
        bg = torch.tensor(self.config.background, dtype=torch.float32, device=self.device).repeat(len(cameras), 1)
        return rasterize(p["means"], p["quats"], torch.exp(p["scales"]), torch.sigmoid(p["opacities"]),
                         torch.cat([p["sh0"], p["shN"]], dim=1), viewmats, Ks, W, H,
                         sh_degree=self.active_sh_degree if sh_degree is None else sh_degree,
                         backgrounds=bg, render_mode=render_mode, backend=self.config.backend)

    @torch.no_grad()
    def render(self, cameras: list[Camera]) -> RenderOutput:
        rgbs, alphas, depths = [], [], []
        for i in range(0, len(cameras), self.config.render_chunk):
            col, alp, _ = self.rasterize(cameras[i:i + self.config.render_chunk], render_mode="RGB+ED")
            rgbs.append(col[..., :3].clamp(0, 1).permute(0, 3, 1, 2))
            depths.append(col[..., 3:].permute(0, 3, 1, 2))
            alphas.append(alp.permute(0, 3, 1, 2))
        return RenderOutput(rgb=torch.cat(rgbs), alpha=torch.cat(alphas), depth=torch.cat(depths))

    def train_step(self, cameras: list[Camera], images: Tensor, weights: Tensor | None = None,
                   masks: Tensor | None = None) -> dict:
        W, H = common_size(cameras)
        if images.shape != (len(cameras), 3, H, W):
            raise ValueError(f"images {tuple(images.shape)}: expected {(len(cameras), 3, H, W)} for these cameras")
        if not images.is_floating_point():
            raise ValueError(f"images: expected float values in [0, 1], got dtype {images.dtype}")
        step = self._step
        images = images.to(self.device, torch.float32)
        weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float32, device=self.device)
        masks = None if masks is None else masks.to(self.device, torch.float32)
        colors, _, info = self.rasterize(cameras)
        self.strategy.step_pre_backward(self.params, self.optimizers, self.strategy_state, step, info)
        render = colors.permute(0, 3, 1, 2)  # [B, 3, H, W]
        loss, terms = photometric_loss(render, images, weights, masks, self.config.ssim_lambda)
        loss.backward()
        for opt in self.optimizers.values():
            opt.step()
            opt.zero_grad(set_to_none=True)
        self.means_scheduler.step()
        if self.config.densify:
            self.strategy.step_post_backward(self.params, self.optimizers, self.strategy_state, step, info,
                                             packed=False)
            self._maybe_reset_opacity(step)
            if self.num_primitives == 0:
                raise ValueError(f"step {step}: densification pruned every Gaussian (all opacities under prune_opa "
                                 f"{self.strategy.prune_opa} or too large): nothing left to train or render")
        self._step += 1
        loss_value = loss.item()  # the step's one sync, as before
        if not math.isfinite(loss_value):  # one NaN view poisons every parameter: stop, naming it, not train on
            raise ValueError(f"step {step}: non-finite loss on views {[c.name for c in cameras]} (NaN or inf in "
                             "their images or cameras); the model took the step: resume from the last checkpoint")
        mse = ((render.detach().clamp(0, 1) - images) ** 2).mean()
        return {"loss": loss_value, "l1": float(terms["l1"].mean()), "psnr": float(-10 * torch.log10(mse + 1e-10)),
                "num_gaussians": self.num_primitives, "sh_degree": self.active_sh_degree}

    def _maybe_reset_opacity(self, step: int) -> None:
        """Opacity reset (3DGS paper Sec. 5.2). gsplat 1.5.3's DefaultStrategy never runs it (its condition
        ``step % reset_every == 0 & step > 0`` parses as a chained comparison that is always False), so do it
        here on the same schedule, while densification is on."""
        s = self.strategy
        if 0 < step < s.refine_stop_iter and step % s.reset_every == 0:
            reset_opa(params=self.params, optimizers=self.optimizers, state=self.strategy_state,
                      value=s.prune_opa * 2.0)

    def state_dict(self) -> dict:
        """The training state, tensors on the model's device (detached, not copied, as torch's optimizer
        ``state_dict`` hands out its moments): a caller that keeps it while training goes on copies it (the progressive
        loop snapshots it on the device; ``torch.save`` writes it at once). A host copy here would stall the training
        thread on a device-to-host copy of every parameter at each progressive round."""
        return {
            "params": {k: v.detach() for k, v in self.params.items()},
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "means_scheduler": self.means_scheduler.state_dict(),
            "strategy_state": {k: v.detach() if torch.is_tensor(v) else v for k, v in self.strategy_state.items()},
            "step": self._step,
            "sh_degree_floor": self._sh_floor,
            "scene_scale": self.scene_scale,
            "config": asdict(self.config),
        }

    # how a model renders, not what it trains on: may differ between a saved state and the model it loads into
    _NOT_TRAINING = ("render_chunk", "backend")

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict`. A state saved under another :class:`GaussianConfig` (SH degree, budget,
        schedules) is a ValueError naming the fields: resumed, it would train on a mix of both schedules."""
        saved = state.get("config")
        if saved is not None:
            now = asdict(self.config)
            changed = [f"{k} {saved[k]!r} -> {now[k]!r}" for k in now
                       if k in saved and k not in self._NOT_TRAINING and _as_list(saved[k]) != _as_list(now[k])]
            if changed:
                raise ValueError(f"saved with other Gaussian settings ({'; '.join(changed)}): resume with the "
                                 "settings it was saved with")
        self.scene_scale = float(state["scene_scale"])
        self._build(state["params"])
        for k, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][k])
            for moments in o.state.values():  # loaded on the same device, torch keeps the given tensors: copy them
                for name, v in moments.items():
                    if torch.is_tensor(v):
                        moments[name] = v.clone()
        self.means_scheduler.load_state_dict(state["means_scheduler"])
        self.strategy_state = {k: v.detach().to(self.device, copy=True) if torch.is_tensor(v) else v
                               for k, v in state["strategy_state"].items()}  # never shared with the state's owner
        self._step = int(state["step"])
        self._sh_floor = int(state.get("sh_degree_floor", 0))

    @classmethod
    def from_state_dict(cls, state: dict, device=None) -> "GaussianSplat":
        config = GaussianConfig(**{**state["config"], "background": tuple(state["config"]["background"])})
        model = cls(state["params"], config, scene_scale=state["scene_scale"], device=device)
        model.load_state_dict(state)
        return model

    def export(self, uri: str) -> None:
        write_ply(uri, dict(self.params))


def random_points_in_frusta(cameras: list[Camera], n: int, far: float, near: float = 0.1,
                            seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n points uniform over pixels and depth in [near·far, far] of randomly chosen cameras, random colours."""
    rng = np.random.default_rng(seed)
    cam_idx = rng.integers(0, len(cameras), n)
    points = np.empty((n, 3))
    for i, cam in enumerate(cameras):
        sel = np.nonzero(cam_idx == i)[0]
        uv1 = np.stack([rng.uniform(0, cam.width, len(sel)), rng.uniform(0, cam.height, len(sel)),
                        np.ones(len(sel))], axis=1)  # [n_i, 3]
        depth = rng.uniform(near * far, far, len(sel))[:, None]
        pc = (uv1 @ np.linalg.inv(cam.K).T) * depth  # camera-frame points
        points[sel] = pc @ cam.rotation_c2w.T + cam.position
    return points.astype(np.float32), rng.integers(0, 256, (n, 3)).astype(np.uint8)


def _as_list(value):
    """Tuples as lists, for comparing configs saved and rebuilt."""
    return [_as_list(v) for v in value] if isinstance(value, (list, tuple)) else value


def _mean_knn_distance(points: np.ndarray, k: int = 3) -> Tensor:
    """RMS distance to the k nearest neighbours (simple_trainer's scale init), via scipy's KD-tree (fast at 1M)."""
    from scipy.spatial import cKDTree

    if len(points) <= 1:
        return torch.ones(len(points))
    k_eff = min(k, len(points) - 1)
    d, _ = cKDTree(points).query(points, k=k_eff + 1)  # first neighbour is the point itself
    d = np.sqrt((d[:, 1:] ** 2).mean(axis=1))
    return torch.from_numpy(np.maximum(d, 1e-7)).float()



def _check_pinhole(scene) -> None:
    """3DGS here renders pinhole cameras (gsplat's rasterizer takes no distortion coefficients): a scene that was not
    undistorted (:func:`difix3d.scene.undistort.undistorted`) trains its images as they are. Said once, with how far
    off the image corners are."""
    worst, name = 0.0, ""
    for cam in scene.cameras:
        if cam.dist is not None and np.any(np.abs(cam.dist) > 1e-9):
            shift = _corner_distortion_px(cam)
            if shift > worst:
                worst, name = shift, cam.name
    if worst > 1.0:
        log.warning("%s: lens distortion moves the image corners by up to %.1f px (camera %r); the 3DGS backend "
                    "renders pinhole cameras and trains the images as they are: pass difix3d.scene.undistort."
                    "undistorted(scene) (reconstruct_scene does) for exact registration",
                    getattr(scene, "root", "") or getattr(scene, "name", "scene"), worst, name)


def _corner_distortion_px(cam) -> float:
    """Largest pixel displacement of the four image corners under the camera's OpenCV distortion (k1 k2 p1 p2 k3)."""
    k1, k2, p1, p2, k3 = (list(cam.dist) + [0.0] * 5)[:5]
    fx, fy, cx, cy = cam.K[0, 0], cam.K[1, 1], cam.K[0, 2], cam.K[1, 2]
    worst = 0.0
    for u, v in ((0, 0), (cam.width, 0), (0, cam.height), (cam.width, cam.height)):
        x, y = (u - cx) / fx, (v - cy) / fy
        r2 = x * x + y * y
        radial = 1 + k1 * r2 + k2 * r2 ** 2 + k3 * r2 ** 3
        xd = x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x)
        yd = y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y
        worst = max(worst, float(np.hypot((xd - x) * fx, (yd - y) * fy)))
    return worst
