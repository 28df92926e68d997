"""Image I/O and the two image layouts of the project.

Inside the library images are float32 ``[B, 3, H, W]`` in ``[0, 1]``; between processes (Ray object store,
Parquet) they are ``uint8`` ``[H, W, 3]`` numpy arrays, or PNG bytes.
"""

from __future__ import annotations

import io
import logging

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from difix3d import storage
from difix3d.errors import InputError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")

EXIF_ORIENTATION = 0x0112  # the EXIF/TIFF Orientation tag: 1 upright, 2-8 flips and quarter turns
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*")
# numpy equivalents of PIL's Image.Transpose for each orientation (as ImageOps.exif_transpose maps them)
_UPRIGHT = {
    2: lambda a: a[:, ::-1],  # FLIP_LEFT_RIGHT
    3: lambda a: a[::-1, ::-1],  # ROTATE_180
    4: lambda a: a[::-1],  # FLIP_TOP_BOTTOM
    5: lambda a: a.transpose(1, 0, 2),  # TRANSPOSE
    6: lambda a: np.rot90(a, k=-1),  # ROTATE_270 (a quarter turn clockwise)
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # TRANSVERSE
    8: lambda a: np.rot90(a, k=1),  # ROTATE_90 (a quarter turn counter-clockwise)
}
# a float image whose values lie within [-FLOAT_SLACK, 1 + FLOAT_SLACK] holds [0, 1] display values (renderers and
# denoisers overshoot a little); it is clipped to [0, 1]
FLOAT_SLACK = 0.5


