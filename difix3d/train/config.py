"""FinetuneConfig: every knob of a Difix fine-tuning run, with the original training recipe as defaults.

Defaults follow the official Difix3D training command (README of nv-tlabs/Difix3D, ``src/train_difix.py``):
lr 2e-5, AdamW weight decay 1e-2, grad clip 1.0, 10k steps, 512 px, batch 4, L2/LPIPS/Gram weights 1.0, the Gram
term from step 2000 on, a 400 px Gram crop, checkpoints every 1000 steps, bf16 mixed precision.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from difix3d import storage

MIXED_PRECISIONS = ("bf16", "no")  # bf16 autocast on CUDA with fp32 master weights, or fp32 throughout


# Per-layer Gram weights of the original Difix loss (nv-tlabs/Difix3D src/loss.py, STYLE_WEIGHTS).
GRAM_LAYER_WEIGHTS = {"relu1_2": 1.0 / 2.6, "relu2_2": 1.0 / 4.8, "relu3_3": 1.0 / 3.7, "relu4_3": 1.0 / 5.6,
                      "relu5_3": 10.0 / 1.5}


@dataclass
class LossWeights:
    """Weights of the three training losses (official command: ``--lambda_l2/lpips/gram 1.0``)."""

    l2: float = 1.0
    lpips: float = 1.0
    gram: float = 1.0
    gram_warmup_steps: int = 2000  # Gram loss only after this many steps (``--gram_loss_warmup_steps 2000``)
    gram_crop: int = 400  # side of the shared random crop the Gram loss sees (train_difix.py: 400 x 400)
    # VGG16 layer -> weight inside the Gram term (a subset of relu1_2 ... relu5_3; set through --config JSON)
    gram_layers: dict[str, float] = field(default_factory=lambda: dict(GRAM_LAYER_WEIGHTS))

    def __post_init__(self) -> None:
        unknown = sorted(set(self.gram_layers) - set(GRAM_LAYER_WEIGHTS))
        if unknown or not self.gram_layers:
            raise ValueError(f"loss.gram_layers: {'unknown VGG16 layers ' + str(unknown) if unknown else 'empty'}; "
                             f"expected some of {', '.join(GRAM_LAYER_WEIGHTS)} (loss.gram 0 turns the term off)")
        negative = {k: v for k, v in self.gram_layers.items() if v < 0}
        if negative:
            raise ValueError(f"loss.gram_layers: negative weights {negative}")


@dataclass
class FinetuneConfig:
    """One fine-tuning run. ``name`` + ``storage_path`` identify it: re-running with both resumes it."""

    train_shards: str = ""  # pair shards: folder, glob or file URI (difix3d.train.pairs)
    val_shards: str = ""  # held-out pair shards; "" = validate on the first rows of the training shards
    init: str = "tiny"  # "tiny" | "sd-turbo" preset (random), "bundled", or a checkpoint URI (ours, official .pkl,
    #                     nvidia/difix folder, SD-Turbo folder)
    # SD-Turbo folder (or hub id in the local cache) that an official Difix .pkl needs for its VAE base;
    # None = $DIFIX3D_SD_TURBO on the machine that starts the job (workers get the value, not the variable)
    base: str | None = None
    name: str = "difix-finetune"
    storage_path: str = "outputs/finetune"  # URI of the run storage (local, s3://, gs://)
    export_uri: str = ""  # final model in our checkpoint format; "" = <storage_path>/<name>/final
    seed: int = 0

    # scale
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 2  # worker/node failures survived by restarting from the last checkpoint
    num_to_keep: int = 2  # checkpoints kept in the run storage

    # optimisation (official command / train_difix.py defaults)
    lr: float = 2e-5
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0  # max gradient norm; 0 = no clipping
    steps: int = 10_000
    batch_size: int = 4  # per worker
    height: int = 512  # training crop (``--resolution 512``)
    width: int = 512
    mixed_precision: str = "bf16"  # "bf16" autocast on CUDA with fp32 master weights, or "no"; CPU always fp32
    gradient_checkpointing: bool = False
    # cap each GPU worker's CUDA caching allocator at this many GiB (0 = no cap): a run that passes with 23 fits a
    # 24 GiB card with room for the CUDA context; beyond the cap it fails with CUDA's out-of-memory error
    gpu_memory_limit_gib: float = 0.0
    # "adamw" (fp32 moments; fused on CUDA) or "adamw8bit" (torchao: 8-bit moments, ~5 GB less for sd-turbo's UNet)
    optimizer: str = "adamw"
    # Also train the VAE's own weights (encoder and decoder). The paper freezes them because SD-Turbo's autoencoder
    # is pretrained; a preset started from random weights (``tiny``) has no autoencoder to freeze, and with it
    # frozen the fixer cannot even reproduce its input.
    train_vae: bool = False
    use_reference: bool = True  # train the reference view too when a row has one (losses over both views)
    loss: LossWeights = field(default_factory=LossWeights)

    # perceptual network: "pretrained" (torchvision VGG16 file in the torch hub cache), "random" (explicit
    # stand-in, tests only), or the path of a local torchvision vgg16 state dict
    perceptual_weights: str = "pretrained"

    # data
    shuffle_window: int = 64  # rows shuffled together inside a worker's slice (keeps reads sequential)
    skip_corrupt: bool = False  # a corrupt image: False = fail naming it, True = log and skip the row

    # cadence
    log_every: int = 10  # steps between log lines; 0: only at the last step
    val_every: int = 2000  # steps between validations (official --eval_freq 2000); 0: only at the last step
    val_rows: int = 16  # validation rows (per run, split over workers)
    ckpt_every: int = 1000  # steps between checkpoints (official --checkpointing_steps 1000); 0: only at the last step
    sample_grid_rows: int = 4  # rows of (degraded | output | target) in each sample grid

    # fault injection for recovery tests: the last worker's process exits once at this step (0 = never)
    fail_once_at_step: int = 0

    def __post_init__(self) -> None:
        from difix3d.train.optim import OPTIMIZERS

        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer {self.optimizer!r}: expected one of {', '.join(OPTIMIZERS)}")
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise ValueError(f"mixed_precision {self.mixed_precision!r}: expected one of {', '.join(MIXED_PRECISIONS)}")
        at_least = {"num_workers": 1, "batch_size": 1, "height": 8, "width": 8, "shuffle_window": 1, "steps": 0,
                    "log_every": 0, "val_every": 0, "ckpt_every": 0, "val_rows": 0, "sample_grid_rows": 0,
                    "num_to_keep": 1, "max_failures": -1, "lr": 0.0, "weight_decay": 0.0, "eps": 0.0,
                    "grad_clip": 0.0, "cpus_per_worker": 0.0, "gpu_memory_limit_gib": 0.0}
        for name, low in at_least.items():
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
                    or value < low:
                raise ValueError(f"{name}: expected a number >= {low}, got {value!r}")
        if self.height % 8 or self.width % 8:  # the VAE downsamples by 8 and its skips must meet the decoder's sizes
            raise ValueError(f"height and width: multiples of 8 expected, got {self.height}x{self.width}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas: expected two numbers in [0, 1), got {self.betas!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FinetuneConfig":
        if not isinstance(d, dict):
            raise ValueError(f"a FinetuneConfig is a JSON object of fields, got {type(d).__name__}")
        d = dict(d)
        loss = d.pop("loss", {})
        if not isinstance(loss, dict):
            raise ValueError(f"loss must be an object of LossWeights fields, got {loss!r}")
        unknown_loss = sorted(set(loss) - {f.name for f in dataclasses.fields(LossWeights)})
        if unknown_loss:
            raise ValueError(f"unknown LossWeights fields: {unknown_loss}")
        loss = LossWeights(**loss)
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown FinetuneConfig fields: {unknown}")
        return cls(loss=loss, **d)

    def run_uri(self) -> str:
        return storage.join(self.storage_path, self.name)

    def final_uri(self) -> str:
        return self.export_uri or storage.join(self.run_uri(), "final")

    def write(self, uri: str) -> None:
        storage.write_json(uri, self.to_dict())

    def __str__(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)
