"""Opening web images safely, and turning any decodable one into RGB (docs/bad_input.md).

Ingest decides each image's verdict once (``verdict``); training and evaluation decode the
good ones with ``open_rgb``. Both refuse an image whose header claims more than ``max_pixels``
pixels before any pixel is decoded: a 20,000 x 20,000 PNG of zeros is a few kB on disk and
1.2 GB once decoded (a decompression bomb). Leaf module: Pillow and numpy only.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

# Pillow's own default limit (``Image.MAX_IMAGE_PIXELS``): about 9,459 x 9,459.
DEFAULT_MAX_PIXELS = 89_478_485
# Modes with more than 8 bits per channel. Pillow's convert("RGB") clips them at 255 instead
# of scaling, which turns a 16-bit photo white; ``to_rgb`` scales them to 8 bits first.
_WIDE_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535}


class ImageTooLarge(ValueError):
    """An image whose header claims more pixels than allowed (refused before decoding)."""


def _open(data: bytes, max_pixels: int | None) -> Image.Image:
    """The image of ``data``, header read, pixels not yet decoded (raises like Pillow). With
    ``max_pixels`` None only Pillow's own guard applies (an error at twice its limit)."""
    with warnings.catch_warnings():     # our limit decides, not Pillow's warning
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:   # Pillow's hard stop at 2x its own limit
            raise ImageTooLarge(str(e)) from None
    width, height = im.size
    if max_pixels is not None and width * height > max_pixels:
        im.close()
        raise ImageTooLarge(f"{width} x {height} pixels is over the limit of {max_pixels:,} "
                            "(data.max_image_pixels)")
    return im


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit RGB: CMYK, grayscale, palette (a GIF's first frame), alpha
    (dropped), and 16-bit grayscale scaled to 8 bits rather than clipped."""
    if im.mode in _WIDE_MODES:
        a = np.asarray(im, dtype=np.int64)
        im = Image.fromarray((np.clip(a, 0, 65535) // 257).astype(np.uint8))
    elif im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        span = a.max() - a.min()
        im = Image.fromarray(((a - a.min()) / (span or 1) * 255).astype(np.uint8))
    return im if im.mode == "RGB" else im.convert("RGB")


def open_rgb(data: bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode ``data`` (any format Pillow reads; an animated image's first frame) as RGB.
    Training passes None: ingest already refused what its ``data.max_image_pixels`` forbids."""
    im = _open(data, max_pixels)    # in-memory bytes: nothing to close
    im.load()
    return to_rgb(im)


def verdict(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[str, str, str]:
    """(skip reason or "", detail, mode) for one encoded image, decoding every pixel once.

    Reasons: ``empty_image`` (zero bytes), ``not_an_image`` (no format Pillow knows),
    ``image_too_large`` (over ``max_pixels``, refused from its header), ``corrupt_image``
    (identified but does not decode: a truncated JPEG, a broken PNG). The detail says what a
    good image is ("PNG L 32x32") or why a bad one failed; the mode is a good image's Pillow
    mode ("RGB", "CMYK", "I;16", "P"...), "" for a bad one.
    """
    if len(data) == 0:
        return "empty_image", "zero bytes", ""
    try:
        im = _open(data, max_pixels)
    except ImageTooLarge as e:
        return "image_too_large", str(e), ""
    except UnidentifiedImageError:
        return "not_an_image", f"{len(data):,} bytes Pillow does not recognise ({data[:8]!r}...)", ""
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError... for broken headers
        return "corrupt_image", f"{type(e).__name__}: {e}"[:200], ""
    try:
        with im:
            im.load()
            return "", f"{im.format} {im.mode} {im.size[0]}x{im.size[1]}", im.mode
    except Exception as e:  # a truncated file fails here: Pillow must load every pixel
        return "corrupt_image", f"{type(e).__name__}: {e}"[:200], ""
