"""NeRF backend: nerfstudio's Nerfacto (Tancik et al., SIGGRAPH 2023) behind the :class:`Representation` interface.

The model, its fields, proposal sampler, renderers and auxiliary losses are nerfstudio's (``NerfactoModel``); ray
generation is nerfstudio's ``Cameras.generate_rays`` on our OpenCV :class:`Camera` s converted to its OpenGL
camera→world convention. What nerfstudio's Trainer/DataManager would do is written here, because they are built
around its own datasets and checkpoint files: random rays across the given views (with per-view weights and pixel
masks, which nerfstudio has no notion of), the optimizers/schedulers, the proposal-sampler callbacks and a
state_dict save/load (nerfstudio's checkpoint loading breaks on torch >= 2.6, ``weights_only``).

World coordinates are normalized like nerfstudio's dataparser (``auto_scale_poses``, ``center_method="poses"``):
training camera centres are centred and scaled into [-1, 1], so Nerfacto's scene contraction sees the scene where
it expects it. Depths come back in the scene's own units (camera z).

nerfstudio is the optional extra ``difix3d[nerf]``; see :data:`INSTALL_HINT`.
"""

from __future__ import annotations

import copy
import io
import logging
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from unittest import mock

import numpy as np
import torch
from torch import Tensor

from difix3d import storage
from difix3d.device import default_device
from difix3d.errors import CheckpointError
from difix3d.recon.base import RenderOutput, Representation, common_size
from difix3d.scene.camera import Camera

INSTALL_HINT = ("the NeRF backend needs nerfstudio (the optional extra difix3d[nerf]); nerfstudio's own pins would "
                "break this stack, so install it without them: "
                "pip install --no-deps nerfstudio==1.1.5 tyro opencv-python-headless viser nerfacc")
EXPORT_FORMAT = "difix3d.recon.nerf/1"
OPENCV_TO_OPENGL = np.diag([1.0, -1.0, -1.0, 1.0])  # camera axes: x right, y down, z forward → y up, z backward
PAPER_STEPS = 30_000  # nerfstudio method_configs["nerfacto"].max_num_iterations

log = logging.getLogger(__name__)


def _proposal_nets() -> tuple[dict, ...]:
    # NerfactoModelConfig.proposal_net_args_list defaults
    return ({"hidden_dim": 16, "log2_hashmap_size": 17, "num_levels": 5, "max_res": 128, "use_linear": False},
            {"hidden_dim": 16, "log2_hashmap_size": 17, "num_levels": 5, "max_res": 256, "use_linear": False})


