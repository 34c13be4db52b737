"""Small files that decode to huge pictures: the worst case of every accepted format and mode.

Each is a few KB to a few hundred KB on disk and 40 million pixels once decoded (the service's default
MAX_IMAGE_PIXELS), the shape of the uploads that took the service past 1.7 GB before decodes were
budgeted. Used by the decode-memory test, the abuse suite over HTTP, the container barrage and the
benchmark. Generated on demand (a few seconds each), never committed.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from functools import cache

from PIL import Image

SIDE = 6320  # 6320^2 = 39.9 M pixels, just under the 40 M default pixel cap


def _save(img: Image.Image, image_format: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def _palette(side: int, transparent: bool) -> Image.Image:
    img = Image.new("P", (side, side), 0)
    img.putpalette([0, 0, 0, 200, 120, 40] + [0] * (256 * 3 - 6))
    img.paste(1, (0, 0, side // 2, side // 2))
    if transparent:
        img.info["transparency"] = 0
    return img


def _orientation_6() -> bytes:
    """EXIF saying "turn 90 degrees": making the picture upright builds a transposed copy."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return exif.tobytes()


def _uniform(mode: str, side: int, value: object) -> Image.Image:
    return Image.new(mode, (side, side), value)  # type: ignore[arg-type]


MAKERS: dict[str, Callable[[int], bytes]] = {
    "png_palette_transparent": lambda s: _save(_palette(s, True), "PNG", optimize=True),
    "png_palette": lambda s: _save(_palette(s, False), "PNG", optimize=True),
    "png_rgba": lambda s: _save(_uniform("RGBA", s, (10, 200, 30, 128)), "PNG"),
    "png_la": lambda s: _save(_uniform("LA", s, (90, 128)), "PNG"),
    "png_gray16": lambda s: _save(_uniform("I;16", s, 40000), "PNG"),
    "png_bilevel": lambda s: _save(_uniform("1", s, 1), "PNG"),
    "png_rgb": lambda s: _save(_uniform("RGB", s, (10, 200, 30)), "PNG"),
    "png_rgb_rotated": lambda s: _save(_uniform("RGB", s, (10, 200, 30)), "PNG", exif=_orientation_6()),
    "tiff_gray16_rotated": lambda s: _save(
        _uniform("I;16", s, 40000), "TIFF", compression="tiff_adobe_deflate", tiffinfo={0x0112: 6}
    ),
    "gif_palette": lambda s: _save(_palette(s, True), "GIF"),
    "tiff_rgba_deflate": lambda s: _save(
        _uniform("RGBA", s, (10, 200, 30, 255)), "TIFF", compression="tiff_adobe_deflate"
    ),
    "tiff_int32_deflate": lambda s: _save(_uniform("I", s, 40000), "TIFF", compression="tiff_adobe_deflate"),
    "tiff_float_deflate": lambda s: _save(_uniform("F", s, 120.5), "TIFF", compression="tiff_adobe_deflate"),
    "tiff_cmyk_lzw": lambda s: _save(_uniform("CMYK", s, (0, 80, 200, 10)), "TIFF", compression="tiff_lzw"),
    "webp_rgba_lossless": lambda s: _save(_uniform("RGBA", s, (10, 200, 30, 128)), "WEBP", lossless=True),
    "jpeg_rgb": lambda s: _save(_uniform("RGB", s, (10, 200, 30)), "JPEG", quality=50),
    "jpeg_cmyk": lambda s: _save(_uniform("CMYK", s, (0, 80, 200, 10)), "JPEG", quality=50),
}


@cache
def worst(name: str, side: int = SIDE) -> bytes:
    """The bytes of one worst-case file (cached for the process)."""
    return MAKERS[name](side)
