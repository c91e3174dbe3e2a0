"""Safe image decoding and conversion: the bad-input policy shared by ingest and the shard stage.

Every image that enters the project goes through :func:`decode`, once at ingest (so unusable files never
reach data/raw) and again when sharding (users can drop files into data/raw by hand). Both use the same
checks, so a file that passed ingest also passes the shard stage.

What happens to an image:
- refused (:class:`BadImage`, with a one-line reason): empty file, not an image (unrecognised or with a
  misleading extension), truncated or corrupt data, a decompression bomb (more pixels than
  ``data.max_image_pixels``, checked from the header before any pixel is decoded), a float image (mode F,
  no unambiguous 8-bit meaning), a file name with control characters;
- converted to ``data.image_mode`` (L or RGB), and the conversion is named in :attr:`Decoded.conversion`:
  CMYK and other colour spaces -> RGB; 16-bit grey (I;16*, I) scaled to 8 bits (v * 255 / 65535, rounded,
  not clipped as Pillow's own convert would do); palette images expanded; alpha (RGBA, LA, PA, palette or
  grey/RGB with a tRNS transparent colour) composited on white, because the datasets we target draw dark
  objects on light or natural backgrounds and a black fill would invent edges; EXIF orientation applied;
  animated images use their first frame.

Policy (``data.on_bad_image``): ``skip`` lists the file with its reason and carries on; ``fail`` stops at the first
one with a one-line :class:`~stages.workspace.common.DataError` and nothing is written (see :class:`BadImagePolicy`).
"""

from __future__ import annotations

import hashlib
import io
import struct
import unicodedata
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .common import DataError

# Extensions that are treated as images (anything else in a source tree is ignored, and counted).
IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm"}
)
# Shard image formats (shard.image_format) and the Pillow format names they correspond to.
SHARD_FORMATS = {"png": "PNG", "jpg": "JPEG"}

# No single image file we accept is larger (a 25-megapixel 16-bit RGBA TIFF is 200 MB): bigger files are refused
# before their bytes are read.
MAX_FILE_BYTES = 256 * 1024 * 1024

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_EXIF_ORIENTATION = 0x0112


class BadImage(Exception):
    """An unusable image; ``str(exc)`` is the one-line reason."""


@dataclass
class Decoded:
    """An image decoded and converted to the requested mode."""

    image: Image.Image  # in the requested mode, fully loaded
    source_format: str | None  # Pillow's format name of the file (PNG, JPEG, ...)
    source_mode: str  # Pillow's mode of the file
    source_size: tuple[int, int]  # (width, height) of the file
    conversion: str | None = None  # what was done to reach the requested mode (None: pixels used as stored)


def is_image_name(name: str) -> bool:
    dot = name.rfind(".")
    return dot > 0 and name[dot:].lower() in IMAGE_EXTENSIONS