@dataclass
class NerfConfig:
    """Nerfacto hyper-parameters. Defaults: nerfstudio 1.1.5 ``method_configs["nerfacto"]`` and
    ``NerfactoModelConfig`` (the Nerfacto the Difix3D+ paper, Wu et al. CVPR 2025 Tab. 1, reports on)."""

    # training budget (nerfstudio: max_num_iterations 30 000); the schedules below are nerfstudio's own step counts
    # (lr_decay_steps, proposal_warmup, ...): unlike GaussianConfig's, they do not scale with it
    iterations: int = PAPER_STEPS
    rays_per_batch: int = 4096  # train_num_rays_per_batch
    render_chunk: int = 1 << 15  # eval_num_rays_per_chunk
    # optimizers: Adam(lr 1e-2, eps 1e-15) for fields and proposal nets, exponential decay to 1e-4 over 200k steps
    lr: float = 1e-2
    lr_final: float = 1e-4
    lr_decay_steps: int = 200_000
    adam_eps: float = 1e-15
    # model (NerfactoModelConfig; average_init_density from method_configs)
    hidden_dim: int = 64
    hidden_dim_color: int = 64
    num_levels: int = 16
    base_res: int = 16
    max_res: int = 2048
    log2_hashmap_size: int = 19
    features_per_level: int = 2
    num_proposal_samples_per_ray: tuple[int, ...] = (256, 96)
    num_nerf_samples_per_ray: int = 48
    proposal_net_args_list: tuple[dict, ...] = field(default_factory=_proposal_nets)
    proposal_update_every: int = 5
    proposal_warmup: int = 5000
    proposal_weights_anneal_max_num_iters: int = 1000
    use_single_jitter: bool = True
    average_init_density: float = 0.01
    near_plane: float = 0.05  # in normalized scene units (nerfstudio's default)...
    # ...but never farther than this from the camera, in world units: normalized 0.05 of a 200-frame driving segment
    # is ~5 m, which cut off the road just ahead of the car
    max_near_world: float = 0.5
    far_plane: float = 1000.0
    background_color: str = "last_sample"
    interlevel_loss_mult: float = 1.0
    distortion_loss_mult: float = 0.002
    # Deviations from nerfstudio's defaults, both because pseudo views (progressive Difix3D) join training as new
    # cameras while it runs: a per-image appearance embedding has a fixed number of slots, and pose refinement
    # (nerfstudio: SO3xR3) would move cameras that are exact by construction.
    use_appearance_embedding: bool = False
    camera_optimizer: str = "off"
    implementation: str = "auto"  # "tcnn" on CUDA when tinycudann imports, else nerfstudio's torch hash grid
    scene_radius: float = 1.0  # training camera centres are scaled into [-scene_radius, scene_radius]^3
    seed: int = 0  # ray sampling generator

    def __post_init__(self) -> None:
        if self.use_appearance_embedding:
            # nerfstudio indexes the embedding by each ray's camera index; train steps see views, not scene indices,
            # and pseudo views have no slot, so every view would train slot 0: refused rather than silently inert
            raise ValueError("nerf.use_appearance_embedding: not supported (train steps carry no per-image index "
                             "and pseudo views join without a slot); leave it False")
        if self.implementation not in ("auto", "tcnn", "torch"):
            raise ValueError(f"nerf.implementation: expected auto, tcnn or torch, got {self.implementation!r}")
        if self.camera_optimizer != "off":  # pose refinement is in no optimizer here: it would be silently inert
            raise ValueError(f"nerf.camera_optimizer: only 'off' is supported (pseudo views are exact cameras), got "
                             f"{self.camera_optimizer!r}")
        if self.background_color not in ("last_sample", "random", "black", "white"):
            raise ValueError(f"nerf.background_color: expected last_sample, random, black or white, got "
                             f"{self.background_color!r}")
        for name in ("rays_per_batch", "render_chunk", "scene_radius", "near_plane", "max_near_world"):
            if not getattr(self, name) > 0:
                raise ValueError(f"nerf.{name} must be > 0, got {getattr(self, name)!r}")
        if not self.near_plane < self.far_plane:
            raise ValueError(f"nerf.near_plane {self.near_plane} must be below far_plane {self.far_plane}")

    @classmethod
    def tiny(cls, iterations: int = 300, **kw) -> "NerfConfig":
        """CPU tests and demos on images of a few hundred pixels: a 4-level 4k-entry hash grid, one small
        proposal net, 48 samples per ray, 256 rays per step, no proposal warm-up (~0.1-0.2 s a step on a CPU core)."""
        return cls(iterations=iterations, **{
            "rays_per_batch": 256, "render_chunk": 4096, "hidden_dim": 32, "hidden_dim_color": 32,
            "num_levels": 4, "base_res": 8, "max_res": 64, "log2_hashmap_size": 12,
            "num_proposal_samples_per_ray": (32,), "num_nerf_samples_per_ray": 16,
            "proposal_net_args_list": ({"hidden_dim": 16, "log2_hashmap_size": 12, "num_levels": 4, "max_res": 32,
                                        "use_linear": False},),
            "proposal_warmup": 100, "proposal_weights_anneal_max_num_iters": 100, **kw})

    @classmethod
    def from_dict(cls, d: dict) -> "NerfConfig":
        d = dict(d)
        d["num_proposal_samples_per_ray"] = tuple(d["num_proposal_samples_per_ray"])
        d["proposal_net_args_list"] = tuple(dict(a) for a in d["proposal_net_args_list"])
        return cls(**d)


def nerfstudio_available() -> bool:
    try:
        _nerfstudio()
    except ImportError:
        return False
    return True


