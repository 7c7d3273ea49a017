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
* ``LA``, ``La``, ``PA``, ``RGBA``, ``RGBa``, and ``P`` with a transparency entry (PNG tRNS, GIF):
  alpha-composited onto a white background.
* ``1``, ``L``, ``I;16``, ``I`` and ``RGB`` with a transparent colour (PNG tRNS): the pixels equal to it, compared at
  the file's own bit depth (a 2-bit grey PNG's tRNS value 1 is the grey PIL reads as 85), become the background.
  A 16-bit RGB PNG with a transparent colour is refused: PIL reads it at 8 bits, so which pixels match is lost.
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
# KeyError or TypeError, an unsupported variant with NotImplementedError (BLP), a damaged AVIF with RuntimeError
# ("Failed to decode image"); unreadable files are OSError.
DECODE_ERRORS: tuple[type[Exception], ...] = (
    OSError,  # also UnidentifiedImageError
    ValueError,  # also DecodeError
    RuntimeError,  # also NotImplementedError
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


# The value PIL gives a grey PNG pixel whose raw sample is 1, by the file's raw mode (low bit depths are scaled up).
_GREY_STEP = {"L;2": 85, "L;4": 17}
_KEYED = ("1", "L", "I", "RGB", *_GREY16)


def _colour_key_to_rgb(img: Image.Image, rawmode: str | None) -> Image.Image:
    """``img`` (a mode of ``_KEYED``) with a transparent colour: the pixels equal to it become the background.

    PIL's own conversion compares the key with the decoded values, which for low-bit grey (scaled up) and 16-bit
    grey or RGB (the key left at 16 bits) are on another scale, so the transparency was lost or hit other pixels.
    """
    key = img.info["transparency"]
    if rawmode is not None and ";16" in rawmode and img.mode == "RGB":
        raise DecodeError(
            "16-bit RGB PNG with a transparent colour (tRNS): it is read at 8 bits, so which pixels are "
            "transparent is lost; save it as RGBA (or without the tRNS chunk)"
        )
    plain = img.copy()
    plain.info.pop("transparency", None)
    if img.mode == "RGB":
        if not (isinstance(key, tuple) and len(key) == 3):
            raise DecodeError(f"RGB image with a transparency entry {key!r} that is no colour")
        mask = (np.asarray(img) == np.array(key)).all(axis=-1)
    else:
        if not isinstance(key, int):
            raise DecodeError(f"grey image with a transparency entry {key!r} that is no grey value")
        values = np.asarray(img.convert("L") if img.mode == "1" else img, dtype=np.int64)
        mask = values == key * _GREY_STEP.get(rawmode or "", 1)  # mode 1: PIL gives the key as 0 or 255
    rgb = np.array(to_rgb(plain))
    rgb[mask] = BACKGROUND
    return Image.fromarray(rgb, mode="RGB")


def to_rgb(img: Image.Image, rawmode: str | None = None) -> Image.Image:
    """The RGB image of ``img`` by the rules of this module's docstring; DecodeError when refused.

    ``rawmode``: how the file stores its pixels (a PNG's ``L;2``, ``RGB;16B``, ...), read before decoding; it sets
    the scale of a transparent colour.
    """
    mode = img.mode
    if "transparency" in img.info and mode in _KEYED:  # a tRNS colour
        return _colour_key_to_rgb(img, rawmode)
    if mode == "P" and "transparency" in img.info:  # palette alpha
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
                rawmode = getattr(getattr(img, "png", None), "im_rawmode", None)  # gone once loaded
                img.load()
                return to_rgb(img, rawmode)
    finally:
        Image.MAX_IMAGE_PIXELS = saved
