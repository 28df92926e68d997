"""Progressive Difix3D reconstruction and Difix3D+ post-rendering of one scene (Wu et al., CVPR 2025, Sec. 4).

While the representation trains, every round moves one pseudo camera per target (novel view) a step closer to it,
renders there, sends the renders to the fixer *asynchronously* (references: the nearest training image) and keeps
training; fixed views join the training set when their future resolves (polled every iteration). At the end the
renders at the targets are fixed once more (Difix3D+). A plain run of the same length without pseudo views is the
baseline. Everything lands under one output URI (layout: :mod:`difix3d.recon.outputs`), and an interrupted run
resumes from the last saved state: the baseline's (every ``baseline_save_every`` iterations) or the last round's.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from difix3d import imageio, storage
from difix3d.device import default_device, global_rng_state, set_global_rng_state
from difix3d.errors import InputError
from difix3d.recon.background_writes import BackgroundWriter, StateFile
from difix3d.recon.outputs import METHODS, SceneOutputs
from difix3d.recon.schedule import ProgressiveSchedule, PseudoViewSampling, nearest_index
from difix3d.recon.view_fixers import ViewFixer, as_view_fixer
from difix3d.scene.camera import Camera
from difix3d.settings import nested_changes


log = logging.getLogger(__name__)


def _gaussian_config():
    from difix3d.recon.gaussians import GaussianConfig

    return GaussianConfig(iterations=None)  # the loop's budget (ProgressiveConfig.budgeted)


def _trainer_config():
    from difix3d.recon.trainer import TrainerConfig

    return TrainerConfig()


@dataclass
class ProgressiveConfig:
    """Everything one scene's progressive Difix3D+ run depends on; written to ``config.json``."""

    representation: str = "3dgs"
    """The backend: "3dgs" (GaussianSplat) or "nerfacto" (NerfactoScene; needs the extra difix3d[nerf])."""
    gaussian: Any = field(default_factory=_gaussian_config)
    """``GaussianConfig`` of the representation (3DGS paper / gsplat defaults). Its ``iterations``, to which its
    schedules (LR decay, densification) are scaled, is None here: the loop's budget, ``trainer.iterations``."""
    nerf: Any = None
    """``NerfConfig`` when representation is "nerfacto" (None: nerfstudio's Nerfacto defaults at the loop's budget;
    ``iterations`` None: the loop's budget too)."""
    trainer: Any = field(default_factory=_trainer_config)
    """``TrainerConfig``: ``iterations`` is the budget of the baseline and of the progressive run; ``seed``.
    ``batch_size`` must be 1: the loop trains on one view a step."""
    schedule: ProgressiveSchedule = field(default_factory=ProgressiveSchedule)
    sampling: PseudoViewSampling = field(default_factory=PseudoViewSampling)
    init_ply: str | None = None
    """A pretrained 3DGS (gsplat / 3DGS-format PLY URI) to start from instead of the scene's points; the baseline
    starts from it too, so both get the same budget on top of it. 3dgs only."""
    target_splits: tuple[str, ...] = ("test", "shift_1m", "shift_2m", "shift_3m")
    """Splits whose cameras are the targets of the pseudo views (the novel views to improve); a trajectory passed
    to :func:`reconstruct_scene` as ``targets`` replaces them."""
    eval_splits: tuple[str, ...] = ("test", "shift_1m", "shift_2m", "shift_3m")
    """Splits rendered and scored (those the scene lacks are skipped)."""
    baseline: bool = True
    """Also train the plain representation with the same budget (the ``baseline`` rows)."""
    post_render: bool = True
    """Difix3D+: fix the final renders at the eval cameras once more (the ``difix3d_plus`` rows)."""
    fix_batch_size: int = 8
    """Renders per fixer request."""
    lpips: bool = True
    """Report LPIPS when its pretrained weights are on this machine (never downloads)."""
    background_writes: bool = True
    """Write the baseline's and each round's state, and the pseudo views, on a writer thread while training goes on
    (False: inline)."""
    save_every_round: bool = False
    """False: a round (or baseline save) whose previous state write is still running skips its own (training never
    waits for storage; a resume redoes the rounds since the last written state). True: every round waits for and
    writes its state. The final state is always written."""
    baseline_save_every: int = 2_000
    """Iterations between saved states of the baseline (0: none), from which an interrupted baseline resumes instead
    of starting over: a snapshot on the training thread, written on the writer's, as the rounds' states (whose
    cadence, ``schedule.round_every``, is 2 000 too)."""
    images_on_device: bool = True
    """Keep the training and pseudo views on the CUDA device as uint8 (1.8 MB a 576x1024 view), converted to float
    at each step, instead of copying a float32 image from pageable host memory every step. False for scenes with
    more views than the device can spare memory for. Ignored off CUDA."""
    snapshot_on_device: bool | None = None
    """Snapshot the round state on the CUDA device and let the writer thread copy it to the host (training waits
    milliseconds instead of ~1 s per GB). None: on CUDA when the state takes at most half the free device memory.
    Ignored off CUDA."""

    @classmethod
    def tiny(cls) -> "ProgressiveConfig":
        """CPU tests and demos: tiny images, a few hundred iterations, rounds every 40 iterations, 1 m steps."""
        from difix3d.recon.gaussians import GaussianConfig
        from difix3d.recon.trainer import TrainerConfig

        gaussian = GaussianConfig.tiny(iterations=None)  # the loop's budget: trainer.iterations
        trainer = TrainerConfig.tiny(iterations=300)
        return cls(gaussian=gaussian, trainer=trainer,
                   schedule=ProgressiveSchedule(pretrain_iters=100, round_every=40, step_size=1.0),
                   sampling=PseudoViewSampling(probability=0.5), lpips=False)

    def budgeted(self) -> "ProgressiveConfig":
        """This config with the representation's ``iterations`` set to the loop's budget, ``trainer.iterations``.
        3DGS scales its schedules to its own ``iterations``, so with another number LR decay and densification would
        end before the run does, or never (Nerfacto keeps nerfstudio's step counts, which ``iterations`` does not
        scale; it is checked all the same): None there is filled in (and logged), a different
        number is a ValueError naming both fields, and so is a batch size other than 1 (the loop steps on one view)
        or a schedule or sampling setting out of range.
        """
        self.schedule.check()
        self.sampling.check()
        budget = int(self.trainer.iterations)
        if budget > 0 and self.schedule.max_rounds != 0 and not self.schedule.round_starts(budget):
            raise ValueError(f"schedule.pretrain_iters {self.schedule.pretrain_iters} is not below trainer.iterations "
                             f"{budget}: no Difix3D round would run, and the 'difix3d' results would be plain "
                             "training; lower schedule.pretrain_iters or raise trainer.iterations (or set "
                             "schedule.max_rounds to 0 to train without rounds on purpose)")
        name = "nerf" if self.representation == "nerfacto" else "gaussian"
        backend = getattr(self, name)
        for field_name, value in (("trainer", self.trainer), (name, backend)):  # gaussian's scales its learning rates
            if getattr(value, "batch_size", 1) != 1:
                raise ValueError(f"{field_name}.batch_size is {value.batch_size}: the progressive loop trains on one "
                                 "view a step (the 3DGS paper's batch), so set it to 1")
        if backend is None or backend.iterations == budget:  # None: the backend's defaults at the budget
            return self
        if backend.iterations is not None:
            raise ValueError(f"{name}.iterations {backend.iterations} and trainer.iterations {budget} differ: "
                             f"trainer.iterations is the run's budget and the representation's schedules are scaled "
                             f"to {name}.iterations; set them equal, or {name}.iterations to None to follow it")
        log.info("%s.iterations follows trainer.iterations: %d", name, budget)
        return dataclasses.replace(self, **{name: dataclasses.replace(backend, iterations=budget)})

    def to_dict(self) -> dict:
        return _asdict(self)