def _nerfstudio():
    """The nerfstudio pieces used here, or an ImportError saying what to install."""
    try:
        from nerfstudio.cameras.camera_optimizers import CameraOptimizerConfig
        from nerfstudio.cameras.cameras import Cameras, CameraType
        from nerfstudio.data.scene_box import SceneBox
        from nerfstudio.engine.schedulers import ExponentialDecaySchedulerConfig
        from nerfstudio.model_components.losses import distortion_loss, interlevel_loss
        from nerfstudio.models.nerfacto import NerfactoModelConfig
    except ImportError as e:
        raise ImportError(f"{INSTALL_HINT} (import failed: {e})") from e
    return dict(CameraOptimizerConfig=CameraOptimizerConfig, Cameras=Cameras, CameraType=CameraType,
                SceneBox=SceneBox, ExponentialDecaySchedulerConfig=ExponentialDecaySchedulerConfig,
                distortion_loss=distortion_loss, interlevel_loss=interlevel_loss,
                NerfactoModelConfig=NerfactoModelConfig)


class _NoLPIPS(torch.nn.Module):
    """Stands in for the LPIPS metric NerfactoModel builds for its own eval loop (it downloads AlexNet weights,
    and we score with difix3d.eval instead)."""

    def __init__(self, *args, **kwargs):
        super().__init__()

    def forward(self, *args, **kwargs):
        raise RuntimeError("LPIPS is not built inside NerfactoScene; use difix3d.eval")


@contextmanager
def _no_lpips():
    with mock.patch("torchmetrics.image.lpip.LearnedPerceptualImagePatchSimilarity", _NoLPIPS):
        yield


def _saved_implementation(state: dict) -> str:
    """"tcnn" or "torch": recorded in the state, or (files from before it was) told by tcnn's parameter names."""
    if state.get("implementation") in ("tcnn", "torch"):
        return state["implementation"]
    return "tcnn" if any("tcnn_" in k for k in state.get("model", {})) else "torch"


def _refuse_implementation(saved: str, here: str, device: torch.device) -> None:
    if saved == "tcnn":
        raise ValueError(f"it was trained with tiny-cuda-nn, whose fused weights nerfstudio's torch hash grid cannot "
                         f"read; load it on a CUDA device where tinycudann imports (here: the {here!r} "
                         f"implementation on {device.type})")
    raise ValueError(f"it was trained with the {saved!r} implementation, this model uses {here!r}; build it with "
                     f"NerfConfig(implementation={saved!r})")


def _resolve_implementation(requested: str, device: torch.device) -> str:
    if requested == "torch":
        return requested
    if requested == "tcnn":  # nerfstudio would fall back to its torch grid and the model would say "tcnn"
        problem = "needs a CUDA device" if device.type != "cuda" else None
        if problem is None:
            try:
                import tinycudann  # noqa: F401
            except ImportError:
                problem = "needs tiny-cuda-nn's torch bindings (tinycudann), which do not import here"
        if problem:
            raise ValueError(f"nerf.implementation 'tcnn' {problem}: use 'auto' or 'torch'")
        return requested
    if device.type != "cuda":
        return "torch"
    try:
        import tinycudann  # noqa: F401
    except ImportError:
        log.warning("tiny-cuda-nn is not installed: Nerfacto uses nerfstudio's torch hash grid on CUDA, several times "
                    "slower (~9 it/s on an H200); install tiny-cuda-nn's torch bindings for full-size runs")
        return "torch"
    return "tcnn"


