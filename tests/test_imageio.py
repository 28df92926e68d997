import io
import json
import sys

import numpy as np
import pytest
from PIL import Image, ImageOps, UnidentifiedImageError

from difix3d.errors import InputError
from difix3d.imageio import IMAGE_EXTENSIONS, decode_image, encode_image, image_size, read_image
from difix3d.scene.camera import Camera
from difix3d.scene.driving import load_driving
from difix3d.scene.nerfstudio import load_nerfstudio
from difix3d.scene.scene import read_view_image


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_16_bit_grayscale_is_scaled_not_clipped():
    gray = np.array([[0, 257, 32768], [65535, 1000, 12850]], dtype=np.uint16)
    out = decode_image(_png(Image.fromarray(gray)), "gray16.png")
    assert out.dtype == np.uint8 and out.shape == (2, 3, 3)
    np.testing.assert_array_equal(out[..., 0], np.round(gray / 257.0).astype(np.uint8))
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P"])
def test_8_bit_modes_decode_to_rgb(mode):
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    image = Image.fromarray(rgb).convert(mode)
    out = decode_image(_png(image), "x.png")
    np.testing.assert_array_equal(out, np.asarray(image.convert("RGB")))


def test_round_trip_and_corrupt_bytes_name_the_source():
    rgb = np.random.default_rng(1).integers(0, 256, (4, 6, 3), dtype=np.uint8)
    np.testing.assert_array_equal(decode_image(encode_image(rgb)), rgb)
    with pytest.raises(InputError, match="broken.png: not a readable image.*remove or replace") as err:
        decode_image(b"not a png", "broken.png")
    assert "BytesIO" not in str(err.value)



# --- EXIF orientation: images come out upright, as viewers show them

# PIL's own transpose for each EXIF orientation (the table of ImageOps.exif_transpose), an independent reference
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}


def _with_orientation(image: Image.Image, fmt: str, orientation: int, **kwargs) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    image.save(buf, format=fmt, exif=exif, **kwargs)
    return buf.getvalue()


def _blocks() -> np.ndarray:
    """16 x 32 RGB of four 8 x 16 blocks of distinct colours (JPEG keeps such blocks nearly exact): asymmetric under
    every flip and turn."""
    image = np.zeros((16, 32, 3), np.uint8)
    image[:8, :16] = (255, 0, 0)  # top left: red
    image[:8, 16:] = (0, 255, 0)  # top right: green
    image[8:, :16] = (0, 0, 255)  # bottom left: blue
    image[8:, 16:] = (255, 255, 255)  # bottom right: white
    return image


def test_jpeg_with_exif_rotation_is_read_upright(tmp_path):
    path = tmp_path / "rotated.jpg"
    (tmp_path / "rotated.jpg").write_bytes(_with_orientation(Image.fromarray(_blocks()), "JPEG", 6, quality=100))
    stored = np.asarray(Image.open(path).convert("RGB"))  # the pixels as stored, before the orientation
    out = read_image(str(path))
    assert out.shape == (32, 16, 3)  # orientation 6: a quarter turn clockwise to view
    np.testing.assert_array_equal(out, np.rot90(stored, k=-1))
    np.testing.assert_array_equal(out, np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB")))
    # what a viewer shows: the stored bottom-left (blue) now at the top left, the stored top-left (red) top right
    corners = {"top left": out[4, 4], "top right": out[4, 11], "bottom left": out[28, 4], "bottom right": out[28, 11]}
    expected = {"top left": (0, 0, 255), "top right": (255, 0, 0), "bottom left": (255, 255, 255),
                "bottom right": (0, 255, 0)}
    for where, colour in expected.items():
        np.testing.assert_allclose(corners[where], colour, atol=8, err_msg=where)


def test_orientation_6_on_hand_computed_pixels():
    pixels = np.array([[1, 2, 3], [4, 5, 6]], np.uint8)  # stored 2 rows x 3 columns
    out = decode_image(_with_orientation(Image.fromarray(pixels), "PNG", 6), "o6.png")
    np.testing.assert_array_equal(out[..., 0], [[4, 1], [5, 2], [6, 3]])  # turned a quarter clockwise


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "TIFF"])
def test_every_exif_orientation_is_applied_once(fmt, orientation):
    """Lossless formats, exact pixels. PIL turns TIFFs itself on load (and reports their size so): not twice."""
    rgb = np.random.default_rng(orientation).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    kwargs = {"lossless": True} if fmt == "WEBP" else {}
    data = _with_orientation(Image.fromarray(rgb), fmt, orientation, **kwargs)
    method = _TRANSPOSE.get(orientation)
    expected = np.asarray(Image.fromarray(rgb) if method is None else Image.fromarray(rgb).transpose(method))
    out = decode_image(data, f"o{orientation}.{fmt.lower()}")
    np.testing.assert_array_equal(out, expected)
    assert image_size(data) == (expected.shape[1], expected.shape[0])


