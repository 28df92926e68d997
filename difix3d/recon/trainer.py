"""The per-scene optimization loop: sample training views, step the representation, evaluate held-out splits,
checkpoint and resume through difix3d.storage.

The loop samples from a plain list of :class:`TrainingView` so the progressive Difix3D loop can add pseudo views
(with weights and masks) to the same pool, between calls or from ``step_callback`` while training runs; a
``sample_fn`` replaces the default uniform sampling policy.
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from tqdm.auto import tqdm

from difix3d import storage
from difix3d.device import global_rng_state, set_global_rng_state
from difix3d.errors import CheckpointError
from difix3d.imageio import to_tensor
from difix3d.recon.background_writes import snapshot
from difix3d.recon.base import Representation
from difix3d.scene.camera import Camera

log = logging.getLogger(__name__)


@dataclass
class TrainingView:
    camera: Camera
    image: Tensor  # [3, H, W] float in [0, 1]
    weight: float = 1.0  # loss weight (pseudo views get less than real ones)
    mask: Tensor | None = None  # [1, H, W] in [0, 1]; 0 = pixel ignored by the loss
    is_pseudo: bool = False


SampleFn = Callable[[list[TrainingView], int, int, torch.Generator], list[int]]


@dataclass
class TrainerConfig:
    iterations: int = 30_000  # train until the representation has taken this many steps (3DGS paper: 30k)
    batch_size: int = 1  # views per step (3DGS paper: 1)
    eval_every: int = 0  # evaluate held-out splits every N steps (0: only at the end)
    eval_splits: tuple[str, ...] = ("test",)  # scene splits evaluated; missing ones are skipped
    checkpoint_every: int = 0  # save a resumable checkpoint every N steps (0: only at the end)
    seed: int = 0

    def __post_init__(self) -> None:
        # iterations 0: no training, e.g. a pretrained 3DGS (init_ply) rendered and fixed as it is
        for name, low in (("iterations", 0), ("batch_size", 1), ("eval_every", 0), ("checkpoint_every", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"trainer.{name}: expected a whole number >= {low}, got {value!r}")

    @classmethod
    def tiny(cls, iterations: int = 300, **kw) -> "TrainerConfig":
        return cls(iterations=iterations, **kw)


@dataclass
class TrainResult:
    step: int  # representation steps after training
    metrics: dict[str, dict[str, float]]  # final {split: {"psnr", "ssim"}}
    history: list[dict] = field(default_factory=list)  # every evaluation: {"step", "split", "psnr", "ssim"}
    last_stats: dict = field(default_factory=dict)  # the last train_step's scalars
    seconds: float = 0.0
    iters_per_s: float = 0.0
    num_primitives: int = 0
    resumed_from: int | None = None  # step restored from the checkpoint, if any


def train(
    representation: Representation,
    scene=None,
    config: TrainerConfig | None = None,
    views: list[TrainingView] | None = None,
    checkpoint_uri: str | None = None,
    progress: bool = True,
    eval_views: dict[str, list[TrainingView]] | None = None,
    sample_fn: SampleFn | None = None,
    step_callback: Callable[[int, dict, list[TrainingView]], None] | None = None,
) -> TrainResult:
    """Train ``representation`` until it has taken ``config.iterations`` steps.

    views: the training pool (default: the scene's "train" split); it may grow while training runs.
    eval_views: held-out views per split (default: the scene's ``config.eval_splits``).
    checkpoint_uri: a file URI; if it exists, training resumes from it, and it is rewritten on schedule.
    step_callback(step, stats, views): called after every step (e.g. to add finished pseudo views).
    """
    config = config or TrainerConfig()
    if views is None:
        if scene is None:
            raise ValueError("train: give a scene or training views")
        views = load_views(scene, "train")
    if eval_views is None:
        eval_views = {} if scene is None else {
            s: load_views(scene, s) for s in config.eval_splits if scene.splits.get(s)}
    if not views:
        raise ValueError("train: no training views")
    scaled_for = getattr(getattr(representation, "config", None), "batch_size", config.batch_size)
    if scaled_for != config.batch_size:  # its learning rates and betas are scaled for its own batch size
        raise ValueError(f"train: {config.batch_size} views a step, but the representation's learning rates are "
                         f"scaled for batch_size {scaled_for}: set both to the same")
    sample_fn = sample_fn or uniform_sample
    generator = torch.Generator().manual_seed(config.seed)
    history: list[dict] = []
    resumed_from = None
    if checkpoint_uri and storage.exists(checkpoint_uri):
        history = load_checkpoint(checkpoint_uri, representation, generator)
        resumed_from = representation.step
        log.info("resumed %s at step %d", checkpoint_uri, resumed_from)

    start_step, t0 = representation.step, time.perf_counter()
    stats: dict = {}
    bar = tqdm(total=config.iterations, initial=start_step, disable=not progress, desc="3dgs", dynamic_ncols=True)
    while representation.step < config.iterations:
        batch = [views[i] for i in sample_fn(views, representation.step, config.batch_size, generator)]
        stats = representation.train_step(*_stack(batch))
        step = representation.step
        bar.update(1)
        bar.set_postfix(loss=f"{stats['loss']:.4f}", psnr=f"{stats.get('psnr', float('nan')):.2f}",
                        n=representation.num_primitives, refresh=False)
        if step_callback is not None:
            step_callback(step, stats, views)
        if config.eval_every and step % config.eval_every == 0 and step < config.iterations:
            history += _evaluate_splits(representation, eval_views, step)
        if checkpoint_uri and config.checkpoint_every and step % config.checkpoint_every == 0:
            save_checkpoint(checkpoint_uri, representation, generator, history)
    bar.close()
    seconds = time.perf_counter() - t0
    final = _evaluate_splits(representation, eval_views, representation.step)
    history += final
    if checkpoint_uri and representation.step > start_step:
        save_checkpoint(checkpoint_uri, representation, generator, history)
    n = representation.step - start_step
    return TrainResult(step=representation.step, metrics={r["split"]: {"psnr": r["psnr"], "ssim": r["ssim"]}
                                                             for r in final},
                       history=history, last_stats=stats, seconds=seconds,
                       iters_per_s=n / seconds if n and seconds > 0 else 0.0,
                       num_primitives=representation.num_primitives, resumed_from=resumed_from)


def uniform_sample(views: list[TrainingView], step: int, batch_size: int, generator: torch.Generator) -> list[int]:
    """Default policy: one view uniformly at random, then batch-mates of the same image size."""
    first = int(torch.randint(len(views), (1,), generator=generator))
    if batch_size == 1:
        return [first]
    size = views[first].image.shape
    same = [i for i, v in enumerate(views) if v.image.shape == size and i != first]
    order = torch.randperm(len(same), generator=generator)[: batch_size - 1].tolist()
    return [first] + [same[i] for i in order]


def load_views(scene, split: str, weight: float = 1.0) -> list[TrainingView]:
    """Decode a split's images once into [3, H, W] float tensors (checked against their cameras)."""
    cameras, uris = scene.subset(split)
    index = {u: i for i, u in enumerate(scene.image_uris)}
    views = []
    for cam, uri in zip(cameras, uris):
        image = to_tensor(scene.load_image(index[uri]))[0]  # [3, H, W]
        if image.shape[-2:] != (cam.height, cam.width):
            from difix3d.errors import InputError

            raise InputError(uri, f"image is {image.shape[-1]}x{image.shape[-2]}, camera {cam.name!r} expects "
                                  f"{cam.width}x{cam.height}")
        views.append(TrainingView(cam, image, weight=weight))
    return views


@torch.no_grad()
def evaluate(representation: Representation, views: list[TrainingView], batch: int = 8) -> dict[str, float]:
    """Mean PSNR / SSIM (torchmetrics, data range 1) of renders against the views' images."""
    psnrs, ssims = [], []
    for i in range(0, len(views), batch):
        chunk = views[i:i + batch]
        by_size: dict[tuple, list[TrainingView]] = {}
        for v in chunk:
            by_size.setdefault(tuple(v.image.shape), []).append(v)
        for group in by_size.values():
            pred = representation.render([v.camera for v in group]).rgb.float().cpu()  # [B, 3, H, W]
            gt = torch.stack([v.image for v in group]).float().cpu()
            psnrs.append(peak_signal_noise_ratio(pred, gt, data_range=1.0, reduction="none", dim=(1, 2, 3)))
            ssims.append(structural_similarity_index_measure(pred, gt, data_range=1.0, reduction="none"))
    return {"psnr": float(torch.cat(psnrs).mean()), "ssim": float(torch.cat(ssims).mean())}


def save_checkpoint(uri: str, representation: Representation, generator: torch.Generator,
                    history: list[dict] | None = None) -> None:
    """Representation state + sampling/global RNG states, written atomically: a resumed run repeats exactly. Tensors
    are written from host copies, so the file loads on machines without the training device."""
    storage.write_torch(uri, {
        "format": "difix3d.recon.trainer/1", "representation": snapshot(representation.state_dict()),
        "generator": generator.get_state(), **global_rng_state(), "history": history or []})


def load_checkpoint(uri: str, representation: Representation, generator: torch.Generator | None = None) -> list[dict]:
    """Restore a :func:`save_checkpoint` file into ``representation`` (and ``generator``) → evaluation history."""
    try:
        state = torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=False)
        if not isinstance(state, dict) or state.get("format") != "difix3d.recon.trainer/1":
            raise ValueError("not a difix3d trainer checkpoint")
        representation.load_state_dict(state["representation"])
    except CheckpointError:
        raise
    except Exception as e:  # corrupt bytes, wrong format, missing keys
        raise CheckpointError(uri, f"cannot resume from it: {e}") from e
    if generator is not None:
        generator.set_state(state["generator"])
    set_global_rng_state(state)
    return list(state.get("history", []))


def _evaluate_splits(representation: Representation, eval_views: dict[str, list[TrainingView]],
                     step: int) -> list[dict]:
    return [{"step": step, "split": s, **evaluate(representation, v)} for s, v in eval_views.items() if v]


def _stack(batch: list[TrainingView]) -> tuple[list[Camera], Tensor, Tensor, Tensor | None]:
    """→ (cameras, images [B, 3, H, W], weights [B], masks [B, 1, H, W] or None)."""
    images = torch.stack([v.image for v in batch])
    weights = torch.tensor([float(v.weight) for v in batch])
    if all(v.mask is None for v in batch):
        return [v.camera for v in batch], images, weights, None
    masks = torch.stack([v.mask if v.mask is not None else torch.ones_like(v.image[:1]) for v in batch])
    return [v.camera for v in batch], images, weights, masks