@dataclass
class SceneResult:
    """What one scene's run reports (the fleet job records it in its manifest and summary)."""

    scene: str
    output_uri: str
    metrics: dict  # {split: {method: {"psnr", "ssim", "lpips"?}}}
    timings: dict  # seconds, and wall_ratio_vs_plain
    frames_fixed: int
    num_rounds: int
    notes: dict = field(default_factory=dict)  # e.g. {"lpips": "<why it is missing>"}
    fixer: dict = field(default_factory=dict)  # ViewFixer.describe(): kind, checkpoint

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def reconstruct_scene(scene: Any, output_uri: str, config: ProgressiveConfig | None = None,
                      fixer: Any = None, progress: bool = True, device: Any = None,
                      targets: list[Camera] | None = None) -> SceneResult:
    """Baseline, progressive Difix3D and Difix3D+ for one scene; outputs under ``output_uri``.

    ``scene``: a ``Scene`` or its URI. ``fixer``: a :class:`ViewFixer`, a ``FixerClient`` (in-process or the Ray
    pool), or None: the running default pool if there is one, else the small fixer bundled with difix3d.
    ``targets``: cameras of a trajectory to move the pseudo views toward (default: the ``target_splits`` cameras).
    Re-running with the same ``output_uri`` resumes; with a config that changes training, it is an error.
    """
    config = (config or ProgressiveConfig()).budgeted()
    shared = _shared_names(targets or [])
    if shared:  # pseudo views are saved, and resumed, by name: one target's image would overwrite another's
        raise ValueError(f"targets share the names {shared}: pseudo views are saved as pseudo/round_<k>/<name>.png; "
                         "give each target camera its own name")
    if isinstance(scene, (str, bytes)) or hasattr(scene, "__fspath__"):
        from difix3d.scene import load_scene

        scene = load_scene(str(scene))
    if config.representation == "3dgs":  # gsplat renders pinhole cameras; Nerfacto models distortion itself
        from difix3d.scene.undistort import undistorted

        scene = undistorted(scene)
    out = SceneOutputs(str(output_uri))
    device = default_device(device)
    view_fixer = as_view_fixer(fixer)
    config = _keep_started_budget(out, config)
    record = _config_record(config, targets, view_fixer)
    _check_resumable(out, record)
    storage.write_json(out.config, record)
    data = _SceneData.load(scene, config, device, targets)
    for split, (cams, gts) in data.evals.items():
        out.write_renders("gt", split, [c.name for c in cams], gts)

    timings: dict[str, float] = {}
    renders: dict[str, dict[str, list[np.ndarray]]] = {}  # method -> split -> uint8 [H, W, 3] per camera
    if config.baseline:
        renders["baseline"], baseline_timings = _baseline(scene, data, config, out, device, progress)
        timings.update(baseline_timings)

    loop = ProgressiveLoop(scene, data, config, out, view_fixer, device, progress)
    rep = loop.run()
    timings.update(loop.timings)
    rep.export(out.representation(config.representation))
    renders["difix3d"] = _render_splits(rep, data.evals)
    for split, imgs in renders["difix3d"].items():
        out.write_renders("difix3d", split, [c.name for c in data.evals[split][0]], imgs)

    frames_fixed = loop.frames_fixed
    if config.post_render:
        t0 = time.perf_counter()
        renders["difix3d_plus"] = {}
        for split, (cams, _) in data.evals.items():
            refs = data.references(cams)
            fixed = _fix_all(view_fixer, renders["difix3d"][split], refs, cams, config.fix_batch_size,
                             f"the Difix3D+ renders of split {split!r}")
            renders["difix3d_plus"][split] = fixed
            out.write_renders("difix3d_plus", split, [c.name for c in cams], fixed)
            frames_fixed += len(cams)
        timings["post_render_s"] = time.perf_counter() - t0
        n = sum(len(c) for c, _ in data.evals.values())
        timings["post_render_ms_per_frame"] = 1000.0 * timings["post_render_s"] / max(1, n)
    if "baseline_train_s" in timings and timings.get("progressive_train_s"):
        timings["wall_ratio_vs_plain"] = timings["progressive_train_s"] / max(1e-9, timings["baseline_train_s"])

    metrics, notes = _score(renders, data.evals, config.lpips, device)
    result = SceneResult(scene=scene.name, output_uri=str(output_uri), metrics=metrics, timings=timings,
                         frames_fixed=frames_fixed, num_rounds=loop.num_rounds, notes=notes,
                         fixer=record["fixer"])
    storage.write_json(out.metrics, result.to_dict())
    return result


