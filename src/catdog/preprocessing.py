"""Image decoding and preprocessing: the single home shared by prepare, training, evaluation and serving.

Depends on Pillow and NumPy only, so the prediction service can import it without torch.
Every input goes the same way: detect the format from the bytes, refuse decompression bombs before
decoding pixels, decode (JPEG draft mode when shrinking), apply the EXIF orientation, convert any mode
to 8-bit RGB, resize to the model's square input, and normalise to a CHW float32 array.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ResizePolicy = Literal["center_crop", "letterbox"]
ImageSource = bytes | bytearray | memoryview | str | Path | BinaryIO

SUPPORTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "GIF", "WEBP", "BMP", "TIFF"})
FORMAT_EXTENSIONS: dict[str, frozenset[str]] = {
    "JPEG": frozenset({".jpg", ".jpeg", ".jpe", ".jfif"}),
    "MPO": frozenset({".jpg", ".jpeg", ".mpo"}),
    "PNG": frozenset({".png"}),
    "GIF": frozenset({".gif"}),
    "WEBP": frozenset({".webp"}),
    "BMP": frozenset({".bmp", ".dib"}),
    "TIFF": frozenset({".tif", ".tiff"}),
}
DEFAULT_MAX_PIXELS = 50_000_000
EXIF_ORIENTATION = 0x0112
# Formats whose decoder can shrink while decoding (JPEG's DCT scaling; MPO is JPEG with extra frames).
DRAFT_FORMATS = frozenset({"JPEG", "MPO"})
BACKGROUND = (255, 255, 255)
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})


class ImageDecodeError(ValueError):
    """An input that cannot become a model input; `code` is stable and machine-readable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class PreprocessConfig:
    """Everything that turns an image into the model's input; stored in the exported model's metadata."""

    size: int = 224
    resize: ResizePolicy = "center_crop"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PreprocessConfig:
        raw = json.loads(text)
        return cls(
            size=int(raw["size"]),
            resize=raw["resize"],
            mean=tuple(float(v) for v in raw["mean"]),
            std=tuple(float(v) for v in raw["std"]),
        )


@dataclass(frozen=True)
class ImageInfo:
    """What the header says about an image, read without decoding its pixels."""

    format: str
    mode: str
    width: int
    height: int
    frames: int = 1
    issues: tuple[str, ...] = field(default_factory=tuple)

    @property
    def pixels(self) -> int:
        return self.width * self.height


def _as_stream(source: ImageSource) -> BinaryIO:
    if isinstance(source, bytes | bytearray | memoryview):
        if len(source) == 0:
            raise ImageDecodeError("empty", "the file is empty (0 bytes)")
        return io.BytesIO(bytes(source))
    if isinstance(source, str | Path):
        path = Path(source)
        if path.stat().st_size == 0:
            raise ImageDecodeError("empty", "the file is empty (0 bytes)")
        return path.open("rb")
    start = source.tell()
    if source.seek(0, io.SEEK_END) == start:
        raise ImageDecodeError("empty", "the file is empty (0 bytes)")
    source.seek(start)
    return source


