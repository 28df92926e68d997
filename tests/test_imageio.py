import io

import numpy as np
import pytest
from PIL import Image

from difix3d.errors import InputError
from difix3d.imageio import decode_image, encode_image


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