class ProgressiveLoop:
    """The progressive Difix3D training loop of one scene (state in :meth:`state_dict`, saved each round)."""

    STATE_FILE = "progressive.pt"

    def __init__(self, scene: Any, data: "_SceneData", config: ProgressiveConfig, out: SceneOutputs,
                 fixer: ViewFixer, device: torch.device, progress: bool = True):
        self.scene, self.data, self.config, self.out, self.fixer = scene, data, config, out, fixer
        self.device, self.progress = device, progress
        self.iterations = int(config.trainer.iterations)
        self.round_starts = config.schedule.round_starts(self.iterations)
        self.rng = random.Random(_seed(config))
        self.known: list[Camera] = [v.camera for v in data.train]  # cameras pseudo cameras start from
        self.pseudo: list[list[Any]] = []  # round -> TrainingViews that joined
        self.pseudo_records: list[list[dict]] = []  # round -> their saved form (camera dict, bool mask), built once
        self.pending: list[_Pending] = []
        self.iteration = 0
        self.num_rounds = 0
        self.frames_fixed = 0
        self.timings = {"progressive_train_s": 0.0, "fix_wait_s": 0.0, "round_render_s": 0.0, "round_save_s": 0.0,
                        "state_saves_skipped": 0, "train_steps_s": 0.0, "fix_submit_s": 0.0}
        self.writer = BackgroundWriter(enabled=config.background_writes)
        self.state_file = StateFile(out.state(self.STATE_FILE), self.writer, device, config.save_every_round,
                                    config.snapshot_on_device)
        self.batches = _StepBatches(device, config.images_on_device)

    def run(self):
        """Train to the budget (resuming if a saved state exists); returns the representation."""
        with self.writer:  # closed, so written, by the time run() returns or raises
            return self._run()

    def _run(self):
        rep = _new_representation(self.scene, self.config, self.device)
        self.state_file.load(lambda state: self._restore(rep, state))
        if self.iteration >= self.iterations:
            return rep
        t_start, elapsed0 = time.perf_counter(), self.timings["progressive_train_s"]
        bar = _progress_bar(self.progress, self.iteration, self.iterations, f"difix3d {self.scene.name}")
        for it in range(self.iteration, self.iterations):
            self.iteration = it
            if it in self.round_starts and self.round_starts.index(it) == self.num_rounds:
                self._drain()  # the previous round's views join before the checkpoint: a round is atomic
                self.timings["progressive_train_s"] = elapsed0 + time.perf_counter() - t_start
                self._save(rep)
                self._start_round(rep)
            self._poll()
            view, is_pseudo = self.config.sampling.pick(self.rng, self.data.train, self.pseudo,
                                                        {p.round_index for p in self.pending})
            t_step = time.perf_counter()
            stats = rep.train_step([view.camera], *self.batches.get(view))
            self.timings["train_steps_s"] += time.perf_counter() - t_step
            if bar is not None:
                bar.update(1)
                if it % 25 == 0:
                    bar.set_postfix(loss=f"{float(stats.get('loss', 0.0)):.4f}", rounds=self.num_rounds,
                                    pseudo=sum(map(len, self.pseudo)), n=rep.num_primitives)
        self._drain()
        self.iteration = self.iterations
        self.timings["progressive_train_s"] = elapsed0 + time.perf_counter() - t_start
        self._save(rep, final=True)  # written by the time run() returns: run() closes the writer
        if bar is not None:
            bar.close()
        return rep

    # ---------------------------------------------------------------- rounds

    def _start_round(self, rep) -> None:
        """Pseudo cameras one step closer to the targets; render, then send to the fixer without waiting."""
        k = self.num_rounds
        t0 = time.perf_counter()
        cams = self.config.schedule.next_cameras(self.known, self.data.targets)
        self.known += cams
        rgb, alpha = _render(rep, cams)  # per camera: uint8 [H, W, 3], float [1, H, W]
        refs = self.data.references(cams)
        self.timings["round_render_s"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        for idx in _size_batches([(c.height, c.width) for c in cams], self.config.fix_batch_size):
            batch = [cams[i] for i in idx]
            masks = self.config.sampling.mask(torch.stack([alpha[i] for i in idx]))  # [B, 1, H, W]
            future = self.fixer.submit(np.stack([rgb[i] for i in idx]), np.stack([refs[i] for i in idx]), batch)
            self.pending.append(_Pending(k, batch, masks, future))
        # time the training thread spends handing renders over (a fixer that answers synchronously shows up here)
        self.timings["fix_submit_s"] += time.perf_counter() - t0
        self.pseudo.append([])
        self.pseudo_records.append([])
        self.num_rounds += 1

    def _poll(self) -> None:
        """Fixed views whose futures resolved join training now; the rest keep going."""
        still = []
        for p in self.pending:
            if p.future.done():
                self._join(p, p.future.result())
            else:
                still.append(p)
        self.pending = still

    def _drain(self) -> None:
        t0 = time.perf_counter()
        for p in self.pending:
            self._join(p, p.future.result())
        self.pending = []
        self.timings["fix_wait_s"] += time.perf_counter() - t0

    def _join(self, p: "_Pending", fixed: np.ndarray) -> None:
        fixed = _checked_answer(self.fixer, fixed, p.cameras, f"round {p.round_index}")
        TrainingView = _training_view_class()
        weight = self.config.sampling.loss_weight(True)
        for cam, image, mask in zip(p.cameras, fixed, p.masks):
            self.writer.submit(imageio.write_image, self.out.pseudo(p.round_index, cam.name), image.copy())
            self.pseudo[p.round_index].append(
                TrainingView(camera=cam, image=imageio.to_tensor(image)[0], weight=weight, mask=mask,
                             is_pseudo=True))
            self.pseudo_records[p.round_index].append(_pseudo_record(cam, mask))
        self.frames_fixed += len(p.cameras)

    # ---------------------------------------------------------------- resume

    def _save(self, rep, final: bool = False) -> None:
        """Snapshot the state on this thread (consistent: training waits for the copy), write it on the writer's.
        A round skips its write while the last one is still being written, unless ``save_every_round``."""
        t0 = time.perf_counter()
        if not self.state_file.save(lambda: self._state(rep), final):
            self.timings["state_saves_skipped"] += 1
            return
        self.timings["round_save_s"] += time.perf_counter() - t0

    def _state(self, rep) -> dict:
        return {"iteration": self.iteration, "num_rounds": self.num_rounds, "frames_fixed": self.frames_fixed,
                "rng": self.rng.getstate(), "torch_rng": global_rng_state(),
                "timings": dict(self.timings), "representation": rep.state_dict(),
                "known": [c.to_dict() for c in self.known], "pseudo": self.pseudo_records}

    def _restore(self, rep, state: dict) -> None:
        rep.load_state_dict(state["representation"])
        self.iteration, self.num_rounds = state["iteration"], state["num_rounds"]
        self.frames_fixed = state["frames_fixed"]
        self.rng.setstate(state["rng"])
        if "torch_rng" in state:  # densification draws from torch's generators: resume them where they were
            set_global_rng_state(state["torch_rng"])
        self.timings.update(state["timings"])
        self.known = [Camera.from_dict(d) for d in state["known"]]
        TrainingView = _training_view_class()
        weight = self.config.sampling.loss_weight(True)
        self.pseudo, self.pseudo_records = [], []
        for k, views in enumerate(state["pseudo"]):
            self.pseudo.append([])
            self.pseudo_records.append(list(views))
            for v in views:
                cam = Camera.from_dict(v["camera"])
                image = imageio.to_tensor(imageio.read_image(self.out.pseudo(k, cam.name)))[0]
                mask = None if v["mask"] is None else v["mask"].float()
                self.pseudo[k].append(TrainingView(camera=cam, image=image, weight=weight, mask=mask,
                                                   is_pseudo=True))


def _pseudo_record(camera: Camera, mask: torch.Tensor | None) -> dict:
    """A pseudo view as the round state saves it (its image is the PNG under pseudo/)."""
    return {"camera": camera.to_dict(), "mask": None if mask is None else mask.bool()}


@dataclass
class _Pending:
    round_index: int
    cameras: list[Camera]
    masks: torch.Tensor  # [B, 1, H, W] float
    future: Any


@dataclass
class _SceneData:
    """The scene's images loaded once: real training views, targets, eval cameras with ground truth."""

    train: list[Any]  # TrainingView, image [3, H, W] float on CPU, weight = real_weight
    train_uint8: list[np.ndarray]  # [H, W, 3]
    targets: list[Camera]
    evals: dict[str, tuple[list[Camera], list[np.ndarray]]]  # split -> (cameras, uint8 [H, W, 3] per camera)

    rotation_weight: float = 1.0  # of the distance that picks a camera's nearest training view

    @classmethod
    def load(cls, scene: Any, config: ProgressiveConfig, device: torch.device,
             targets: list[Camera] | None = None) -> "_SceneData":
        TrainingView = _training_view_class()
        train_idx = list(scene.splits["train"])
        if not train_idx:
            raise InputError(getattr(scene, "root", scene.name), "the scene has no training views")
        trained = set(train_idx)
        for split in dict.fromkeys([*config.target_splits, *config.eval_splits]):
            shared = sorted(trained & set(scene.splits.get(split, [])))
            if shared:  # its ground truth would be trained on, then scored as a novel view
                raise InputError(getattr(scene, "root", scene.name) or scene.name,
                                 f"split {split!r} shares {len(shared)} views with train (e.g. "
                                 f"{scene.cameras[shared[0]].name!r}): held-out views must not be trained on")
        weight = config.sampling.loss_weight(False)
        train_u8 = [scene.load_image(i) for i in train_idx]
        train = [TrainingView(camera=scene.cameras[i], image=imageio.to_tensor(im)[0], weight=weight, mask=None,
                              is_pseudo=False) for i, im in zip(train_idx, train_u8)]
        if targets is None:
            seen, targets = set(), []
            for split in config.target_splits:
                for i in scene.splits.get(split, []):
                    if scene.cameras[i].name not in seen:  # a camera in several splits is one target
                        seen.add(scene.cameras[i].name)
                        targets.append(scene.cameras[i])
        if not targets:
            raise InputError(getattr(scene, "root", scene.name),
                             f"no target cameras: the scene has none of the splits {list(config.target_splits)} "
                             f"(it has {sorted(scene.splits)}); set target_splits or pass targets")
        evals = {}
        for split in config.eval_splits:
            idx = list(scene.splits.get(split, []))
            shared = _shared_names([scene.cameras[i] for i in idx])
            if shared:  # renders are saved by name
                raise InputError(getattr(scene, "root", scene.name),
                                 f"split {split!r} has several cameras named {shared}; renders are saved as "
                                 f"renders/<method>/{split}/<name>.png")
            if idx:
                evals[split] = ([scene.cameras[i] for i in idx], [scene.load_image(i) for i in idx])
        if config.eval_splits and not evals:  # a mistyped split would otherwise score nothing, silently
            raise InputError(getattr(scene, "root", scene.name),
                             f"none of the eval splits {list(config.eval_splits)} has views in this scene (it has "
                             f"{sorted(s for s, v in scene.splits.items() if len(v))}); set eval_splits to some of "
                             "those, or to [] to score nothing")
        return cls(train=train, train_uint8=train_u8, targets=list(targets), evals=evals,
                   rotation_weight=config.schedule.rotation_weight)

    def references(self, cameras: list[Camera]) -> list[np.ndarray]:
        """The nearest training image to each camera (the schedule's pose distance), at that camera's size: uint8
        ``[H, W, 3]`` each. A training camera of another size (a side camera, a trajectory rendered at 2x) gives its
        image resized with Lanczos, as the original Difix resizes its reference to the input (``Difix.sample``)."""
        train_cams = [v.camera for v in self.train]
        return [imageio.resize_image(self.train_uint8[nearest_index(c, train_cams, self.rotation_weight)], c.height, c.width)
                for c in cameras]


def _size_batches(sizes: list[tuple[int, int]], batch_size: int | None = None) -> list[list[int]]:
    """Indices of ``sizes`` grouped by size (in order of first appearance), each group cut into batches of at most
    ``batch_size`` (None: whole groups): a fixer request or a metric call takes images of one size."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, size in enumerate(sizes):
        groups.setdefault(tuple(size), []).append(i)
    batches = []
    for idx in groups.values():
        step = len(idx) if batch_size is None else max(1, batch_size)  # 0: one render a request, as before
        batches += [idx[j:j + step] for j in range(0, len(idx), step)]
    return batches


class _StepBatches:
    """A training view as one step's ``(images [1, 3, H, W], weights [1], masks [1, 1, H, W] | None)`` on the device.

    On CUDA (``on_device``) each view's image is kept there as uint8 and its mask as bool after its first use, so a
    step converts on the device instead of copying a float32 image from pageable host memory (7 MB at 576x1024).
    The float image is bitwise the same: the views were decoded from uint8 as ``u8 / 255`` on the CPU, and a step
    looks its values up in that same table (CUDA's division by a scalar multiplies by the reciprocal, which differs
    in the last bit for half of the 256 values).
    """

    def __init__(self, device: torch.device, on_device: bool = True):
        self.device = torch.device(device)
        self.cache = self.device.type == "cuda" and on_device
        self._views: dict[int, tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
        self._lut = torch.arange(256, dtype=torch.float32).div_(255.0)  # as imageio.to_tensor computes it

    def get(self, view) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if not self.cache:
            return (view.image[None].to(self.device), torch.tensor([view.weight], device=self.device),
                    None if view.mask is None else view.mask[None].to(self.device))
        hit = self._views.get(id(view))
        if hit is None:  # keyed by identity: the entry holds the view, so its id is not reused meanwhile
            u8 = view.image.mul(255.0).round_().to(torch.uint8).to(self.device)
            if self._lut.device != self.device:
                self._lut = self._lut.to(self.device)
            mask = None if view.mask is None else view.mask.to(self.device, torch.bool)
            hit = (view, u8, torch.tensor([view.weight], device=self.device), mask)
            self._views[id(view)] = hit
        _, u8, weight, mask = hit
        return self._lut[u8[None].long()], weight, None if mask is None else mask[None].float()


# -------------------------------------------------------------------- baseline, rendering, scoring

BASELINE_STATE = "baseline.pt"


def _baseline(scene, data: _SceneData, config: ProgressiveConfig, out: SceneOutputs, device,
              progress: bool) -> tuple[dict[str, list[np.ndarray]], dict[str, float]]:
    """Plain training with the same budget and sampling of real views, at loss weight 1 (plain 3DGS / NeRF: the
    progressive run's ``sampling.real_weight`` is Difix3D's own, and scaling the loss also scales the screen-space
    gradients densification thresholds) → (renders, timings). Its state is saved every
    ``config.baseline_save_every`` iterations, so an interrupted baseline resumes from the last one; a finished one
    is cached (its renders and state/baseline.json, its state file deleted) for re-runs."""
    done = out.state("baseline.json")
    if storage.exists(done):
        info = storage.read_json(done)
        renders = {split: [imageio.read_image(out.render("baseline", split, c.name)) for c in cams]
                   for split, (cams, _) in data.evals.items()}
        return renders, {"baseline_train_s": float(info["train_s"]), "baseline_save_s": info.get("save_s", 0.0)}
    rep = _new_representation(scene, config, device)
    rng = random.Random(_seed(config))
    run = {"iteration": 0, "train_s": 0.0, "save_s": 0.0}  # what a resumed baseline carries on from

    def restore(state: dict) -> None:
        rep.load_state_dict(state["representation"])
        rng.setstate(state["rng"])
        set_global_rng_state(state["torch_rng"])  # densification draws from torch's generators
        run.update({k: state[k] for k in run})

    iterations, every = int(config.trainer.iterations), max(0, config.baseline_save_every)
    train = [dataclasses.replace(view, weight=1.0) for view in data.train]
    batches = _StepBatches(device, config.images_on_device)
    with BackgroundWriter(enabled=config.background_writes) as writer:
        state_file = StateFile(out.state(BASELINE_STATE), writer, device, config.save_every_round,
                               config.snapshot_on_device)
        state_file.load(restore)
        start = run["iteration"]
        bar = _progress_bar(progress, start, iterations, f"baseline {scene.name}")
        t0 = time.perf_counter()
        for it in range(start, iterations):
            if every and it > start and it % every == 0:
                t_save = time.perf_counter()
                state_file.save(lambda: {"iteration": it, "train_s": run["train_s"] + t_save - t0,
                                         "save_s": run["save_s"], "rng": rng.getstate(),
                                         "torch_rng": global_rng_state(), "representation": rep.state_dict()})
                run["save_s"] += time.perf_counter() - t_save
            view = train[rng.randrange(len(train))]
            rep.train_step([view.camera], *batches.get(view))
            if bar is not None:
                bar.update(1)
        train_s = run["train_s"] + time.perf_counter() - t0
        if bar is not None:
            bar.close()
    renders = _render_splits(rep, data.evals)
    for split, imgs in renders.items():
        out.write_renders("baseline", split, [c.name for c in data.evals[split][0]], imgs)
    storage.write_json(done, {"train_s": train_s, "save_s": run["save_s"], "iterations": iterations})
    storage.delete(out.state(BASELINE_STATE))  # the renders are the baseline now; its state may be gigabytes
    return renders, {"baseline_train_s": train_s, "baseline_save_s": run["save_s"]}


def _render(rep, cameras: list[Camera]) -> tuple[list[np.ndarray], list[torch.Tensor]]:
    """Render one camera at a time (cameras may differ in size): per camera uint8 [H, W, 3] and alpha [1, H, W]."""
    rgbs, alphas = [], []
    with torch.no_grad():
        for cam in cameras:
            r = rep.render([cam])
            rgbs.append(imageio.to_uint8(r.rgb)[0])
            alphas.append(r.alpha[0].float().cpu())
    return rgbs, alphas


def _render_splits(rep, evals: dict) -> dict[str, list[np.ndarray]]:
    return {split: _render(rep, cams)[0] for split, (cams, _) in evals.items()}


def _fix_all(fixer: ViewFixer, renders: list[np.ndarray], refs: list[np.ndarray], cams: list[Camera],
             bs: int, what: str) -> list[np.ndarray]:
    """Every render fixed, in requests of at most ``bs`` renders of one size; uint8 [H, W, 3] per camera."""
    batches = _size_batches([(c.height, c.width) for c in cams], bs)
    futures = [fixer.submit(np.stack([renders[i] for i in idx]), np.stack([refs[i] for i in idx]),
                            [cams[i] for i in idx]) for idx in batches]
    fixed: list[np.ndarray] = [None] * len(cams)  # type: ignore[list-item]
    for idx, future in zip(batches, futures):
        for i, image in zip(idx, _checked_answer(fixer, future.result(), [cams[i] for i in idx], what)):
            fixed[i] = image
    return fixed


def _checked_answer(fixer: ViewFixer, fixed: Any, cameras: list[Camera], what: str) -> np.ndarray:
    """A fixer's answer to renders of ``cameras`` (one size) as uint8 ``[B, H, W, 3]``; a ValueError naming the fixer,
    ``what`` it fixed and the views when it is not one image per render at the render's size (a pseudo view of
    another size fails only later, in a training step that names neither)."""
    fixed = np.asarray(fixed)
    expected = (len(cameras), cameras[0].height, cameras[0].width, 3)
    if fixed.shape != expected:
        raise ValueError(f"fixer {fixer.name!r} ({fixer.describe()['kind']}) answered {what} "
                         f"(views {[c.name for c in cameras]}) with an array of shape {fixed.shape}; the renders are "
                         f"{expected}")
    if fixed.dtype != np.uint8:  # a float image in [0, 1] cast to uint8 would train the scene toward black
        raise ValueError(f"fixer {fixer.name!r} ({fixer.describe()['kind']}) answered {what} "
                         f"(views {[c.name for c in cameras]}) with {fixed.dtype} images; fixers answer uint8 "
                         "[B, H, W, 3] (0..255)")
    return fixed


def _score(renders: dict, evals: dict, want_lpips: bool, device) -> tuple[dict, dict]:
    """{split: {method: {psnr, ssim, lpips?}}} means over views, plus notes on what is missing and why."""
    from difix3d.eval import metrics as M

    notes, lpips_model = {}, None
    if want_lpips:
        from difix3d.eval.perceptual import build_lpips, lpips_availability

        avail = lpips_availability("alex")
        if avail.available:
            lpips_model = build_lpips("alex").to(device)
        else:
            notes["lpips"] = avail.reason
    else:
        notes["lpips"] = "disabled in the config"
    out: dict = {}
    for split, (_, gt) in evals.items():
        groups = _size_batches([image.shape[:2] for image in gt])  # views of one size score together
        for method in [m for m in METHODS if m in renders]:
            per_view: dict[str, list[torch.Tensor]] = {}
            for idx in groups:
                pred = imageio.to_tensor([renders[method][split][i] for i in idx])
                target = imageio.to_tensor([gt[i] for i in idx])
                per_view.setdefault("psnr", []).append(M.psnr(pred, target).clamp(max=100.0))
                per_view.setdefault("ssim", []).append(M.ssim(pred, target))
                if lpips_model is not None:
                    per_view.setdefault("lpips", []).append(M.lpips(lpips_model, pred.to(device), target.to(device)))
            out.setdefault(split, {})[method] = {k: float(torch.cat(v).mean()) for k, v in per_view.items()}
    return out, notes


# -------------------------------------------------------------------- small helpers

def _new_representation(scene, config: ProgressiveConfig, device):
    from difix3d.recon.factory import default_config, make_representation

    backend_config = config.nerf if config.representation == "nerfacto" else config.gaussian
    if backend_config is None:  # the backend's defaults, at the loop's budget
        backend_config = default_config(config.representation, iterations=int(config.trainer.iterations))
    rep = make_representation(config.representation, scene, backend_config, device, seed=_seed(config))
    if config.init_ply:
        if config.representation != "3dgs":
            raise ValueError(f"init_ply starts a 3dgs run; representation is {config.representation!r}")
        from difix3d.recon.gaussians import GaussianSplat

        rep = GaussianSplat.from_ply(config.init_ply, config.gaussian, device, scene_scale=rep.scene_scale)
    return rep


# settings whose change makes saved round state or the cached baseline wrong for a resumed run
_TRAINING_KEYS = ("representation", "gaussian", "nerf", "trainer", "schedule", "sampling", "init_ply",
                  "target_splits", "eval_splits", "baseline", "targets", "fixer")
# of those, what config.json has not always recorded: an output written before resumes without the check
# ("targets" is absent when no trajectory was passed, so its absence is compared)
_RECORDED_LATER = frozenset({"fixer"})


def _check_resumable(out: SceneOutputs, record: dict) -> None:
    """Refuse to resume saved state under a config (or fixer) that trains differently: it would mix two runs silently.
    ``record``: what :func:`_config_record` makes of this run."""
    has_state = any(storage.exists(out.state(name)) for name in (ProgressiveLoop.STATE_FILE, BASELINE_STATE,
                                                                 "baseline.json"))
    if not has_state or not storage.exists(out.config):
        return
    saved = storage.read_json(out.config)
    now = json.loads(json.dumps(record, default=storage._json_default))
    idle = "gaussian" if now.get("representation") == "nerfacto" else "nerf"  # the backend config not run
    changes = [c for k in _TRAINING_KEYS if k != idle and (k in saved or k not in _RECORDED_LATER)
               for c in nested_changes(saved.get(k), now.get(k), k, _NOT_TRAINING)
               if not (c[0] == "fixer.checkpoint" and c[1] is None)]  # recorded unknown (a client that could not tell)
    if changes:  # an InputError: the fleet records it and does not retry what would fail the same way
        sections = sorted({key.split(".")[0] for key, _, _ in changes}, key=_TRAINING_KEYS.index)
        details = "; ".join(f"{key} {a!r} -> {b!r}" for key, a, b in changes)
        raise InputError(out.config, f"this output folder holds a run with other {', '.join(sections)} ({details}); "
                                     "resume it with the same config and fixer, or write to a new output folder")


def _keep_started_budget(out: SceneOutputs, config: ProgressiveConfig) -> ProgressiveConfig:
    """A run started before the representation's iterations followed ``trainer.iterations`` recorded the preset's
    (e.g. gaussian 300 under ``--set trainer.iterations=600``); it resumes on the schedules it started with rather
    than being refused for a change the user did not make. Only that case: the saved representation budget differed
    from the saved run budget, and the run budget is unchanged."""
    name = "nerf" if config.representation == "nerfacto" else "gaussian"
    backend = getattr(config, name)
    if backend is None or not storage.exists(out.config):
        return config
    saved = storage.read_json(out.config)
    saved_backend, saved_trainer = saved.get(name) or {}, saved.get("trainer") or {}
    started = saved_backend.get("iterations")
    if (started is None or started == backend.iterations or started == saved_trainer.get("iterations")
            or saved_trainer.get("iterations") != config.trainer.iterations):
        return config
    log.warning("%s: resuming a run recorded with %s.iterations %s under trainer.iterations %s; it keeps the "
                "schedules it started with", out.config, name, started, config.trainer.iterations)
    return dataclasses.replace(config, **{name: dataclasses.replace(backend, iterations=int(started))})


# fields of the nested configs that do not change what is trained (rendering chunks, logging cadence)
_NOT_TRAINING = frozenset({"render_chunk", "eval_every", "checkpoint_every", "log_every"})


def _config_record(config: ProgressiveConfig, targets: list[Camera] | None, fixer: ViewFixer) -> dict:
    """``config.json``: the config, the fixer, and the targets when a trajectory was passed."""
    return (config.to_dict() | {"fixer": fixer.describe()}
            | ({"targets": [c.to_dict() for c in targets]} if targets else {}))


def _shared_names(cameras: list[Camera]) -> list[str]:
    """Names that more than one of ``cameras`` carries."""
    return sorted(name for name, n in Counter(c.name for c in cameras).items() if n > 1)


def _training_view_class():
    from difix3d.recon.trainer import TrainingView

    return TrainingView


def _seed(config: ProgressiveConfig) -> int:
    return int(getattr(config.trainer, "seed", 0) or 0)


def _progress_bar(enabled: bool, start: int, total: int, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc=desc, dynamic_ncols=True)


def _asdict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _asdict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_asdict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): _asdict(v) for k, v in obj.items()}
    if isinstance(obj, (int, float, str, bool)) or obj is None:
        return obj
    return repr(obj)
