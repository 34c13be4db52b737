"""The shared preprocessing module on generated images of every odd kind."""

from __future__ import annotations

import io

import numpy as np
import odd_images
import pytest
from PIL import Image

from catdog import preprocessing as pp

CONFIG = pp.PreprocessConfig(size=64, resize="center_crop", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


@pytest.mark.parametrize(
    ("make", "code"),
    [
        (lambda: b"", "empty"),
        (odd_images.truncated_jpeg, "truncated"),
        (lambda: odd_images.TEXT, "not_an_image"),
        (lambda: odd_images.PDF, "not_an_image"),
        (odd_images.random_bytes, "not_an_image"),
        (odd_images.bomb_png, "too_large"),
    ],
    ids=["empty", "truncated", "text", "pdf", "random", "bomb"],
)
def test_unusable_inputs_raise_a_coded_error(make, code):
    with pytest.raises(pp.ImageDecodeError) as info:
        pp.preprocess(make(), CONFIG)
    assert info.value.code == code
    assert info.value.message


@pytest.mark.parametrize(
    ("make", "issues"),
    [
        (odd_images.jpeg, ()),
        (odd_images.png, ()),
        (odd_images.cmyk_jpeg, ("cmyk",)),
        (odd_images.grayscale_jpeg, ("grayscale",)),
        (odd_images.palette_png, ("palette",)),
        (odd_images.rgba_png, ("alpha",)),
        (odd_images.png16, ("grayscale", "16bit")),
        (odd_images.animated_gif, ("palette", "animated")),
    ],
    ids=["jpeg", "png", "cmyk", "gray", "palette", "rgba", "png16", "gif"],
)
def test_convertible_modes_become_normalised_rgb(make, issues):
    data = make()
    assert pp.inspect(data).issues == issues
    tensor = pp.preprocess(data, CONFIG)
    assert tensor.shape == (3, 64, 64)
    assert tensor.dtype == np.float32
    assert tensor.min() >= -1.0 and tensor.max() <= 1.0
    assert tensor.std() > 0.01, "the picture's content must survive the conversion"


@pytest.mark.parametrize("fmt", ["WEBP", "BMP", "TIFF"])
def test_other_real_formats_are_detected_from_bytes(fmt):
    data = odd_images.encode(odd_images.photo(3), fmt)
    assert pp.inspect(data).format == fmt
    assert pp.preprocess(data, CONFIG).shape == (3, 64, 64)


def test_png_named_jpg_is_detected_by_content(tmp_path):
    path = tmp_path / "cat.jpg"
    path.write_bytes(odd_images.png())
    info = pp.inspect(path)
    assert info.format == "PNG"
    assert not pp.extension_matches(path, info.format)
    assert pp.extension_matches(tmp_path / "x.JPEG", "JPEG")


def test_exif_orientation_is_applied():
    img = pp.decode(odd_images.exif_rotated_jpeg())
    assert img.size == (240, 320), "orientation 6 turns a 320x240 landscape into a portrait"


def test_alpha_is_composited_on_white():
    img = pp.decode(odd_images.rgba_png())
    left = np.asarray(img)[:, : img.width // 2 - 2]
    assert (left == 255).all(), "fully transparent pixels become the white background"


def test_sixteen_bit_values_are_scaled_not_clipped():
    img = pp.decode(odd_images.png16(seed=4))
    reference = np.asarray(odd_images.photo(4).convert("L"))
    assert np.abs(np.asarray(img)[..., 0].astype(int) - reference).max() <= 1


def test_bomb_is_rejected_before_decoding_pixels():
    data = odd_images.bomb_png(40_000, 40_000)
    assert len(data) < 200
    with pytest.raises(pp.ImageDecodeError, match="1600000000 pixels"):
        pp.open_image(data, max_pixels=50_000_000)
    assert pp.inspect(odd_images.bomb_png(100, 100), max_pixels=50_000_000).pixels == 10_000


def test_too_small_respects_min_side():
    with pytest.raises(pp.ImageDecodeError) as info:
        pp.decode(odd_images.tiny_jpeg(), min_side=32)
    assert info.value.code == "too_small"
    assert pp.decode(odd_images.tiny_jpeg(), min_side=8).size == (12, 10)


@pytest.mark.parametrize("size", [(400, 200), (200, 400), (64, 64), (50, 30)])
@pytest.mark.parametrize("policy", ["center_crop", "letterbox"])
def test_resize_policies_give_exact_squares(size, policy):
    img = pp.decode(odd_images.jpeg(1, size=size), size=64, resize=policy)
    assert img.size == (64, 64)
    assert img.mode == "RGB"


def test_letterbox_keeps_the_whole_picture_with_white_bars():
    img = np.asarray(pp.decode(odd_images.jpeg(1, size=(400, 200)), size=64, resize="letterbox"))
    assert (img[:10] >= 250).all() and (img[-10:] >= 250).all()
    assert img[20:44].std() > 1


def test_draft_mode_matches_a_full_decode_closely():
    data = odd_images.jpeg(2, size=(1600, 1200), quality=95)
    fast = np.asarray(pp.decode(data, size=224), dtype=np.float32)
    full = np.asarray(pp.resize_image(Image.open(io.BytesIO(data)).convert("RGB"), 224), dtype=np.float32)
    assert np.abs(fast - full).mean() < 2.0


def test_normalize_is_chw_and_uses_mean_and_std():
    rgb = np.zeros((2, 3, 3), dtype=np.uint8)
    rgb[..., 0] = 255
    out = pp.normalize(rgb, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))
    assert out.shape == (3, 2, 3)
    np.testing.assert_allclose(out[0], 1.0)
    np.testing.assert_allclose(out[1], -1.0)
    np.testing.assert_allclose(out[2], 0.0)


def test_preprocess_is_deterministic_and_config_round_trips():
    data = odd_images.jpeg(5)
    np.testing.assert_array_equal(pp.preprocess(data, CONFIG), pp.preprocess(data, CONFIG))
    assert pp.PreprocessConfig.from_json(CONFIG.to_json()) == CONFIG


def test_dhash_is_stable_under_reencoding_and_differs_between_pictures():
    base = pp.dhash(pp.decode(odd_images.jpeg(7, quality=95)))
    recoded = pp.dhash(pp.decode(odd_images.jpeg(7, size=(300, 225), quality=60)))
    other = pp.dhash(pp.decode(odd_images.jpeg(8)))
    assert bin(base ^ recoded).count("1") <= 4
    assert bin(base ^ other).count("1") > 10


def test_unsupported_format_is_refused():
    data = odd_images.encode(odd_images.photo(1), "PPM")
    with pytest.raises(pp.ImageDecodeError) as info:
        pp.decode(data)
    assert info.value.code == "unsupported_format"
