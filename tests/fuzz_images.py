"""A deterministic fuzz corpus of images: tiny valid files of every accepted format, and mutations of them.

No network, no randomness beyond the seed given: the same (seed, index) always gives the same bytes, so a
failure is reproduced by its case name alone. The API is small on purpose (the service fuzz reuses it):

    from fuzz_images import cases, case, valid_images

    for name, data in cases(seed=0, budget=20.0):   # valid images, regressions, then mutations for 20 s
        ...
    name, data = case(0, 1234)                      # one mutated case again, e.g. from a failure's name
    valid_images(), regressions()                   # the fixed parts, as {name: bytes}

Case names read ``<source>`` for a valid image, ``<source>:cut@<length>`` for a regression and
``<seed>:<index>:<source>:<mutation>`` for a mutated one, where <source> is the name of the valid image
(``tiff-lzw-rgb``, ``gif-anim``...) and <mutation> the mutations applied in order (``bitflip``, ``truncate``,
``dup_chunk``, ``field``...).
"""

from __future__ import annotations

import io
import random
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from functools import cache

import numpy as np
from PIL import Image

__all__ = ["case", "cases", "mutate", "regressions", "valid_images"]

SIZE = (48, 40)  # above params.yaml's min_side (32), so a valid case is usable, yet only a few KB per file
# Values that parsers mishandle most: zero, one, sign boundaries, all bits set.
EXTREMES = (0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF)
MAGIC = {
    "jpeg": b"\xff\xd8\xff",
    "png": b"\x89PNG\r\n\x1a\n",
    "gif": b"GIF89a",
    "webp": b"RIFF\x00\x01\x00\x00WEBPVP8 ",
    "bmp": b"BM",
    "tiff": b"II*\x00",
    "tiff-be": b"MM\x00*",
}


