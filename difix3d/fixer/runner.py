"""Images in, fixed images out: devices, dtypes, batching, padding and input checks around a DifixModel."""

from __future__ import annotations

import threading
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from difix3d.device import default_device, default_dtype
from difix3d.fixer.channels_last_norm import use_channels_last_group_norm
from difix3d.fixer.config import COMPILE_MODES, CUDA_GRAPH_MODES
from difix3d.fixer.model import DifixModel
from difix3d.fixer.transposed_upsample import use_transposed_upsample
from difix3d.fixer.wide_head_attention import use_wide_head_attention
from difix3d.imageio import resize_image

MULTIPLE = 8  # the VAE downsamples by 8; the UNet copes with any latent size itself (upsample_size)
MIN_SIDE = 32  # smaller frames are padded up (and cropped back): a narrow model's innermost group norms need >1x1
# compile=None compiles on CUDA from this size up: sd-turbo (949 M) runs ~3x faster compiled, while a small model
# gains little and pays a compile per batch size and image size (minutes of stalls for the bundled 1.9 M demo fixer)
COMPILE_MIN_PARAMS = 100_000_000


def compile_pays(model: torch.nn.Module, device: torch.device) -> bool:
    """The ``compile=None`` rule: torch.compile on CUDA for models of ``COMPILE_MIN_PARAMS`` parameters or more."""
    return torch.device(device).type == "cuda" and sum(p.numel() for p in model.parameters()) >= COMPILE_MIN_PARAMS