def normalise_name(name: str) -> str:
    """NFC form of a file or folder name (macOS writes NFD): same bytes, same DVC hash, on every system.

    Spaces and any printable unicode are kept; control characters are refused.
    """
    if any(unicodedata.category(ch) == "Cc" for ch in name):
        raise BadImage(f"file name contains control characters ({name!r})")
    return unicodedata.normalize("NFC", name)


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit (or 32-bit integer) grey -> 8-bit L by rescaling the full range, not clipping."""
    arr = np.asarray(img)
    if img.mode == "I" and arr.size and int(arr.max()) <= 255 and int(arr.min()) >= 0:
        return Image.fromarray(arr.astype(np.uint8), mode="L")  # an 8-bit image stored as 32-bit ints
    wide = np.clip(arr.astype(np.int64), 0, 65535)
    return Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), mode="L")


def _on_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _convert(img: Image.Image, mode: str) -> tuple[Image.Image, str | None]:
    """Bring a loaded image to ``mode`` (L or RGB); returns the image and a note of what was done."""
    src = img.mode
    notes: list[str] = []
    has_transparency = "transparency" in img.info
    if src == "F":
        raise BadImage("32-bit float image (mode F): no unambiguous 8-bit conversion")
    if src in _SIXTEEN_BIT_MODES:
        img = _to_8bit(img)
        notes.append(f"{src} scaled to 8 bits")
    elif src in _ALPHA_MODES or (src in ("P", "L", "RGB", "1") and has_transparency):
        img = _on_white(img)
        notes.append(f"{src} alpha composited on white")
    elif src not in ("L", "RGB"):
        img = img.convert("RGB")  # CMYK, YCbCr, LAB, HSV, P, 1 ...
        notes.append(f"{src} -> RGB")
    if img.mode != mode:
        img = img.convert(mode)
        notes.append(f"-> {mode}")
    return img, (" ".join(notes) if notes else None)


def decode(data: bytes, *, mode: str, max_pixels: int, resize: int | None = None) -> Decoded:
    """Decode image bytes fully and convert them to ``mode``; raise :class:`BadImage` when unusable.

    ``resize``: when set, scale the shorter side to it and centre-crop a square (shard.image_size).
    """
    if not data:
        raise BadImage("empty file (0 bytes)")
    # The configured limit is the process's limit: Pillow then refuses bombs itself while parsing headers too.
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                raise BadImage(
                    f"decompression bomb: {width}x{height} = {width * height} pixels exceeds "
                    f"data.max_image_pixels = {max_pixels}"
                )
            if width < 1 or height < 1:
                raise BadImage(f"image has no pixels ({width}x{height})")
            source_format, source_mode = img.format, img.mode
            img.seek(0)
            img.load()
            orientation = (
                img.getexif().get(_EXIF_ORIENTATION, 1) if source_format in ("JPEG", "TIFF", "WEBP", "PNG") else 1
            )
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage("not an image (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImage(f"decompression bomb: more pixels than data.max_image_pixels = {max_pixels} ({exc})") from None
    except Exception as exc:  # Pillow's decoders raise many types (OSError, SyntaxError, ValueError, ...)
        text = str(exc) or type(exc).__name__
        if "truncated" in text.lower() or isinstance(exc, (EOFError, struct.error)):
            raise BadImage(f"truncated or corrupt image data ({text})") from None
        raise BadImage(f"cannot decode image ({type(exc).__name__}: {text})") from None

    notes = []
    if getattr(img, "n_frames", 1) > 1:
        notes.append("first frame of an animation")
    if orientation not in (1, None):
        img = ImageOps.exif_transpose(img)
        notes.append("EXIF orientation applied")
    img, conversion = _convert(img, mode)
    if conversion:
        notes.append(conversion)
    if resize and img.size != (resize, resize):
        img = ImageOps.fit(img, (resize, resize), method=Image.Resampling.BICUBIC)
        notes.append(f"resized to {resize}x{resize}")
    return Decoded(img, source_format, source_mode, (width, height), "; ".join(notes) or None)


def encode(img: Image.Image, fmt: str, jpeg_quality: int = 95) -> bytes:
    """Encode for a shard: ``png`` (lossless, fast zlib level) or ``jpg``."""
    out = io.BytesIO()
    if fmt == "png":
        img.save(out, format="PNG", compress_level=1)
    elif fmt == "jpg":
        img.save(out, format="JPEG", quality=jpeg_quality)
    else:
        raise ValueError(f"unknown image format {fmt!r}")
    return out.getvalue()


def encode_png_stored(pixels: np.ndarray) -> bytes:
    """8-bit grey (HxW) or RGB (HxWx3) pixels as a PNG whose deflate stream uses stored (uncompressed) blocks.

    The bytes depend only on the pixels, not on the zlib build (zlib, zlib-ng and their versions compress
    differently even at level 0), which is what makes a materialised dataset hash the same on every machine.
    """
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    if pixels.ndim == 2:
        colour_type = 0
    elif pixels.ndim == 3 and pixels.shape[2] == 3:
        colour_type = 2
    else:
        raise ValueError(f"expected HxW or HxWx3 pixels, got shape {pixels.shape}")
    height, width = pixels.shape[:2]
    raw = b"".join(b"\x00" + row.tobytes() for row in pixels)  # filter type 0 (None) per scanline
    blocks = [raw[i : i + 65535] for i in range(0, len(raw), 65535)] or [b""]
    deflate = b"".join(
        struct.pack("<BHH", 1 if i == len(blocks) - 1 else 0, len(b), len(b) ^ 0xFFFF) + b for i, b in enumerate(blocks)
    )
    idat = b"\x78\x01" + deflate + struct.pack(">I", zlib.adler32(raw))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _loader_reads(data: bytes, channels: int, size: tuple[int, int]) -> bool:
    """Whether the training loader's decoder reads these bytes as the expected image (else we re-encode)."""
    from ssl_models.data import decode_image_bytes

    try:
        tensor = decode_image_bytes(data, None)
    except RuntimeError:
        return False
    return tuple(tensor.shape) == (channels, size[1], size[0])


@dataclass(frozen=True)
class PrepareForShard:
    """Read, check and encode one raw image (runs in the worker processes); picklable settings only."""

    raw: str
    mode: str
    channels: int
    max_pixels: int
    resize: int | None
    fmt: str
    jpeg_quality: int

    def __call__(self, rel: str) -> dict[str, Any]:
        data = (Path(self.raw) / rel).read_bytes()
        out: dict[str, Any] = {"md5": hashlib.md5(data).hexdigest()}
        try:
            decoded = decode(data, mode=self.mode, max_pixels=self.max_pixels, resize=self.resize)
        except BadImage as bad:
            out["bad"] = str(bad)
            return out
        image = decoded.image
        out.update(source_size=decoded.source_size, size=image.size, conversion=decoded.conversion)
        if (
            decoded.conversion is None
            and decoded.source_format == SHARD_FORMATS[self.fmt]
            and _loader_reads(data, self.channels, image.size)
        ):
            out["payload"], out["kept"] = data, True  # already what the loader reads: no JPEG re-encoding loss
        else:
            out["payload"], out["kept"] = encode(image, self.fmt, self.jpeg_quality), False
        return out


@dataclass
class BadImagePolicy:
    """Applies ``data.on_bad_image``: collect (skip) or stop at the first bad file (fail)."""

    on_bad_image: str  # "skip" | "fail"
    skipped: list[dict[str, Any]] = field(default_factory=list)

    def bad(self, path: str, reason: str) -> None:
        if self.on_bad_image == "fail":
            raise DataError(f"{path}: {reason} (data.on_bad_image is 'fail'; set it to 'skip' to leave such files out)")
        self.skipped.append({"path": path, "reason": reason})