def _picture(seed: int, mode: str = "RGB", size: tuple[int, int] = SIZE) -> Image.Image:
    """A smooth random picture (compresses like a photo, unlike noise) in the given mode."""
    coarse = np.random.default_rng(seed).integers(0, 256, size=(4, 5, 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)
    if mode == "I;16":
        return Image.fromarray(np.asarray(img.convert("L"), dtype=np.uint16) * 257)
    if mode == "P":
        return img.quantize(16)
    if mode in {"RGBA", "LA"}:
        alpha = np.full(size[::-1], 255, dtype=np.uint8)
        alpha[:, : size[0] // 3] = 0
        img = img.convert(mode)
        img.putalpha(Image.fromarray(alpha))
        return img
    return img.convert(mode)


def _encode(img: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _frames(mode: str, n: int = 3) -> list[Image.Image]:
    return [_picture(10 + i, mode) for i in range(n)]


def _rotated(seed: int, fmt: str, **options: object) -> bytes:
    """A picture whose EXIF orientation (6) says: rotate on display, so decode's exif_transpose has work."""
    img = _picture(seed)
    exif = img.getexif()
    exif[0x0112] = 6
    return _encode(img, fmt, exif=exif.tobytes(), **options)


def _mpo() -> bytes | None:
    """A two-picture MPO (a stereo camera's file), when this Pillow can write one."""
    try:
        return _encode(_picture(6), "MPO", save_all=True, append_images=[_picture(7)])
    except (KeyError, OSError, ValueError):
        return None


_VALID: dict[str, Callable[[], bytes | None]] = {
    "jpeg-rgb": lambda: _encode(_picture(0), "JPEG", quality=85),
    "jpeg-progressive": lambda: _encode(_picture(1), "JPEG", quality=85, progressive=True),
    "jpeg-gray": lambda: _encode(_picture(2, "L"), "JPEG", quality=85),
    "jpeg-cmyk": lambda: _encode(_picture(3, "CMYK"), "JPEG", quality=85),
    "jpeg-exif-rotated": lambda: _rotated(5, "JPEG", quality=85),
    "mpo": _mpo,
    "png-rgb": lambda: _encode(_picture(20), "PNG"),
    "png-rgba": lambda: _encode(_picture(21, "RGBA"), "PNG"),
    "png-palette-transparent": lambda: _encode(_picture(22, "P"), "PNG", transparency=0),
    "png-gray-alpha": lambda: _encode(_picture(23, "LA"), "PNG"),
    "png-16bit": lambda: _encode(_picture(24, "I;16"), "PNG"),
    "png-1bit": lambda: _encode(_picture(25, "1"), "PNG"),
    "png-interlaced": lambda: _encode(_picture(26), "PNG", interlace=True),
    "png-exif-rotated": lambda: _rotated(28, "PNG"),
    "png-anim": lambda: _encode(_picture(27), "PNG", save_all=True, append_images=_frames("RGB", 2)),
    "gif": lambda: _encode(_picture(30, "P"), "GIF"),
    "gif-anim": lambda: _encode(
        _picture(31, "P"),
        "GIF",
        save_all=True,
        append_images=_frames("P"),
        duration=50,
        loop=0,
        transparency=0,
    ),
    "gif-interlaced": lambda: _encode(_picture(32, "P"), "GIF", interlace=True),
    "webp-lossy": lambda: _encode(_picture(40), "WEBP", quality=60),
    "webp-lossless-rgba": lambda: _encode(_picture(41, "RGBA"), "WEBP", lossless=True),
    "webp-exif-rotated": lambda: _rotated(43, "WEBP", quality=60),
    "webp-anim": lambda: _encode(_picture(42), "WEBP", save_all=True, append_images=_frames("RGB", 2)),
    "bmp-rgb": lambda: _encode(_picture(50), "BMP"),
    "bmp-palette": lambda: _encode(_picture(51, "P"), "BMP"),
    "bmp-1bit": lambda: _encode(_picture(52, "1"), "BMP"),
    "bmp-gray": lambda: _encode(_picture(53, "L"), "BMP"),
    "tiff-raw-rgb": lambda: _encode(_picture(60), "TIFF"),
    "tiff-lzw-rgb": lambda: _encode(_picture(61), "TIFF", compression="tiff_lzw"),
    "tiff-deflate-rgba": lambda: _encode(_picture(62, "RGBA"), "TIFF", compression="tiff_adobe_deflate"),
    "tiff-packbits-palette": lambda: _encode(_picture(63, "P"), "TIFF", compression="packbits"),
    "tiff-jpeg": lambda: _encode(_picture(64), "TIFF", compression="jpeg"),
    "tiff-group4-1bit": lambda: _encode(_picture(65, "1"), "TIFF", compression="group4"),
    "tiff-lzw-cmyk": lambda: _encode(_picture(66, "CMYK"), "TIFF", compression="tiff_lzw"),
    "tiff-deflate-16bit": lambda: _encode(_picture(67, "I;16"), "TIFF", compression="tiff_adobe_deflate"),
    "tiff-float": lambda: _encode(_picture(68, "F"), "TIFF"),
    "tiff-ycbcr": lambda: _encode(_picture(69, "YCbCr"), "TIFF"),
    "tiff-exif-rotated": lambda: _encode(_picture(71), "TIFF", tiffinfo={0x0112: 6}),
    "tiff-multipage": lambda: _encode(_picture(70), "TIFF", save_all=True, append_images=_frames("L", 2)),
}


@cache
def _valid() -> tuple[tuple[str, bytes], ...]:
    made = ((name, make()) for name, make in _VALID.items())
    return tuple((name, data) for name, data in made if data is not None)


def valid_images() -> dict[str, bytes]:
    """Tiny valid images (name -> bytes) of every accepted format and the modes it can hold; MPO only when
    this Pillow can write it."""
    return dict(_valid())


# ---- structure: where a format keeps its chunks and header fields ----
Span = tuple[int, int]  # [start, end) of a chunk
Field = tuple[int, int, str]  # offset, width in bytes (1, 2 or 4), byte order ("<" or ">")


def _png_chunks(data: bytes) -> list[Span]:
    spans, pos = [], 8
    while pos + 12 <= len(data):
        length = struct.unpack(">I", data[pos : pos + 4])[0]
        end = pos + 12 + length
        if end > len(data):
            break
        spans.append((pos, end))
        pos = end
    return spans


def _jpeg_segments(data: bytes) -> list[Span]:
    spans, pos = [], 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xDA or 0xD0 <= marker <= 0xD9:  # scan data follows: no more length-prefixed segments
            break
        end = pos + 2 + struct.unpack(">H", data[pos + 2 : pos + 4])[0]
        spans.append((pos, min(end, len(data))))
        pos = end
    return spans


def _riff_chunks(data: bytes) -> list[Span]:
    spans, pos = [], 12
    while pos + 8 <= len(data):
        length = struct.unpack("<I", data[pos + 4 : pos + 8])[0]
        end = pos + 8 + length + (length & 1)
        spans.append((pos, min(end, len(data))))
        pos = end
    return spans


def _tiff_ifds(data: bytes) -> list[Span]:
    """Each IFD (image file directory: one per page) of a TIFF, from its entry count to its next-IFD link."""
    order = "<" if data[:2] == b"II" else ">"
    spans: list[Span] = []
    offset = struct.unpack(order + "I", data[4:8])[0]
    while 8 <= offset < len(data) - 2 and offset not in {start for start, _ in spans}:
        end = offset + 2 + 12 * struct.unpack(order + "H", data[offset : offset + 2])[0] + 4
        spans.append((offset, end))
        if end > len(data):  # cut short: no link to a next IFD
            break
        offset = struct.unpack(order + "I", data[end - 4 : end])[0]
    return spans


def _tiff_fields(data: bytes) -> list[Field]:
    """Every IFD's entry count, its entries' tag, type, count and value/offset fields, and its next link."""
    order = "<" if data[:2] == b"II" else ">"
    fields: list[Field] = [(4, 4, order)]
    for start, end in _tiff_ifds(data):
        fields.append((start, 2, order))
        for entry in range(start + 2, min(end - 4, len(data) - 12), 12):
            fields += [
                (entry, 2, order),  # the tag: another meaning for the same value
                (entry + 2, 2, order),
                (entry + 4, 4, order),
                (entry + 8, 4, order),
                (entry + 8, 2, order),
            ]
        fields.append((end - 4, 4, order))
    return fields


def _gif_fields(data: bytes) -> list[Field]:
    """Screen size and flags, each image descriptor's position, size and flags, each block's length."""
    fields: list[Field] = [(6, 2, "<"), (8, 2, "<"), (10, 1, "<"), (11, 1, "<")]
    for pos in range(13, len(data) - 10):
        if data[pos] == 0x2C:  # image separator (may also match inside pixel data: fine for a fuzz)
            fields += [
                (pos + 1, 2, "<"),
                (pos + 3, 2, "<"),
                (pos + 5, 2, "<"),
                (pos + 7, 2, "<"),
                (pos + 9, 1, "<"),
            ]
        elif data[pos] == 0x21:  # extension introducer: label, block size
            fields += [(pos + 1, 1, "<"), (pos + 2, 1, "<")]
    return fields


def _bmp_fields(data: bytes) -> list[Field]:
    """File size, pixel offset, header size, width, height, planes, depth, compression, sizes, colours."""
    return [
        (2, 4, "<"),
        (10, 4, "<"),
        (14, 4, "<"),
        (18, 4, "<"),
        (22, 4, "<"),
        (26, 2, "<"),
        (28, 2, "<"),
    ] + [(at, 4, "<") for at in (30, 34, 46, 50)]


def _fields(data: bytes) -> list[Field]:
    """Header fields worth overwriting with extreme values, found by parsing the format's structure."""
    try:
        return _parse_fields(data)
    except (struct.error, IndexError):  # an earlier mutation broke the structure: no field known
        return []


def _parse_fields(data: bytes) -> list[Field]:
    if data[:2] in (b"II", b"MM"):
        return _tiff_fields(data)
    if data[:3] == b"GIF":
        return _gif_fields(data)
    if data[:2] == b"BM":
        return _bmp_fields(data)
    if data[:8] == MAGIC["png"]:
        # chunk lengths; IHDR: width, height, depth, colour type, compression, filter, interlace
        return [(start, 4, ">") for start, _ in _png_chunks(data)] + [
            (16, 4, ">"),
            (20, 4, ">"),
            *((at, 1, ">") for at in range(24, 29)),
        ]
    if data[:2] == b"\xff\xd8":
        fields: list[Field] = []
        for start, end in _jpeg_segments(data):
            fields.append((start + 2, 2, ">"))
            if data[start + 1] in (0xC0, 0xC1, 0xC2):  # SOF: precision, height, width, components, sampling
                fields += [(start + 4, 1, ">"), (start + 5, 2, ">"), (start + 7, 2, ">"), (start + 9, 1, ">")]
                fields += [(at, 1, ">") for at in range(start + 10, end)]
        return fields
    if data[:4] == b"RIFF":
        return (
            [(4, 4, "<")]
            + [(start + 4, 4, "<") for start, _ in _riff_chunks(data)]
            + [
                (at, 1, "<")
                for at in range(20, min(40, len(data)))  # VP8X flags and canvas, VP8/VP8L headers
            ]
        )
    return [(at, 4, "<") for at in range(0, min(64, len(data) - 4), 4)]


def _chunks(data: bytes) -> list[Span]:
    """The format's chunks or segments (PNG, JPEG, RIFF), as far as they still parse."""
    try:
        return _parse_chunks(data)
    except (struct.error, IndexError):
        return []


def _parse_chunks(data: bytes) -> list[Span]:
    if data[:8] == MAGIC["png"]:
        return _png_chunks(data)
    if data[:2] == b"\xff\xd8":
        return _jpeg_segments(data)
    if data[:4] == b"RIFF":
        return _riff_chunks(data)
    return []


def _fix_png_crcs(data: bytearray) -> bytearray:
    """Recompute every chunk's CRC, so the mutation reaches the parser instead of Pillow's checksum test."""
    for start, end in _png_chunks(bytes(data)):
        data[end - 4 : end] = struct.pack(">I", zlib.crc32(bytes(data[start + 4 : end - 4])))
    return data


# ---- mutations ----
def _offset(rng: random.Random, data: bytearray) -> int:
    """A random position, half the time within the first 256 bytes where the headers are."""
    limit = len(data) if rng.random() < 0.5 else min(len(data), 256)
    return rng.randrange(max(limit, 1))


def _bitflip(rng: random.Random, data: bytearray) -> bytearray:
    for _ in range(rng.choice((1, 1, 2, 4, 8))):
        data[_offset(rng, data)] ^= 1 << rng.randrange(8)
    return data


def _byteset(rng: random.Random, data: bytearray) -> bytearray:
    for _ in range(rng.randint(1, 4)):
        data[_offset(rng, data)] = rng.choice((0x00, 0x01, 0x7F, 0x80, 0xFE, 0xFF))
    return data


def _truncate(rng: random.Random, data: bytearray) -> bytearray:
    return data[: rng.randrange(1, len(data))] if len(data) > 1 else data


def _dup_chunk(rng: random.Random, data: bytearray) -> bytearray:
    """Repeat a chunk (PNG), segment (JPEG) or RIFF chunk, else any byte range, in place or elsewhere."""
    spans = _chunks(bytes(data))
    if spans:
        start, end = rng.choice(spans)
    else:
        start = _offset(rng, data)
        end = start + rng.randint(1, 64)
    piece = data[start:end]
    at = end if rng.random() < 0.5 else _offset(rng, data)
    return data[:at] + piece * rng.choice((1, 1, 2, 16)) + data[at:]


def _drop_range(rng: random.Random, data: bytearray) -> bytearray:
    spans = _chunks(bytes(data))
    if spans and rng.random() < 0.5:
        start, end = rng.choice(spans)
    else:
        start = _offset(rng, data)
        end = start + rng.randint(1, 64)
    return data[:start] + data[end:]


def _field(rng: random.Random, data: bytearray) -> bytearray:
    """Overwrite a header field (a size, count, offset, type or flag) with an extreme value."""
    fields = [f for f in _fields(bytes(data)) if f[0] + f[1] <= len(data)]
    if not fields:
        return _byteset(rng, data)
    at, width, order = rng.choice(fields)
    value = rng.choice(EXTREMES) & ((1 << (8 * width)) - 1)
    if rng.random() < 0.3:  # near the old value: off by one, doubled
        old = int.from_bytes(data[at : at + width], "little" if order == "<" else "big")
        value = rng.choice((old + 1, old - 1, old * 2, old // 2)) % (1 << (8 * width))
    data[at : at + width] = value.to_bytes(width, "little" if order == "<" else "big")
    return data


def _magic_tail(rng: random.Random, data: bytearray) -> bytearray:
    """A synthetic file: a format's signature (or the source's first bytes) followed by random bytes."""
    head = data[: rng.randint(2, 32)] if rng.random() < 0.5 else bytearray(rng.choice(list(MAGIC.values())))
    return head + bytearray(rng.randbytes(rng.choice((0, 4, 16, 64, 512))))


MUTATIONS: dict[str, Callable[[random.Random, bytearray], bytearray]] = {
    "bitflip": _bitflip,
    "byteset": _byteset,
    "truncate": _truncate,
    "dup_chunk": _dup_chunk,
    "drop_range": _drop_range,
    "field": _field,
    "magic_tail": _magic_tail,
}
# Header-aware mutations get a larger share: they get past the signature checks and into the parsers.
_WEIGHTS = {
    "bitflip": 3,
    "byteset": 2,
    "truncate": 2,
    "dup_chunk": 2,
    "drop_range": 1,
    "field": 5,
    "magic_tail": 1,
}


def mutate(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    """Apply one to three random mutations; returns their names joined by '+' and the mutated bytes."""
    out, names = bytearray(data), []
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        name = rng.choices(list(_WEIGHTS), weights=list(_WEIGHTS.values()))[0]
        out = MUTATIONS[name](rng, out)
        names.append(name)
        if not out:  # dropped or cut to nothing: an empty file is a case too
            break
    if out[:8] == MAGIC["png"] and rng.random() < 0.8:
        out = _fix_png_crcs(out)
    return "+".join(names), bytes(out)


def case(seed: int, index: int) -> tuple[str, bytes]:
    """The index-th mutated case of a seed; depends on nothing else, so any failure replays on its own."""
    rng = random.Random(f"catdog-fuzz/{seed}/{index}")  # a str seed is hashed with SHA-512: stable everywhere
    source, data = rng.choice(_valid())
    mutation, mutated = mutate(data, rng)
    return f"{seed}:{index}:{source}:{mutation}", mutated


@cache
def _regressions() -> tuple[tuple[str, bytes], ...]:
    made = []
    gif, tiff = valid_images()["gif-anim"], valid_images()["tiff-multipage"]
    # every graphic control extension (one per frame), every IFD and the tag data after it
    for source, data, starts in (
        ("gif-anim", gif, [at for at in range(13, len(gif) - 1) if gif[at : at + 2] == b"\x21\xf9"]),
        ("tiff-multipage", tiff, [at for span in _tiff_ifds(tiff) for at in span]),
    ):
        cuts = sorted({cut for start in starts for cut in range(start, min(start + 40, len(data)))})
        made += [(f"{source}:cut@{cut}", data[:cut]) for cut in cuts]
    return tuple(made)


def regressions() -> dict[str, bytes]:
    """Files that made Pillow raise TypeError, IndexError and struct.error past the old decode guards (issue
    14): an animated GIF and a multi-page TIFF cut at each of the 40 bytes from each frame's header on."""
    return dict(_regressions())


def cases(seed: int = 0, budget: float = 20.0, limit: int | None = None) -> Iterator[tuple[str, bytes]]:
    """Every valid image and every regression once, then mutated cases 0, 1, 2... of `seed` until `budget`
    seconds have passed since the first was asked for (the consumer's time counts) or `limit` mutated cases
    were given.

    The order is fixed by the seed: a longer budget yields a longer prefix of the same sequence.
    """
    started = time.monotonic()
    yield from _valid()
    yield from _regressions()
    index = 0
    while (limit is None or index < limit) and time.monotonic() - started < budget:
        yield case(seed, index)
        index += 1