def _reason(exc: BaseException) -> str:
    """An exception as a short phrase for an error message (its type when it has no text)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def _corrupt(exc: BaseException) -> ImageDecodeError:
    return ImageDecodeError("truncated", f"the image data is truncated or corrupt: {_reason(exc)}")


def open_image(source: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open lazily (header only), check the real format and the pixel count before any decoding."""
    stream = _as_stream(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(stream)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError("too_large", f"image dimensions exceed the limit: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError("not_an_image", "the content is not a recognised image format") from exc
    except MemoryError:
        raise
    except Exception as exc:
        # Pillow's format plugins raise whatever their parsers hit on a malformed header (OSError,
        # SyntaxError, ValueError, but also TypeError, IndexError, struct.error, ZeroDivisionError in
        # a fuzz of mutated TIFF and GIF files): all of them mean "not a readable image".
        raise ImageDecodeError("not_an_image", f"the image header cannot be read: {_reason(exc)}") from exc
    if img.format not in SUPPORTED_FORMATS:
        raise ImageDecodeError(
            "unsupported_format",
            f"{img.format} images are not supported (use one of {', '.join(sorted(SUPPORTED_FORMATS))})",
        )
    width, height = img.size
    if width * height > max_pixels:
        raise ImageDecodeError(
            "too_large",
            f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}",
        )
    return img


def mode_issues(img: Image.Image) -> tuple[str, ...]:
    """Convertible oddities of an image's mode: cmyk, grayscale, palette, 16bit, alpha, animated."""
    mode = img.mode
    issues: list[str] = []
    if mode == "CMYK":
        issues.append("cmyk")
    if mode in {"L", "LA", "1"} or mode in SIXTEEN_BIT_MODES or mode == "F":
        issues.append("grayscale")
    if mode in {"P", "PA"}:
        issues.append("palette")
    if mode in SIXTEEN_BIT_MODES or mode == "F":
        issues.append("16bit")
    if mode in {"RGBA", "LA", "PA", "RGBa", "La"} or "transparency" in img.info:
        issues.append("alpha")
    if getattr(img, "n_frames", 1) > 1 and img.format in {"GIF", "WEBP", "PNG"}:
        issues.append("animated")
    return tuple(issues)


def inspect(source: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Header facts of an image (format, mode, size, frames, convertible issues) without decoding pixels."""
    img = open_image(source, max_pixels=max_pixels)
    try:
        frames = int(getattr(img, "n_frames", 1))
        issues = mode_issues(img)
    except MemoryError:
        raise
    except Exception as exc:
        # Counting frames walks the file (GIF, TIFF, WebP): a corrupt frame table fails here.
        raise _corrupt(exc) from exc
    return ImageInfo(str(img.format), img.mode, img.width, img.height, frames, issues)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: alpha composited on white, 16-bit scaled down, CMYK converted."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in SIXTEEN_BIT_MODES:
        wide = np.asarray(img, dtype=np.uint32 if mode == "I" else np.uint16)
        img = Image.fromarray((np.clip(wide, 0, 65535) >> 8).astype(np.uint8))
        mode = "L"
    elif mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8))
        mode = "L"
    if mode == "P" and "transparency" in img.info:
        return _palette_on_white(img)
    if mode == "PA":
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in {"RGBA", "LA", "RGBa", "La"}:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _palette_on_white(img: Image.Image) -> Image.Image:
    """A palette image with transparency composited on white in the palette itself, then expanded to RGB.

    Every pixel of a palette image takes its entry's colour and alpha, so blending each entry with white
    gives the same picture as expanding to RGBA and compositing (P -> RGBA -> composite -> RGB held three
    full-size copies, 9 bytes a pixel: a 39 KB 6320x6320 PNG cost ~550 MB); this needs 5 (index copy + RGB).
    """
    palette = img.getpalette("RGB") or []
    colours = np.full((256, 3), 255, dtype=np.float32)
    known = np.asarray(palette, dtype=np.float32).reshape(-1, 3)[:256]
    colours[: len(known)] = known
    alpha = np.full(256, 255, dtype=np.float32)
    transparency = img.info["transparency"]
    if isinstance(transparency, bytes):
        values = np.frombuffer(transparency, dtype=np.uint8)[:256]
        alpha[: len(values)] = values
    elif isinstance(transparency, int) and 0 <= transparency < 256:
        alpha[transparency] = 0
    weight = (alpha / 255.0)[:, None]
    blended = colours * weight + np.asarray(BACKGROUND, dtype=np.float32) * (1 - weight)
    flat = img.copy()  # the caller's image keeps its palette
    flat.putpalette(np.clip(np.round(blended), 0, 255).astype(np.uint8).tobytes(), "RGB")
    flat.info.pop("transparency", None)
    return flat.convert("RGB")


# Bytes a pixel that decoding holds at its peak, by the mode the decoder produces. Pillow stores 1, L
# and P in 1 byte, I;16 in 2 and every other mode (RGB, LA included) in 4; the peak adds the largest
# full-size intermediate on the way to the model-sized RGB picture (the shrink happens in the decoded
# mode: RGBA/LA are premultiplied for the resize, one more copy; P expands to RGB; 1 becomes L) and
# about one byte of decoder and allocator slack. Measured peaks (growth of a fresh process's peak RSS
# over one 6320x6320 decode, bytes a pixel): P 5.1-6.0, RGBA/LA 8.1, RGB/CMYK/I/F 4.2, I;16 2.1, 1 2.0,
# lossless RGBA WebP 16.1 (the old path: 19-21 for P, RGBA, LA and WebP); tests/unit/test_decode_memory.py
# fails when a decode's peak exceeds its estimate.
PEAK_BYTES_PER_PIXEL: dict[str, int] = {
    "1": 3,
    "L": 2,
    "P": 7,
    "PA": 13,
    "LA": 9,
    "La": 9,
    "I;16": 3,
    "I;16B": 3,
    "I;16L": 3,
    "I;16N": 3,
    "I": 5,
    "F": 5,
    "RGB": 5,
    "YCbCr": 5,
    "LAB": 5,
    "HSV": 5,
    "RGBX": 5,
    "RGBA": 9,
    "RGBa": 9,
    "CMYK": 5,
}
UNKNOWN_MODE_BYTES_PER_PIXEL = 13
# Decoders that hold more than the image while decoding: libwebp decodes into its own buffers first.
DECODER_EXTRA_BYTES_PER_PIXEL: dict[str, int] = {"WEBP": 8}
# What any decode costs beyond its pixels (decoder state, the model-sized picture, headers).
DECODE_OVERHEAD_BYTES = 8 * 1024 * 1024


@dataclass
class DecodePlan:
    """An opened image (header read, pixels not decoded) and what decoding it will cost.

    `decode` is `plan_decode(...).run()`; the service plans first, reserves `cost_bytes` of its decode
    memory budget, then runs, so a small file that decodes to a huge picture is refused or waits before
    any pixel is allocated.
    """

    image: Image.Image
    size: int | None
    resize: ResizePolicy
    original_size: tuple[int, int]
    decoded_size: tuple[int, int]
    cost_bytes: int

    def run(self, min_side: int = 1) -> Image.Image:
        """Decode, turn upright, shrink in the decoded mode, then convert to 8-bit RGB."""
        img = self.image
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                img.load()
        except MemoryError:
            raise
        except Exception as exc:
            # As in open_image: any parser exception while decoding the pixels means corrupt data.
            raise _corrupt(exc) from exc
        img = _upright(img)
        if min(img.size) < min_side:
            raise ImageDecodeError(
                "too_small", f"image is {img.width}x{img.height}, below the minimum side of {min_side} pixels"
            )
        if self.size is None:
            return to_rgb(img)
        try:
            return resize_image(img, self.size, self.resize)
        except MemoryError:
            raise
        except Exception as exc:
            # A mode or palette that the header promised but the data does not hold.
            raise _corrupt(exc) from exc


def decode_cost(mode: str, image_format: str | None, width: int, height: int) -> int:
    """Peak bytes that decoding a `width`x`height` image of `mode` to the model's input holds."""
    per_pixel = PEAK_BYTES_PER_PIXEL.get(mode, UNKNOWN_MODE_BYTES_PER_PIXEL)
    per_pixel += DECODER_EXTRA_BYTES_PER_PIXEL.get(image_format or "", 0)
    return width * height * per_pixel + DECODE_OVERHEAD_BYTES


def plan_decode(
    source: ImageSource,
    *,
    size: int | None = None,
    resize: ResizePolicy = "center_crop",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> DecodePlan:
    """Open an image's header and work out the decode: JPEG draft size, and the peak memory it needs."""
    img = open_image(source, max_pixels=max_pixels)
    original = img.size
    if size is not None and img.format in DRAFT_FORMATS:
        try:
            img.draft(None, _draft_size(img.width, img.height, size, resize))
        except MemoryError:
            raise
        except Exception as exc:
            raise _corrupt(exc) from exc
    return DecodePlan(
        image=img,
        size=size,
        resize=resize,
        original_size=original,
        decoded_size=img.size,
        cost_bytes=decode_cost(img.mode, img.format, img.width, img.height) + _orientation_cost(img),
    )


def _orientation_cost(img: Image.Image) -> int:
    """Turning an image upright builds a transposed copy beside it (measured: a 5000x5000 RGB PNG with
    orientation 6 peaked at 190 MiB, 99 MiB without): one more stored image when the EXIF says so."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            orientation = img.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:
        return 0  # unreadable EXIF: _upright leaves the pixels as stored, no copy
    if orientation not in range(2, 9):
        return 0
    stored = 1 if img.mode in {"1", "L", "P"} else 2 if img.mode.startswith("I;16") else 4
    return img.width * img.height * stored


def _draft_size(width: int, height: int, size: int, policy: ResizePolicy) -> tuple[int, int]:
    """The smallest size the decoder may shrink to while the resize below still only shrinks."""
    scale = size / min(width, height) if policy == "center_crop" else size / max(width, height)
    return max(1, int(width * scale)), max(1, int(height * scale))


def decode(
    source: ImageSource,
    *,
    size: int | None = None,
    resize: ResizePolicy = "center_crop",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = 1,
) -> Image.Image:
    """Decode to an upright 8-bit RGB image, resized to `size`x`size` when `size` is given."""
    return plan_decode(source, size=size, resize=resize, max_pixels=max_pixels).run(min_side)


def _upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; a corrupt EXIF block leaves the pixels as stored."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # In place: without an orientation tag nothing is copied (the default copies the whole image).
            ImageOps.exif_transpose(img, in_place=True)
    except (OSError, SyntaxError, ValueError, TypeError, KeyError, ZeroDivisionError):
        pass
    return img


# Modes whose pixels Pillow resizes with the requested filter (it falls back to nearest neighbour for
# "1" and "P", so those become L/RGB first, at full size).
_RESIZABLE = frozenset(
    {"L", "LA", "La", "I", "F", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}
)
_RESIZABLE |= SIXTEEN_BIT_MODES


def resize_image(img: Image.Image, size: int, policy: ResizePolicy = "center_crop") -> Image.Image:
    """Square `size`x`size` RGB: shorter side to size then centre crop, or the whole image letterboxed.

    The shrink runs in the decoded mode and the conversion to RGB on the small picture, so no full-size
    RGB/RGBA copy is made (compositing alpha on white commutes with the premultiplied resize).
    """
    if policy not in ("center_crop", "letterbox"):
        raise ValueError(f"unknown resize policy {policy!r} (use center_crop or letterbox)")
    if img.mode not in _RESIZABLE:
        img = to_rgb(img) if img.mode in {"P", "PA"} else img.convert("L")
    if img.size != (size, size):
        method = Image.Resampling.BICUBIC
        if policy == "center_crop":
            img = ImageOps.fit(img, (size, size), method=method)
        else:
            img = ImageOps.contain(img, (size, size), method=method)
    rgb = to_rgb(img)
    if rgb.size != (size, size):
        rgb = ImageOps.pad(rgb, (size, size), method=Image.Resampling.BICUBIC, color=BACKGROUND)
    return rgb


def normalize(rgb: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """HWC uint8 RGB to the model's CHW float32 input."""
    std_ = np.asarray(std, dtype=np.float32)
    scale = (1.0 / (255.0 * std_))[:, None, None]
    offset = (-np.asarray(mean, dtype=np.float32) / std_)[:, None, None]
    chw = np.ascontiguousarray(rgb.transpose(2, 0, 1)).astype(np.float32)
    chw *= scale
    chw += offset
    return chw


def preprocess(
    source: ImageSource,
    config: PreprocessConfig,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    transform: Callable[[Image.Image], Image.Image] | None = None,
) -> np.ndarray:
    """Any image source to the model's CHW float32 input, exactly as in training.

    `transform` (a flip or crop for behavioural tests) acts on the decoded square picture, which is then
    brought back to the input size.
    """
    img = decode(source, size=config.size, resize=config.resize, max_pixels=max_pixels)
    if transform is not None:
        img = resize_image(transform(img), config.size, config.resize)
    return model_input(img, config)


def model_input(picture: Image.Image, config: PreprocessConfig) -> np.ndarray:
    """The model-sized RGB picture (from `decode` with the config's size) as the model's input."""
    return normalize(np.asarray(picture), config.mean, config.std)


def preprocess_batch(
    sources: Sequence[ImageSource],
    config: PreprocessConfig,
    transform: Callable[[Image.Image], Image.Image] | None = None,
) -> np.ndarray:
    """Several images to one (N, 3, size, size) float32 batch."""
    if not sources:
        return np.zeros((0, 3, config.size, config.size), dtype=np.float32)
    return np.stack([preprocess(source, config, transform=transform) for source in sources])


def extension_matches(path: Path, image_format: str) -> bool:
    """Whether a file's extension fits the format its bytes say it is."""
    return path.suffix.lower() in FORMAT_EXTENSIONS.get(image_format, frozenset())


def dhash(img: Image.Image) -> int:
    """64-bit difference hash (perceptual): near-identical pictures differ in only a few bits."""
    small = img.convert("L").resize((9, 8), Image.Resampling.BILINEAR)
    pixels = np.asarray(small, dtype=np.int16)
    bits = (pixels[:, 1:] > pixels[:, :-1]).flatten()
    return int(np.packbits(bits).view(">u8")[0])
