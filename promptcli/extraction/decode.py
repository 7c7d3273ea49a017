"""Decode an image file into 8-bit RGB, faithfully for every PIL mode, or refuse it.

PIL's ``convert("RGB")`` clips 16-bit and 32-bit grey (``I;16``, ``I``) and float (``F``) images
to white and drops transparency onto black, so each mode is converted by an explicit rule
(documented in docs/formats.md):

* ``1``, ``L``, ``P`` (no transparency), ``RGB``, ``RGBX``, ``YCbCr``, ``HSV``: PIL's conversion.
* ``I;16``, ``I;16L``, ``I;16B``, ``I;16N``: 16-bit grey, ``round(v / 257)`` (65535 -> 255).
* ``I`` (32-bit integer grey; 16-bit PNG/PGM/TIFF decode to it): taken as 16-bit when every value
  lies in 0..65535 (``round(v / 257)``), refused otherwise.
* ``F`` (float grey): values all in [0, 1] are scaled by 255; else values all in [0, 255] are kept;
  anything else (negative, above 255, NaN/inf) is refused.
* ``LA``, ``La``, ``PA``, ``RGBA``, ``RGBa``, and ``L``/``P``/``RGB`` with a transparency entry
  (PNG tRNS): alpha-composited onto a white background.
* ``CMYK``: ``(255 - C)(255 - K) / 255`` per channel (PIL's conversion; no ICC colour management).
* Any other mode (``LAB``, ...) is refused.

Images with more pixels than ``max_pixels`` are refused before their pixels are decoded
(a decompression-bomb guard; PIL's own warning and error are replaced by this check).
"""

from __future__ import annotations

import struct
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

# PIL's own default limit (about 89.5 megapixels: 1024 x 1024 x 1024 // 4 // 3).
DEFAULT_MAX_PIXELS = 89_478_485
BACKGROUND = (255, 255, 255)  # what transparent pixels are composited onto
BOMB = "decompression-bomb guard"

_PIL_RGB = ("1", "L", "P", "RGB", "RGBX", "YCbCr", "HSV")
_ALPHA = ("LA", "La", "PA", "RGBA", "RGBa")
_GREY16 = ("I;16", "I;16L", "I;16B", "I;16N")


class DecodeError(ValueError):
    """An image that cannot be turned into RGB faithfully (the message says why)."""


# Everything decode_rgb raises for a damaged or unsupported file: PIL's plugins report a broken chunk or
# header with SyntaxError (PNG), missing data with EOFError or struct.error, bad tables with IndexError,
# KeyError or TypeError, an unsupported variant with NotImplementedError (BLP); unreadable files are OSError.
DECODE_ERRORS: tuple[type[Exception], ...] = (
    OSError,  # also UnidentifiedImageError
    ValueError,  # also DecodeError
    SyntaxError,
    EOFError,
    struct.error,
    IndexError,
    KeyError,
    TypeError,
    ZeroDivisionError,
    NotImplementedError,
    Image.DecompressionBombError,
)


def decode_failure(exc: BaseException) -> str:
    """Why an image could not be read, from one of :data:`DECODE_ERRORS`, for messages and skip lists."""
    if isinstance(exc, UnidentifiedImageError):
        return "not a readable image"
    return str(exc) or type(exc).__name__


def _grey(values: np.ndarray) -> Image.Image:
    grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(grey), mode="L").convert("RGB")


def _float_to_rgb(values: np.ndarray) -> Image.Image:
    if not np.isfinite(values).all():
        raise DecodeError("float image holds NaN or inf values")
    low, high = float(values.min()), float(values.max())
    if low >= 0.0 and high <= 1.0:
        return _grey(values * 255.0)
    if low >= 0.0 and high <= 255.0:
        return _grey(values)
    raise DecodeError(f"float image values span [{low:g}, {high:g}], neither [0, 1] nor [0, 255]")


def to_rgb(img: Image.Image) -> Image.Image:
    """The RGB image of ``img`` by the rules of this module's docstring; DecodeError when refused."""
    mode = img.mode
    if mode in ("L", "P", "RGB") and "transparency" in img.info:  # a tRNS colour or palette alpha
        mode, img = "RGBA", img.convert("RGBA")
    if mode in _ALPHA:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in _PIL_RGB or mode == "CMYK":
        return img.convert("RGB")
    if mode in _GREY16:
        return _grey(np.asarray(img, dtype=np.float64) / 257.0)
    if mode == "I":
        values = np.asarray(img, dtype=np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise DecodeError(
                f"32-bit integer image with values in [{values.min()}, {values.max()}]: "
                "only 16-bit values (0..65535) are decoded"
            )
        return _grey(values / 257.0)
    if mode == "F":
        return _float_to_rgb(np.asarray(img, dtype=np.float64))
    raise DecodeError(f"image mode {mode} is not supported; convert it to RGB first")


def check_pixels(img: Image.Image, max_pixels: int) -> None:
    """Refuse an image larger than ``max_pixels`` (checked on the header, before decoding)."""
    width, height = img.size
    if width * height > max_pixels:
        raise DecodeError(f"{width}x{height} = {width * height} pixels is over the {max_pixels}-pixel {BOMB}")


def decode_rgb(path: str | Path | BinaryIO, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open, size-check, decode and convert one image file (a path, or a binary file open at its start) to RGB.

    Raises DecodeError (refused mode or size), or one of :data:`DECODE_ERRORS` (PIL's) for files that are
    not readable images.
    """
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # check_pixels below replaces PIL's warning and its 2x-limit error
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                check_pixels(img, max_pixels)
                img.load()
                return to_rgb(img)
    finally:
        Image.MAX_IMAGE_PIXELS = saved
