"""Generated images of every odd kind the pipeline and the service must handle (fresh bytes per call)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def photo(seed: int = 0, size: tuple[int, int] = (320, 240)) -> Image.Image:
    """A smooth random RGB picture; different seeds give perceptually different pictures."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def jpeg(seed: int = 0, size: tuple[int, int] = (320, 240), quality: int = 90) -> bytes:
    return encode(photo(seed, size), "JPEG", quality=quality)


def truncated_jpeg(seed: int = 0) -> bytes:
    """A real JPEG cut in half (its header is intact, its scan data is not)."""
    data = jpeg(seed, size=(640, 480))
    return data[: len(data) // 2]


def png(seed: int = 0) -> bytes:
    return encode(photo(seed), "PNG")


def cmyk_jpeg(seed: int = 0) -> bytes:
    return encode(photo(seed).convert("CMYK"), "JPEG", quality=90)


def grayscale_jpeg(seed: int = 0) -> bytes:
    return encode(photo(seed).convert("L"), "JPEG", quality=90)


def palette_png(seed: int = 0) -> bytes:
    return encode(photo(seed).convert("P", palette=Image.Palette.ADAPTIVE), "PNG")


def rgba_png(seed: int = 0) -> bytes:
    img = photo(seed).convert("RGBA")
    alpha = np.full((img.height, img.width), 255, dtype=np.uint8)
    alpha[:, : img.width // 2] = 0
    img.putalpha(Image.fromarray(alpha))
    return encode(img, "PNG")


def png16(seed: int = 0) -> bytes:
    """A 16-bit grayscale PNG (Pillow mode I;16)."""
    gray = np.asarray(photo(seed).convert("L"), dtype=np.uint16) * 257
    return encode(Image.fromarray(gray), "PNG")


def exif_rotated_jpeg(seed: int = 0) -> bytes:
    """A landscape 320x240 JPEG whose EXIF orientation (6) says: display it rotated to portrait."""
    img = photo(seed)
    exif = img.getexif()
    exif[0x0112] = 6
    return encode(img, "JPEG", quality=90, exif=exif.tobytes())


def animated_gif(seed: int = 0) -> bytes:
    frames = [photo(seed + i).convert("P", palette=Image.Palette.ADAPTIVE) for i in range(3)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def tiny_jpeg(seed: int = 0) -> bytes:
    return jpeg(seed, size=(12, 10))


def bomb_png(width: int = 40_000, height: int = 40_000) -> bytes:
    """A tiny PNG whose header claims `width`x`height` pixels (a decompression bomb)."""
    data = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    ihdr = 8  # the IHDR chunk follows the 8-byte signature: length(4) type(4) data(13) crc(4)
    data[ihdr + 8 : ihdr + 16] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr + 4 : ihdr + 21]))
    data[ihdr + 21 : ihdr + 25] = struct.pack(">I", crc)
    return bytes(data)


def random_bytes(n: int = 4096, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


TEXT = b"this is not an image, just some text\n" * 20
PDF = b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog >>\nendobj\ntrailer\n<< /Root 1 0 R >>\n%%EOF\n"