class FixerRunner:
    """Runs a :class:`DifixModel` on images of any size and batch.

    ``fix(images, refs=None)``: numpy uint8 ``[B, H, W, 3]`` (or ``[H, W, 3]``) -> the same; float tensor
    ``[B, 3, H, W]`` in [0, 1] -> float32 tensor on the input's device. H, W are padded by reflection to a multiple of
    8 and cropped back (aspect ratio never changes); batches run in micro-batches of ``max_batch``. Thread-safe.
    The runner takes ``model`` over: it merges its LoRA, casts, freezes and (maybe) converts it in place.

    ``nhwc_group_norm`` (with channels_last): group norms computed on NHWC views (:mod:`channels_last_norm`), the
    same results without the layout copies PyTorch's CUDA kernel makes. ``None`` (default) turns it on; measured per
    576x1024 frame on an H200 (``benchmarks/RESULTS.md``): eager 117 -> 81 ms, compiled 38.7 -> 37.0 ms.

    ``transposed_upsample``: every nearest-2x-then-3x3-conv upsampler runs as one stride-2 transposed conv with folded
    taps (:mod:`transposed_upsample`): the same results from 4/9 of its FLOPs, without the upsampled copy. ``None``
    (default) turns it on. With ``wide_head_attention`` it took the compiled fixer (CUDA graphs) from 31.2 to 27.7 ms
    per 576x1024 frame at batch 1 on an H200, and per-channel norm statistics on to 25.7 ms (23.2 ms at batch 4;
    norm scales and shifts computed once per channel, by one Triton kernel, 23.0 ms: kernels 23.0 -> 21.8 ms).

    ``wide_head_attention``: the VAE's 512-wide attention heads, too wide for flash and cuDNN attention, run as two
    GEMMs and a float32 softmax (:mod:`wide_head_attention`) instead of PyTorch's generic kernel. ``None`` (default)
    turns it on on CUDA.

    ``compile_mode``: torch.compile's mode when compiling. ``"reduce-overhead"`` adds CUDA graphs (31.2 ms per frame
    at batch 1 above): each new batch size or frame size records a graph, and the graphs keep their memory, so use it
    where shapes repeat (a pool replica, a fleet of one camera size).
    """

    def __init__(self, model: DifixModel, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                 compile: bool | None = False, channels_last: bool | None = None, max_batch: int | None = None,
                 nhwc_group_norm: bool | None = None, compile_mode: str = "default",
                 transposed_upsample: bool | None = None, wide_head_attention: bool | None = None):
        if compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode: expected one of {', '.join(COMPILE_MODES)}, got {compile_mode!r}")
        self.device = default_device(device)
        self.dtype = dtype or default_dtype(self.device)
        self.channels_last = self.device.type == "cuda" if channels_last is None else channels_last
        self.max_batch = max_batch or (4 if self.device.type == "cuda" else 8)
        model.merge_lora()  # in the checkpoint's precision, before any cast: LoRA adds nothing at inference
        self.transposed_upsample = True if transposed_upsample is None else bool(transposed_upsample)
        if self.transposed_upsample:
            use_transposed_upsample(model)  # folded from the merged weights, before the cast
        self.wide_head_attention = (self.device.type == "cuda" if wide_head_attention is None
                                    else bool(wide_head_attention))
        if self.wide_head_attention:
            use_wide_head_attention(model)
        self.model = model.to(self.device, self.dtype).eval().requires_grad_(False)
        if self.device.type == "cuda":
            # a fixer sees few shapes (batch sizes up to max_batch, one padded frame size), so cuDNN's autotuned conv
            # algorithms pay off from the second call; the latency benchmark measures with this on
            torch.backends.cudnn.benchmark = True
        if compile is None:
            compile = compile_pays(model, self.device)
        if nhwc_group_norm is None:
            nhwc_group_norm = True
        self.nhwc_group_norm = self.channels_last and bool(nhwc_group_norm)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if self.nhwc_group_norm:
            use_channels_last_group_norm(self.model)  # activations stay NHWC through the norms
        self.compiled = bool(compile)
        self.compile_mode = compile_mode if self.compiled else None
        # a CUDA graph's outputs live in memory the next replay overwrites: each call marks a new step, and _run
        # copies what it keeps
        self._cuda_graphs = self.compiled and self.device.type == "cuda" and compile_mode in CUDA_GRAPH_MODES
        self._forward = torch.compile(self.model, mode=compile_mode, dynamic=False) if compile else self.model
        self._lock = threading.Lock()
        self.checkpoint: str | None = None  # the URI from_checkpoint loaded (None: built from a model object)

    @classmethod
    def from_checkpoint(cls, uri: str, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                        compile: bool | None = False, channels_last: bool | None = None, max_batch: int | None = None,
                        base: str | None = None, nhwc_group_norm: bool | None = None,
                        compile_mode: str = "default", transposed_upsample: bool | None = None,
                        wide_head_attention: bool | None = None) -> "FixerRunner":
        from difix3d.fixer.checkpoint import load_checkpoint

        runner = cls(load_checkpoint(uri, base=base), device, dtype, compile, channels_last, max_batch, nhwc_group_norm,
                     compile_mode, transposed_upsample, wide_head_attention)
        runner.checkpoint = str(uri)  # runs record which weights fixed their views (ViewFixer.describe)
        return runner

    def fix(self, images, refs=None):
        if isinstance(images, torch.Tensor):
            x = _check_tensor(images, "images")
            r = None if refs is None else _check_tensor(refs, "refs")
            r = _matched_refs(x, r)
            return self._run(x, r).to(images.device)
        if isinstance(images, np.ndarray) or isinstance(images, list):
            arr, single = _check_uint8(images, "images")
            rarr = None if refs is None else _check_uint8(refs, "refs")[0]
            if rarr is not None and rarr.shape[0] == arr.shape[0] and rarr.shape[1:3] != arr.shape[1:3]:
                rarr = np.stack([resize_image(r, *arr.shape[1:3]) for r in rarr])  # Lanczos, as the official code
            x = _uint8_to_float(arr)  # [B, 3, H, W]
            r = None if rarr is None else _uint8_to_float(rarr)
            r = _matched_refs(x, r)
            out = self._run(x, r).mul_(255.0).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
            return out[0] if single else out
        raise ValueError(f"images: expected a uint8 numpy array [B, H, W, 3] or a float tensor [B, 3, H, W], "
                         f"got {type(images).__name__}")

    @torch.no_grad()  # not inference_mode: callers may edit the outputs in place
    def _run(self, x: torch.Tensor, r: torch.Tensor | None) -> torch.Tensor:
        """x, r: float [B, 3, H, W] in [0, 1] on any device -> float32 [B, 3, H, W] on CPU/any device."""
        h, w = x.shape[-2:]
        outs = []
        with self._lock:
            for i in range(0, x.shape[0], self.max_batch):
                xb = self._prepare(x[i:i + self.max_batch])
                rb = None if r is None else self._prepare(r[i:i + self.max_batch])
                if self._cuda_graphs:
                    torch.compiler.cudagraph_mark_step_begin()
                y = self._forward(xb, rb)  # [b, 3, H', W'] in [-1, 1]
                y = y[..., :h, :w].to(torch.float32, copy=True)  # never the forward's own (maybe graph) memory
                outs.append(y.add_(1.0).mul_(0.5).to(x.device))
        return torch.cat(outs).clamp_(0.0, 1.0)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_to_multiple(x.to(self.device, torch.float32).clamp(0.0, 1.0) * 2.0 - 1.0, MULTIPLE, MIN_SIDE)
        x = x.to(self.dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def pad_to_multiple(x: torch.Tensor, multiple: int, min_size: int = 0) -> torch.Tensor:
    """Pad [B, C, H, W] at the bottom/right to multiples of ``multiple``, and to at least ``min_size`` a side:
    reflection (no hard border for the network to reproduce), replication where the image is too small to
    reflect."""
    h, w = x.shape[-2:]
    ph, pw = max((-h) % multiple, min_size - h), max((-w) % multiple, min_size - w)
    ph, pw = ph + (-(h + ph)) % multiple, pw + (-(w + pw)) % multiple
    if ph == 0 and pw == 0:
        return x
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


def _check_tensor(t: torch.Tensor, name: str) -> torch.Tensor:
    if t.ndim == 3:
        t = t[None]
    if t.ndim != 4 or t.shape[1] != 3:
        raise ValueError(f"{name}: expected a float tensor [B, 3, H, W], got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{name}: expected a float tensor in [0, 1], got dtype {t.dtype}")
    if t.shape[0] == 0:
        raise ValueError(f"{name}: empty batch")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    if t.max() > 2.0:  # renders a little above 1 are clamped; this is another scale (clamped, it was all white)
        raise ValueError(f"{name}: float values up to {float(t.max()):g}, expected [0, 1]; 0..255 images go in as "
                         "uint8 numpy arrays [B, H, W, 3]")
    return t


def _check_uint8(a, name: str) -> tuple[np.ndarray, bool]:
    if isinstance(a, list):
        if not a:
            raise ValueError(f"{name}: empty list")
        shapes = {np.asarray(i).shape for i in a}
        if len(shapes) != 1:
            raise ValueError(f"{name}: images of one call must share one size, got {sorted(shapes)}")
        a = np.stack([np.asarray(i) for i in a])
    if a.dtype != np.uint8:
        raise ValueError(f"{name}: expected dtype uint8 (HWC images), got {a.dtype}; floats go in as tensors "
                         "[B, 3, H, W] in [0, 1]")
    single = a.ndim == 3
    if single:
        a = a[None]
    if a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"{name}: expected shape [B, H, W, 3] or [H, W, 3], got {a.shape}")
    if a.shape[0] == 0:
        raise ValueError(f"{name}: empty batch")
    return np.ascontiguousarray(a), single


def _matched_refs(x: torch.Tensor, r: torch.Tensor | None) -> torch.Tensor | None:
    """The references, one per image, at the images' size (another size is resized: bicubic with antialiasing for
    tensors; uint8 arrays are resized with Lanczos before, as the official Difix code does)."""
    if r is None:
        return None
    if r.shape[0] != x.shape[0]:
        raise ValueError(f"refs: {r.shape[0]} references for {x.shape[0]} images (one reference per image)")
    if r.shape[-2:] != x.shape[-2:]:
        r = F.interpolate(r, size=tuple(x.shape[-2:]), mode="bicubic", antialias=True, align_corners=False)
    return r


def _uint8_to_float(arr: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [0, 1]. Arrays from Ray's object store are read-only; the
    zero-copy view is only read (``.float()`` copies), so torch's warning about non-writable arrays does not apply."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        view = torch.from_numpy(arr)
    return view.permute(0, 3, 1, 2).float().div_(255.0)