def decode_image(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Image bytes → uint8 ``[H, W, 3]``, upright as viewers show it (the EXIF orientation applied: camera files from
    COLMAP/nerfstudio describe the upright image); a corrupt image raises :class:`InputError` naming ``source``."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            _orientation(im)  # reads (and keeps) the EXIF before load(), which may close the file a TIFF's tags are in
            im.load()
            orientation = _orientation(im)  # 1 where PIL applied it itself (a TIFF's, in recent Pillow)
            image = _pil_to_rgb8(im, source)
    except InputError:
        raise
    except UnidentifiedImageError:  # PIL's message names only its BytesIO
        if not data.startswith(_TIFF_MAGIC):
            raise InputError(source, "not a readable image (corrupt, empty, or a format PIL cannot read): remove or "
                                     "replace the file") from None
        image, orientation = _decode_tiff_without_pil(data, source)
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(source, f"cannot decode image ({e}): remove or replace the file") from e
    return _upright(image, orientation)


def image_size(data: bytes, source: str = "<bytes>") -> tuple[int, int]:
    """(width, height) of the image :func:`decode_image` returns: a quarter-turn EXIF orientation swaps the stored
    sides. Read from the header where the format allows; PNGs and TIFFs are decoded (a PNG's EXIF may follow its
    pixels; PIL turns a TIFF itself on load, and whether its size says so before depends on the Pillow version)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            _orientation(im)  # as in decode_image: the EXIF read before load()
            if im.format == "TIFF":
                im.load()
            orientation = _orientation(im)
            w, h = im.size
    except UnidentifiedImageError:
        if not data.startswith(_TIFF_MAGIC):
            raise InputError(source, "not a readable image (corrupt, empty, or a format PIL cannot read): remove or "
                                     "replace the file") from None
        image, orientation = _decode_tiff_without_pil(data, source)
        h, w = image.shape[:2]
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(source, f"cannot read the image size ({e}): remove or replace the file") from e
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def _orientation(im: Image.Image) -> int:
    """The EXIF (or TIFF, or XMP) orientation of ``im``; 1 when it has none or its EXIF block is broken (viewers
    show such files as stored)."""
    try:
        return int(im.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - a damaged EXIF block must not make a readable image unreadable
        return 1


def _upright(image: np.ndarray, orientation: int) -> np.ndarray:
    flip = _UPRIGHT.get(orientation)
    return image if flip is None else np.ascontiguousarray(flip(image))


def _pil_to_rgb8(im: Image.Image, source: str) -> np.ndarray:
    """PIL's own ``convert("RGB")`` clips 16-bit and float values to 0..255 instead of scaling them: a mid-gray
    16-bit image became white, and a [0, 1] float TIFF (mode ``F``) black. Those modes are scaled here."""
    if im.mode == "F":
        return _gray_to_rgb(_float_to_uint8(np.asarray(im), source))
    if im.mode.startswith("I;16") or im.mode == "I":  # "I": 16-bit PNGs open so, and 32-bit integer TIFFs
        return _gray_to_rgb(_uint16_to_uint8(np.asarray(im), source))
    if im.mode in ("RGBa", "La"):  # premultiplied alpha: PIL converts to straight alpha
        im = im.convert(im.mode.upper())
    if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
        return _composite_over_background(np.asarray(im.convert("RGBA"), dtype=np.uint8), source)
    return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


_warned_transparency = False


def _composite_over_background(rgba: np.ndarray, source: str, premultiplied: bool = False) -> np.ndarray:
    """An RGBA image's RGB, its transparent pixels composited over black: the background the 3DGS renderer draws by
    default, so a render and its ground truth agree where nothing is (the colour a file stores under zero alpha is
    arbitrary). Said once per process, naming the first such file. ``premultiplied``: the RGB is already alpha-scaled."""
    global _warned_transparency
    alpha = rgba[..., 3:].astype(np.float32) / 255.0
    if alpha.min() >= 1.0:
        return np.ascontiguousarray(rgba[..., :3])
    if not _warned_transparency:
        _warned_transparency = True
        log.warning("%s: image has transparent pixels; they are composited over black, the 3DGS renderer's default "
                    "background. Other such images are composited the same way without a further message", source)
    rgb = rgba[..., :3].astype(np.float32)
    if not premultiplied:
        rgb = rgb * alpha
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=-1)


def _uint16_to_uint8(values: np.ndarray, source: str) -> np.ndarray:
    """0..65535 samples → uint8, scaled by 1/257; values outside the 16-bit range (32-bit or signed integer images)
    are an error naming the file rather than a guess."""
    g = np.asarray(values, dtype=np.int64)
    if g.size and (g.min() < 0 or g.max() > 65535):
        raise InputError(source, f"integer pixel values outside the 16-bit range ({g.min()}..{g.max()}): save the "
                                 "image as 8 or 16-bit")
    return np.round(g / 257.0).astype(np.uint8)


def _float_to_uint8(values: np.ndarray, source: str) -> np.ndarray:
    """Float samples → uint8. Values within [0, 1] (± ``FLOAT_SLACK``) are display values, as renderers and HDR tools
    write them: clipped to [0, 1] and scaled by 255. Whole numbers in 0..255 are 8-bit data saved as floats and kept.
    Anything else (HDR radiance, depth, NaN or infinity) has no display mapping we could pick safely, so it is an
    error naming the file and the range, not a dark or washed-out image."""
    v = np.asarray(values, dtype=np.float32)
    if v.size == 0:
        return np.zeros(v.shape, dtype=np.uint8)
    finite = np.isfinite(v)
    if not finite.all():
        raise InputError(source, f"float image holds NaN or infinite values ({int(v.size - finite.sum())} of "
                                 f"{v.size} samples): remove or replace the file")
    lo, hi = float(v.min()), float(v.max())
    if -FLOAT_SLACK <= lo and hi <= 1.0 + FLOAT_SLACK:
        return np.rint(np.clip(v, 0.0, 1.0) * 255.0).astype(np.uint8)
    if 0.0 <= lo and hi <= 255.0 and np.array_equal(v, np.rint(v)):
        return v.astype(np.uint8)
    raise InputError(source, f"float pixel values span {lo:g}..{hi:g}, not [0, 1] (nor whole numbers 0..255): "
                             "tone-map HDR images to [0, 1] first, or save them as 8/16-bit")


def _decode_tiff_without_pil(data: bytes, source: str) -> tuple[np.ndarray, int]:
    """(uint8 ``[H, W, 3]`` as stored, orientation) of a TIFF PIL cannot open (float RGB, 16-bit gray with alpha),
    through tifffile. tifffile comes with scikit-image but is no dependency of ours: without it such files are an
    error saying so."""
    try:
        import tifffile
    except ImportError:
        raise InputError(source, "a TIFF that PIL cannot read (float RGB?) and tifffile, which reads it, is not "
                                 "installed: pip install tifffile, or save the image as 8/16-bit") from None
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            page = tif.pages[0]
            samples = page.asarray()
            extrasamples = page.extrasamples
            photometric = int(page.photometric)
            tag = page.tags.get(EXIF_ORIENTATION)
            orientation = int(tag.value) if tag is not None else 1
    except Exception as e:  # noqa: BLE001 - tifffile's errors for a damaged or unsupported file are of many kinds
        raise InputError(source, f"cannot decode TIFF ({e}): remove or replace the file") from e
    if samples.ndim == 2:
        samples = samples[..., None]
    rgb = photometric == 2 and samples.ndim == 3 and samples.shape[-1] >= 3
    gray = photometric in (0, 1) and samples.ndim == 3  # min-is-white, min-is-black; extra samples are alpha
    if not (rgb or gray):
        raise InputError(source, f"unsupported TIFF layout (photometric {photometric}, samples "
                                 f"{list(samples.shape)}): save the image as RGB or grayscale")
    channels = 3 if rgb else 1
    kinds = [int(k) for k in (extrasamples or ())]  # TIFF ExtraSamples: 0 unspecified, 1 associated, 2 straight alpha
    alpha = None
    if samples.shape[-1] > channels and kinds and kinds[0] in (1, 2):  # other extra samples (depth, IR) are dropped
        alpha = samples[..., channels]
    samples = samples[..., :3] if rgb else samples[..., 0]
    if samples.dtype.kind not in "fui":
        raise InputError(source, f"unsupported TIFF sample type {samples.dtype}: save the image as 8/16-bit")
    out = _tiff_samples_to_uint8(samples, source)
    if photometric == 0:
        out = 255 - out
    out = out if rgb else _gray_to_rgb(out)
    if alpha is not None:
        out = _composite_over_background(np.dstack([out, _tiff_samples_to_uint8(alpha, source)]), source,
                                         premultiplied=kinds[0] == 1)
    return out, orientation


def _tiff_samples_to_uint8(samples: np.ndarray, source: str) -> np.ndarray:
    if samples.dtype.kind == "f":
        return _float_to_uint8(samples, source)
    if samples.dtype == np.uint8:
        return samples
    return _uint16_to_uint8(samples, source)


def resize_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 ``[H, W, 3]`` at ``height`` x ``width`` with PIL's Lanczos (deterministic; what the official Difix code
    resizes references with); the image itself when it has that size."""
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), Image.LANCZOS))


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
