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
    return source


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
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError("not_an_image", f"the image header cannot be read: {exc}") from exc
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
    return ImageInfo(
        format=str(img.format),
        mode=img.mode,
        width=img.width,
        height=img.height,
        frames=int(getattr(img, "n_frames", 1)),
        issues=mode_issues(img),
    )


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
    if mode == "P" or mode == "PA":
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in {"RGBA", "LA", "RGBa", "La"}:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


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
    img = open_image(source, max_pixels=max_pixels)
    if size is not None and img.format == "JPEG":
        img.draft(None, _draft_size(img.width, img.height, size, resize))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageDecodeError("truncated", f"the image data is truncated or corrupt: {exc}") from exc
    img = _upright(img)
    if min(img.size) < min_side:
        raise ImageDecodeError(
            "too_small", f"image is {img.width}x{img.height}, below the minimum side of {min_side} pixels"
        )
    img = to_rgb(img)
    if size is not None:
        img = resize_image(img, size, resize)
    return img


def _upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; a corrupt EXIF block leaves the pixels as stored."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ImageOps.exif_transpose(img)
    except (OSError, SyntaxError, ValueError, TypeError, KeyError, ZeroDivisionError):
        return img


def resize_image(img: Image.Image, size: int, policy: ResizePolicy = "center_crop") -> Image.Image:
    """Square `size`x`size`: shorter side to size then centre crop, or the whole image letterboxed."""
    if img.size == (size, size):
        return img
    if policy == "center_crop":
        return ImageOps.fit(img, (size, size), method=Image.Resampling.BICUBIC)
    if policy == "letterbox":
        return ImageOps.pad(img, (size, size), method=Image.Resampling.BICUBIC, color=BACKGROUND)
    raise ValueError(f"unknown resize policy {policy!r} (use center_crop or letterbox)")


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
    return normalize(np.asarray(img), config.mean, config.std)


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
