"""Image I/O and the two image layouts of the project.

Inside the library images are float32 ``[B, 3, H, W]`` in ``[0, 1]``; between processes (Ray object store,
Parquet) they are ``uint8`` ``[H, W, 3]`` numpy arrays, or PNG bytes.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from difix3d import storage
from difix3d.errors import InputError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def decode_image(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """PNG/JPEG bytes → uint8 ``[H, W, 3]``; a corrupt image raises :class:`InputError` naming ``source``."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode.startswith("I;16") or im.mode == "I":
                return _gray16_to_rgb8(np.asarray(im), source)
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except UnidentifiedImageError:  # PIL's message names only its BytesIO
        raise InputError(source, "not a readable image (corrupt, empty, or a format PIL cannot read): remove or "
                                 "replace the file") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(source, f"cannot decode image ({e}): remove or replace the file") from e


def _gray16_to_rgb8(gray: np.ndarray, source: str) -> np.ndarray:
    """16-bit grayscale (PIL modes ``I;16*``, and ``I`` as 16-bit PNGs open) → uint8 RGB, scaled by 1/257.

    PIL's own ``convert("RGB")`` clips these values to 255 instead of scaling them: a mid-gray image became white.
    """
    g = np.asarray(gray, dtype=np.int64)
    if g.size and (g.min() < 0 or g.max() > 65535):
        raise InputError(source, f"grayscale values outside the 16-bit range ({g.min()}..{g.max()})")
    g8 = np.round(g / 257.0).astype(np.uint8)
    return np.repeat(g8[..., None], 3, axis=-1)


def encode_image(image: np.ndarray, fmt: str = "png", quality: int = 95) -> bytes:
    image = _check_hwc_uint8(image)
    buf = io.BytesIO()
    fmt = fmt.lower().lstrip(".")
    fmt = {"jpg": "jpeg"}.get(fmt, fmt)
    kwargs = {"quality": quality} if fmt == "jpeg" else {"compress_level": 1} if fmt == "png" else {}
    Image.fromarray(image).save(buf, format=fmt.upper(), **kwargs)
    return buf.getvalue()


def read_image(uri: str) -> np.ndarray:
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError as e:
        raise InputError(uri, "image file not found") from e
    return decode_image(data, source=uri)


# what write_image encodes, by file extension
WRITE_FORMATS = {"png": "png", "jpg": "jpeg", "jpeg": "jpeg", "webp": "webp", "bmp": "bmp", "tif": "tiff",
                 "tiff": "tiff"}


def write_image(uri: str, image: np.ndarray) -> None:
    """Encode ``image`` in the format its file name's extension names (PNG when it has none)."""
    name = str(uri).replace("\\", "/").rsplit("/", 1)[-1]
    ext = name.rsplit(".", 1)[-1].lower() if "." in name else "png"
    if ext not in WRITE_FORMATS:
        raise InputError(str(uri), f"cannot write images as .{ext}: use one of "
                                   f"{', '.join('.' + e for e in WRITE_FORMATS)}")
    storage.write_bytes(uri, encode_image(image, fmt=WRITE_FORMATS[ext]))


def to_tensor(images: np.ndarray | list[np.ndarray]) -> torch.Tensor:
    """uint8 ``[H, W, 3]`` or ``[B, H, W, 3]`` (or a list of ``[H, W, 3]``) → float32 ``[B, 3, H, W]`` in [0, 1]."""
    if isinstance(images, list):
        images = np.stack(images)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images [B, H, W, 3], got shape {tuple(images.shape)}")
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float ``[B, 3, H, W]`` (or ``[3, H, W]``) in [0, 1] → uint8 ``[B, H, W, 3]`` (or ``[H, W, 3]``)."""
    squeeze = images.ndim == 3
    if squeeze:
        images = images[None]
    out = (images.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return out[0] if squeeze else out


def _check_hwc_uint8(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected a uint8 [H, W, 3] image, got {image.dtype} {tuple(image.shape)}")
    return image