def test_broken_exif_block_reads_the_image_as_stored():
    rgb = np.random.default_rng(2).integers(0, 256, (4, 6, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", exif=b"Exif\x00\x00garbage")
    np.testing.assert_array_equal(decode_image(buf.getvalue(), "junk-exif.png"), rgb)


def _camera(width: int, height: int) -> Camera:
    K = np.array([[10.0, 0, width / 2], [0, 10.0, height / 2], [0, 0, 1]])
    return Camera(viewmat=np.eye(4), K=K, width=width, height=height, name="v0")


def test_camera_sizes_describe_the_upright_image(tmp_path):
    """Camera files (COLMAP, nerfstudio) give the size of the upright image; one giving the stored size is reported
    as inconsistent, naming the file, rather than crashing later."""
    path = str(tmp_path / "r.jpg")
    (tmp_path / "r.jpg").write_bytes(_with_orientation(Image.fromarray(_blocks()), "JPEG", 8))
    assert read_view_image(path, _camera(16, 32)).shape == (32, 16, 3)
    with pytest.raises(InputError, match=r"r\.jpg: frame 'v0': image is 16x32 but its camera is 32x16"):
        read_view_image(path, _camera(32, 16))


def test_scenes_without_sizes_take_them_from_the_upright_image(tmp_path):
    """nerfstudio frames without w/h, and drivestudio segments (which never give sizes), read the size of the image
    as the loader returns it: the stored size would make every rotated view 'inconsistent'."""
    rotated = _with_orientation(Image.fromarray(_blocks()), "JPEG", 6)
    ns = tmp_path / "ns"
    ns.mkdir()
    (ns / "a.jpg").write_bytes(rotated)
    meta = {"camera_angle_x": 0.7, "frames": [{"file_path": "a.jpg", "transform_matrix": np.eye(4).tolist()}]}
    (ns / "transforms.json").write_text(json.dumps(meta))
    scene = load_nerfstudio(str(ns / "transforms.json"))
    assert (scene.cameras[0].width, scene.cameras[0].height) == (16, 32)
    assert scene.load_image(0).shape == (32, 16, 3)

    seg = tmp_path / "seg"
    for sub in ("ego_pose", "extrinsics", "intrinsics", "images"):
        (seg / sub).mkdir(parents=True)
    np.savetxt(seg / "ego_pose" / "000.txt", np.eye(4))
    np.savetxt(seg / "extrinsics" / "front.txt", np.eye(4))
    np.savetxt(seg / "intrinsics" / "front.txt", [10.0, 10.0, 8.0, 16.0, 0, 0, 0, 0, 0])
    (seg / "images" / "000_front.jpg").write_bytes(rotated)
    scene = load_driving(str(seg))
    assert (scene.cameras[0].width, scene.cameras[0].height) == (16, 32)
    assert scene.load_image(0).shape == (32, 16, 3)


# --- float and 16-bit images are scaled, not clipped


def _tiff(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="TIFF")
    return buf.getvalue()


def test_float_tiff_in_0_1_is_scaled_to_0_255(tmp_path):
    values = np.array([[0.0, 0.25, 0.5], [1.0, 1.2, -0.1]], np.float32)  # a little over/undershoot is clipped
    path = tmp_path / "render.tif"
    path.write_bytes(_tiff(Image.fromarray(values)))
    assert Image.open(path).mode == "F"
    out = read_image(str(path))
    assert out.dtype == np.uint8 and out.shape == (2, 3, 3)
    np.testing.assert_array_equal(out[..., 0], [[0, 64, 128], [255, 255, 0]])
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_float_tiff_of_whole_numbers_in_0_255_is_8_bit_data():
    values = np.array([[0.0, 7.0, 128.0], [200.0, 254.0, 255.0]], np.float32)
    out = decode_image(_tiff(Image.fromarray(values)), "as-float.tif")
    np.testing.assert_array_equal(out[..., 2], values.astype(np.uint8))


@pytest.mark.parametrize("values, problem", [
    ([[0.2, np.nan]], r"hdr\.tif: float image holds NaN or infinite values \(1 of 2 samples\)"),
    ([[0.2, np.inf]], r"hdr\.tif: float image holds NaN or infinite values"),
    ([[0.2, 3.7]], r"hdr\.tif: float pixel values span 0\.2\.\.3\.7, not \[0, 1\].*tone-map"),  # HDR radiance
    ([[12.5, 100.25]], r"hdr\.tif: float pixel values span 12\.5\.\.100\.25"),  # not whole numbers: no guess
    ([[-1.0, 1.0]], r"hdr\.tif: float pixel values span -1\.\.1"),  # signed data (normals)
])
def test_float_values_without_a_display_mapping_name_the_file(values, problem):
    with pytest.raises(InputError, match=problem) as err:
        decode_image(_tiff(Image.fromarray(np.array(values, np.float32))), "hdr.tif")
    assert "cannot decode" not in str(err.value)


def test_float_rgb_tiff_pil_cannot_open_is_read_through_tifffile():
    tifffile = pytest.importorskip("tifffile")
    rgb = np.array([[[0.0, 0.5, 1.0], [0.25, 0.75, 1.25]]], np.float32)  # 1 x 2 pixels
    buf = io.BytesIO()
    tifffile.imwrite(buf, rgb, photometric="rgb", extratags=[(0x0112, "H", 1, 8, True)])  # orientation 8
    with pytest.raises(UnidentifiedImageError):
        Image.open(io.BytesIO(buf.getvalue()))  # why tifffile: PIL has no float RGB mode
    out = decode_image(buf.getvalue(), "rgb32f.tif")
    # stored [[a, b]] turned a quarter counter-clockwise: [[b], [a]]
    np.testing.assert_array_equal(out, [[[64, 191, 255]], [[0, 128, 255]]])
    assert image_size(buf.getvalue()) == (1, 2)


def test_without_tifffile_a_float_rgb_tiff_is_an_error_saying_so(monkeypatch):
    tifffile = pytest.importorskip("tifffile")
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.zeros((2, 2, 3), np.float32), photometric="rgb")
    monkeypatch.setitem(sys.modules, "tifffile", None)  # import tifffile now raises ImportError
    with pytest.raises(InputError, match=r"rgb32f\.tif: a TIFF that PIL cannot read.*tifffile.*not installed"):
        decode_image(buf.getvalue(), "rgb32f.tif")


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_16_bit_tiff_is_scaled_not_clipped(mode):
    gray = np.array([[0, 257, 32768], [65535, 1000, 12850]], np.uint16)
    image = Image.fromarray(gray)
    if mode != image.mode:
        image = Image.frombytes(mode, image.size, gray.astype(">u2").tobytes())
    data = _tiff(image)
    assert Image.open(io.BytesIO(data)).mode == mode
    out = decode_image(data, "gray16.tif")
    np.testing.assert_array_equal(out[..., 1], [[0, 1, 128], [255, 4, 50]])


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    gray = np.array([[0, 128, 32896], [65535, 64250, 12850]], np.uint16)  # 0, 0.5, 128, 255, 250, 50 times 257
    path = tmp_path / "depth16.png"
    Image.fromarray(gray).save(path)
    assert Image.open(path).mode in ("I;16", "I")
    out = read_image(str(path))
    np.testing.assert_array_equal(out[..., 0], [[0, 0, 128], [255, 250, 50]])


def test_32_bit_integer_values_outside_16_bit_are_an_error_naming_the_file():
    with pytest.raises(InputError, match=r"^i32\.tif: integer pixel values outside the 16-bit range \(0\.\.70000\)"):
        decode_image(_tiff(Image.fromarray(np.array([[0, 70000]], np.int32))), "i32.tif")


def test_tiff_files_count_as_images():
    assert ".tif" in IMAGE_EXTENSIONS and ".tiff" in IMAGE_EXTENSIONS


def test_transparent_pixels_are_composited_over_black_and_said_once(caplog, monkeypatch):
    import difix3d.imageio as imageio

    monkeypatch.setattr(imageio, "_warned_transparency", False)
    rgba = np.array([[[10, 20, 30, 255], [90, 90, 90, 0], [200, 100, 0, 128]]], dtype=np.uint8)
    with caplog.at_level("WARNING", logger="difix3d.imageio"):
        out = decode_image(_png(Image.fromarray(rgba, "RGBA")), "cutout.png")
        decode_image(_png(Image.fromarray(rgba, "RGBA")), "cutout2.png")
    a = 128 / 255
    np.testing.assert_array_equal(out[0], np.array([[10, 20, 30], [0, 0, 0], [round(200 * a), round(100 * a), 0]],
                                                   dtype=np.uint8))
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "cutout.png" in messages[0] and "over black" in messages[0]


def test_gray_with_alpha_and_premultiplied_tiffs_are_composited():
    la = Image.fromarray(np.array([[[200, 255], [200, 0]]], dtype=np.uint8), "LA")
    np.testing.assert_array_equal(decode_image(_png(la), "gray_alpha.png")[0], [[200] * 3, [0] * 3])
    tifffile = pytest.importorskip("tifffile")
    buf = io.BytesIO()  # 8-bit associated (premultiplied) alpha: PIL opens it; 100 at alpha 1/2 is 100 over black
    tifffile.imwrite(buf, np.array([[[200, 200, 200, 255], [100, 100, 100, 128]]], np.uint8), photometric="rgb",
                     extrasamples=["assocalpha"])
    np.testing.assert_allclose(decode_image(buf.getvalue(), "premultiplied.tif")[0].astype(int),
                               [[200] * 3, [100] * 3], atol=1)


def test_opaque_alpha_and_palette_transparency():
    opaque = np.dstack([np.full((2, 2, 3), 7, np.uint8), np.full((2, 2), 255, np.uint8)])
    np.testing.assert_array_equal(decode_image(_png(Image.fromarray(opaque, "RGBA")), "opaque.png"),
                                  np.full((2, 2, 3), 7, np.uint8))
    palette = Image.new("P", (2, 1))
    palette.putpalette([90, 90, 90, 50, 60, 70] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0  # palette index 0 is transparent
    out = decode_image(_png(palette), "palette.png")
    np.testing.assert_array_equal(out[0], np.array([[0, 0, 0], [50, 60, 70]], dtype=np.uint8))


@pytest.mark.parametrize("extra,fourth,expected", [("unassalpha", 0.5, [26, 64, 0]), ("assocalpha", 0.5, [51, 128, 0]),
                                                   ("unspecified", 7.5, [51, 128, 0])])
def test_tiff_extra_samples_read_through_tifffile(extra, fourth, expected):
    """Straight alpha scales the colour, associated (premultiplied) alpha already did, and an unspecified extra
    sample (here a depth of 7.5 m) is not alpha at all."""
    tifffile = pytest.importorskip("tifffile")
    rgba = np.array([[[0.0, 0.5, 0.0, 1.0 if fourth == 0.5 else fourth], [0.2, 0.5, 0.0, fourth]]], np.float32)
    buf = io.BytesIO()
    tifffile.imwrite(buf, rgba, photometric="rgb", extrasamples=[extra])
    out = decode_image(buf.getvalue(), "rgba32f.tif")
    np.testing.assert_array_equal(out[0, 0], [0, 128, 0])
    np.testing.assert_array_equal(out[0, 1], expected)