class NerfactoScene(Representation):
    """A Nerfacto NeRF: random-ray optimizer steps on posed views (weights, masks), chunked rendering, resume."""

    GROUPS = ("proposal_networks", "fields")

    def __init__(self, config: NerfConfig, center: np.ndarray, scale: float, num_train_data: int = 1,
                 device: torch.device | str | None = None):
        self.ns = _nerfstudio()
        self.config = config
        self.device = default_device(device)
        self.center = np.asarray(center, dtype=np.float64).reshape(3)  # world point mapped to the origin
        self.scale = float(scale)  # world units → normalized units
        self.num_train_data = int(num_train_data)
        self.implementation = _resolve_implementation(config.implementation, self.device)
        self._step = 0
        self.generator = torch.Generator().manual_seed(config.seed)
        self._build()

    # ---- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_cameras(cls, cameras: list[Camera], config: NerfConfig | None = None,
                     device=None) -> "NerfactoScene":
        """Normalization from the training cameras (nerfstudio's dataparser: centre the camera centres, scale the
        largest absolute coordinate to ``scene_radius``)."""
        config = config or NerfConfig()
        if not cameras:
            raise ValueError("NerfactoScene.from_cameras: no cameras given")
        centres = np.stack([c.position for c in cameras])  # [N, 3]
        center = centres.mean(axis=0)
        extent = float(np.abs(centres - center).max())
        scale = config.scene_radius / extent if extent > 1e-6 else 1.0
        return cls(config, center, scale, num_train_data=len(cameras), device=device)

    @classmethod
    def from_scene(cls, scene, config: NerfConfig | None = None, device=None, split: str = "train",
                   seed: int | None = None) -> "NerfactoScene":
        idx = scene.splits.get(split) or list(range(len(scene.cameras)))
        if seed is not None:
            config = NerfConfig.from_dict({**asdict(config or NerfConfig()), "seed": int(seed)})
        return cls.from_cameras([scene.cameras[i] for i in idx], config, device)

    def _build(self) -> None:
        """The nerfstudio model, one Adam per parameter group with its exponential-decay scheduler."""
        cfg, ns = self.config, self.ns
        model_config = ns["NerfactoModelConfig"](
            near_plane=min(cfg.near_plane, cfg.max_near_world * self.scale), far_plane=cfg.far_plane, background_color=cfg.background_color,
            hidden_dim=cfg.hidden_dim, hidden_dim_color=cfg.hidden_dim_color, num_levels=cfg.num_levels,
            base_res=cfg.base_res, max_res=cfg.max_res, log2_hashmap_size=cfg.log2_hashmap_size,
            features_per_level=cfg.features_per_level,
            num_proposal_samples_per_ray=tuple(cfg.num_proposal_samples_per_ray),
            num_proposal_iterations=len(cfg.num_proposal_samples_per_ray),
            num_nerf_samples_per_ray=cfg.num_nerf_samples_per_ray,
            proposal_net_args_list=[dict(a) for a in cfg.proposal_net_args_list],
            proposal_update_every=cfg.proposal_update_every, proposal_warmup=cfg.proposal_warmup,
            proposal_weights_anneal_max_num_iters=cfg.proposal_weights_anneal_max_num_iters,
            use_single_jitter=cfg.use_single_jitter, average_init_density=cfg.average_init_density,
            interlevel_loss_mult=cfg.interlevel_loss_mult, distortion_loss_mult=cfg.distortion_loss_mult,
            use_appearance_embedding=cfg.use_appearance_embedding, implementation=self.implementation,
            eval_num_rays_per_chunk=cfg.render_chunk,
            camera_optimizer=ns["CameraOptimizerConfig"](mode=cfg.camera_optimizer))
        box = ns["SceneBox"](aabb=torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]]) * cfg.scene_radius)
        with _no_lpips():
            self.model = model_config.setup(scene_box=box, num_train_data=self.num_train_data).to(self.device)
        self.model.train()
        groups = self.model.get_param_groups()
        sched = ns["ExponentialDecaySchedulerConfig"](lr_final=cfg.lr_final, max_steps=cfg.lr_decay_steps)
        self.optimizers = {g: torch.optim.Adam(groups[g], lr=cfg.lr, eps=cfg.adam_eps) for g in self.GROUPS}
        self.schedulers = {g: sched.setup().get_scheduler(optimizer=o, lr_init=cfg.lr)
                           for g, o in self.optimizers.items()}

    # ---- cameras and rays ---------------------------------------------------------------------------------
    def ns_cameras(self, cameras: list[Camera]):
        """Our OpenCV world→camera cameras as nerfstudio ``Cameras`` (OpenGL camera→world, normalized world)."""
        ns = self.ns
        c2w = np.stack([c.c2w @ OPENCV_TO_OPENGL for c in cameras])  # [N, 4, 4]
        c2w[:, :3, 3] = (c2w[:, :3, 3] - self.center) * self.scale
        K = np.stack([c.K for c in cameras])  # [N, 3, 3]

        def col(values) -> Tensor:
            return torch.tensor(np.asarray(values, dtype=np.float64), dtype=torch.float32).reshape(-1, 1)

        distortion = None
        if any(c.dist is not None and np.any(c.dist) for c in cameras):
            from nerfstudio.cameras.camera_utils import get_distortion_params

            rows = []
            for c in cameras:
                k1, k2, p1, p2, k3 = (list(c.dist) + [0.0] * 5)[:5] if c.dist is not None else [0.0] * 5
                rows.append(get_distortion_params(k1=k1, k2=k2, k3=k3, p1=p1, p2=p2))
            distortion = torch.stack(rows).float()  # [N, 6]
        return ns["Cameras"](
            camera_to_worlds=torch.tensor(c2w[:, :3, :4], dtype=torch.float32),
            fx=col(K[:, 0, 0]), fy=col(K[:, 1, 1]), cx=col(K[:, 0, 2]), cy=col(K[:, 1, 2]),
            width=torch.tensor([[c.width] for c in cameras]), height=torch.tensor([[c.height] for c in cameras]),
            distortion_params=distortion, camera_type=ns["CameraType"].PERSPECTIVE).to(self.device)

    def sample_rays(self, images: Tensor, weights: Tensor, masks: Tensor | None,
                    n: int) -> tuple[Tensor, Tensor, Tensor] | None:
        """n random rays: a view uniformly among those with unmasked pixels, then a pixel ∝ its mask (so a ray's
        expected loss equals the view's mask-weighted mean, as photometric_loss weighs 3DGS views)
        → (view index [n], pixel (y, x) [n, 2], per-ray weight [n]) or None when every pixel is masked."""
        B, _, H, W = images.shape
        flat = None if masks is None else masks.reshape(B, H * W).float().cpu().clamp_min(0)  # [B, H*W]
        valid = torch.ones(B) if flat is None else (flat.sum(dim=1) > 0).float()
        valid = valid * (weights.cpu() > 0).float()
        if valid.sum() == 0:
            return None
        views = torch.multinomial(valid, n, replacement=True, generator=self.generator)  # [n]
        pix = torch.empty(n, dtype=torch.long)
        for b in views.unique().tolist():
            sel = (views == b).nonzero().squeeze(1)
            if flat is None:
                pix[sel] = torch.randint(H * W, (len(sel),), generator=self.generator)
            else:
                pix[sel] = torch.multinomial(flat[b], len(sel), replacement=True, generator=self.generator)
        yx = torch.stack([pix // W, pix % W], dim=-1)  # [n, 2]
        return views, yx, weights.cpu()[views]

    # ---- Representation -----------------------------------------------------------------------------------
    @property
    def num_primitives(self) -> int:
        """Trainable parameters of the field and proposal networks (a NeRF has no primitives to count)."""
        return int(sum(p.numel() for g in self.GROUPS for p in self.model.get_param_groups()[g]))

    @property
    def step(self) -> int:
        return self._step

    def train_step(self, cameras: list[Camera], images: Tensor, weights: Tensor | None = None,
                   masks: Tensor | None = None) -> dict:
        W, H = common_size(cameras)
        B = len(cameras)
        if images.shape != (B, 3, H, W):
            raise ValueError(f"images {tuple(images.shape)}: expected {(B, 3, H, W)} for these cameras")
        if not images.is_floating_point():
            raise ValueError(f"images: expected float values in [0, 1], got dtype {images.dtype}")
        if masks is not None and masks.shape != (B, 1, H, W):
            raise ValueError(f"masks {tuple(masks.shape)}: expected {(B, 1, H, W)}")
        weights = torch.ones(B) if weights is None else torch.as_tensor(weights, dtype=torch.float32).reshape(-1)
        if weights.shape != (B,):
            raise ValueError(f"weights {tuple(weights.shape)}: expected ({B},)")
        step, model = self._step, self.model
        model.train()
        self._before_iteration(step)
        sampled = self.sample_rays(images, weights, masks, self.config.rays_per_batch)
        if sampled is None:  # nothing to learn from: count the step, as 3DGS does with a zero loss
            for g in self.GROUPS:
                self.schedulers[g].step()  # the lr schedule keeps pace with the step count
            self._after_iteration(step)
            return {"loss": 0.0, "rgb_loss": 0.0, "psnr": float("nan"), "num_rays": 0}
        views, yx, ray_w = sampled
        ray_bundle = self.ns_cameras(cameras).generate_rays(
            camera_indices=views.to(self.device)[:, None], coords=(yx.float() + 0.5).to(self.device))  # [n]
        idx = views.to(images.device), yx[:, 0].to(images.device), yx[:, 1].to(images.device)
        gt = images.detach()[idx[0], :, idx[1], idx[2]].to(self.device, torch.float32)  # [n, 3], gathered in place
        outputs = model(ray_bundle)
        pred, gt = model.renderer_rgb.blend_background_for_loss_computation(
            pred_image=outputs["rgb"], pred_accumulation=outputs["accumulation"], gt_image=gt)
        ray_w = ray_w.to(self.device)
        rgb_loss = (ray_w * ((pred - gt) ** 2).mean(dim=-1)).mean()  # nerfstudio's MSE, weighted per ray
        interlevel = self.ns["interlevel_loss"](outputs["weights_list"], outputs["ray_samples_list"])
        distortion = self.ns["distortion_loss"](outputs["weights_list"], outputs["ray_samples_list"])
        loss = rgb_loss + model.config.interlevel_loss_mult * interlevel \
            + model.config.distortion_loss_mult * distortion
        loss.backward()
        for g in self.GROUPS:
            self.optimizers[g].step()
            self.optimizers[g].zero_grad(set_to_none=True)
            self.schedulers[g].step()
        self._after_iteration(step)
        loss_value = loss.item()
        if not math.isfinite(loss_value):  # a NaN pixel or a divergent step: every parameter is poisoned
            raise ValueError(f"step {step}: non-finite loss on views {[c.name for c in cameras]} (NaN or inf in "
                             "their images or cameras); the model took the step: resume from the last checkpoint")
        mse = ((outputs["rgb"].detach().clamp(0, 1) - gt) ** 2).mean()
        return {"loss": loss_value, "rgb_loss": rgb_loss.item(), "interlevel": interlevel.item(),
                "distortion": distortion.item(), "psnr": float(-10 * torch.log10(mse + 1e-10)),
                "num_rays": int(len(views))}

    def _before_iteration(self, step: int) -> None:
        """nerfstudio's BEFORE_TRAIN_ITERATION callback: anneal the proposal weights (mip-NeRF 360 Eq. 18)."""
        if self.model.config.use_proposal_weight_anneal:
            n = self.model.config.proposal_weights_anneal_max_num_iters
            x = float(np.clip(step / max(1, n), 0.0, 1.0))
            b = self.model.config.proposal_weights_anneal_slope
            self.model.proposal_sampler.set_anneal(b * x / ((b - 1) * x + 1))
            self.model.step = step

    def _after_iteration(self, step: int) -> None:
        """nerfstudio's AFTER_TRAIN_ITERATION callback (the proposal sampler's update schedule), then count."""
        self.model.proposal_sampler.step_cb(step)
        self._step += 1

    @torch.no_grad()
    def render(self, cameras: list[Camera]) -> RenderOutput:
        """Full images in ray chunks of ``render_chunk``; proposal-sampler bookkeeping is left as it was, so
        rendering between steps does not change training."""
        W, H = common_size(cameras)
        sampler = self.model.proposal_sampler
        saved = (sampler._steps_since_update, sampler._step)
        ns_cams = self.ns_cameras(cameras)
        self.model.eval()
        rgbs, alphas, depths = [], [], []
        try:
            for i in range(len(cameras)):
                bundle = ns_cams.generate_rays(camera_indices=i)  # [H, W]
                out = self.model.get_outputs_for_camera_ray_bundle(bundle)
                rgbs.append(out["rgb"].clamp(0, 1).permute(2, 0, 1))  # [3, H, W]
                alphas.append(out["accumulation"].permute(2, 0, 1))  # [1, H, W]
                # ray distance in normalized units → camera z in world units
                z = out["expected_depth"] / bundle.metadata["directions_norm"] / self.scale  # [H, W, 1]
                depths.append(z.permute(2, 0, 1))
        finally:
            sampler._steps_since_update, sampler._step = saved
            self.model.train()
        return RenderOutput(rgb=torch.stack(rgbs), alpha=torch.stack(alphas), depth=torch.stack(depths))

    def state_dict(self) -> dict:
        """A snapshot (tensors copied: torch's optimizer state_dict hands out its live moment tensors)."""
        sampler = self.model.proposal_sampler
        return copy.deepcopy({
            "format": EXPORT_FORMAT,
            "config": asdict(self.config),
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizers": {g: o.state_dict() for g, o in self.optimizers.items()},
            "schedulers": {g: s.state_dict() for g, s in self.schedulers.items()},
            "proposal_sampler": {"step": sampler._step, "steps_since_update": sampler._steps_since_update,
                                 "anneal": sampler._anneal},
            "generator": self.generator.get_state(),
            "step": self._step,
            "center": self.center.tolist(),
            "scale": self.scale,
            "num_train_data": self.num_train_data,
            "implementation": self.implementation,  # tcnn's fused weights load only where tinycudann runs
        })

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict` of a model built with the same config (optimizers included)."""
        if state.get("format") != EXPORT_FORMAT:
            raise ValueError(f"not a NerfactoScene state (format {state.get('format')!r})")
        saved = _saved_implementation(state)
        if saved != self.implementation:
            _refuse_implementation(saved, self.implementation, self.device)
        self.center = np.asarray(state["center"], dtype=np.float64)
        self.scale = float(state["scale"])
        self.model.load_state_dict(state["model"])
        if "optimizers" in state:
            for g in self.GROUPS:
                self.optimizers[g].load_state_dict(state["optimizers"][g])
                self.schedulers[g].load_state_dict(state["schedulers"][g])
        ps = state.get("proposal_sampler", {})
        sampler = self.model.proposal_sampler
        sampler._step = int(ps.get("step", 0))
        sampler._steps_since_update = int(ps.get("steps_since_update", 0))
        sampler._anneal = float(ps.get("anneal", 1.0))
        if "generator" in state:
            self.generator.set_state(state["generator"])
        self._step = int(state["step"])

    @classmethod
    def from_state_dict(cls, state: dict, device=None) -> "NerfactoScene":
        """The model a :meth:`state_dict` or :meth:`export` describes, in the implementation it was trained with."""
        saved = _saved_implementation(state)
        here = _resolve_implementation("auto", default_device(device))
        if saved == "tcnn" and here != "tcnn":
            _refuse_implementation(saved, here, default_device(device))
        config = NerfConfig.from_dict({**state["config"], "implementation": saved})
        model = cls(config, np.asarray(state["center"]), float(state["scale"]),
                    num_train_data=int(state.get("num_train_data", 1)), device=device)
        model.load_state_dict(state)
        return model

    def export(self, uri: str) -> None:
        """A torch file (``torch.save``) with the weights, config and normalization; optimizers are left out.
        Load it with :meth:`load`."""
        state = {k: v for k, v in self.state_dict().items() if k not in ("optimizers", "schedulers", "generator")}
        storage.write_torch(uri, state)

    @classmethod
    def load(cls, uri: str, device=None) -> "NerfactoScene":
        """Read an :meth:`export` (or a state_dict saved with torch.save) back."""
        try:
            state = torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=False)
            if not isinstance(state, dict) or state.get("format") != EXPORT_FORMAT:
                raise ValueError(f"not a {EXPORT_FORMAT} file")
            return cls.from_state_dict(state, device=device)
        except ImportError:
            raise
        except Exception as e:
            raise CheckpointError(uri, f"cannot load a NerfactoScene from it: {e}") from e

