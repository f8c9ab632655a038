"""Image files -> uint8 pixel arrays of one size and channel count: the one place images are decoded and resized.

Resampling (``image_size``): the shorter side is scaled to ``image_size`` and the centre square cropped. While
the image is at least twice the target, it is halved with a box filter (each output pixel the mean of the 2x2
input pixels it covers: exact area averaging, so no aliasing and no ringing); the remaining factor (< 2) is
bicubic. This is the recipe of the ImageNet 64x64 diffusion literature (box halvings, then one bicubic step)
and close to the box resize of the downsampled ImageNet itself; a single bicubic step from a large image
would either alias (without antialiasing) or blur more (PIL widens the kernel by the whole factor).
Enlarging (a source smaller than the target) is bicubic.

Channels: ``1`` converts with PIL's ``L`` (ITU-R 601-2 luma), ``3`` with ``RGB`` (grey repeated, an alpha
channel dropped, a palette expanded). Images must be 8-bit: the levels are 0..255.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from lightning_flows.data.cache import DataSourceError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
# PIL modes of 8-bit images, and whether they are grey.
_GREY_MODES = {"1", "L", "LA"}
_COLOUR_MODES = {"P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}


class ImageDecodeError(DataSourceError):
    """A file that is not a readable 8-bit image (names the file)."""


def is_image_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def header(data: bytes, name: str) -> tuple[int, int, bool]:
    """``(width, height, is_grey)`` read from the header of the encoded image ``data`` (not decoded)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            mode, size = image.mode, image.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageDecodeError(f"{name} is not a readable image ({type(err).__name__}: {err}); remove or "
                               f"replace it.") from None
    return size[0], size[1], _is_grey(mode, name)


def _is_grey(mode: str, name: str) -> bool:
    if mode in _GREY_MODES:
        return True
    if mode in _COLOUR_MODES:
        return False
    raise ImageDecodeError(f"{name} has PIL mode {mode!r}, not 8-bit grey or colour (e.g. a 16-bit PNG); "
                           f"convert it to 8 bits per channel.")


def resize_shorter_side_and_crop(image, size: int):
    """A PIL image -> ``size x size``: shorter side to ``size`` (box halvings, then bicubic), centre crop."""
    from PIL import Image

    while min(image.size) >= 2 * size:
        image = image.resize((image.size[0] // 2, image.size[1] // 2), resample=Image.Resampling.BOX)
    scale = size / min(image.size)
    if scale != 1:
        target = (max(size, round(image.size[0] * scale)), max(size, round(image.size[1] * scale)))
        image = image.resize(target, resample=Image.Resampling.BICUBIC)
    left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def centre_crop(image, size: int):
    """The centre ``size x size`` square of a PIL image (CelebA's face crop)."""
    left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def to_array(image, channels: int, size: int | None, crop: int | None = None) -> np.ndarray:
    """A PIL image -> ``(channels, H, W)`` uint8; ``crop`` first (a centre square), then ``size`` (see module)."""
    image = image.convert("L" if channels == 1 else "RGB")
    if crop is not None:
        image = centre_crop(image, crop)
    if size is not None:
        image = resize_shorter_side_and_crop(image, size)
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def decode(data: bytes, name: str, channels: int, size: int | None, crop: int | None = None) -> np.ndarray:
    """Encoded image bytes -> ``(channels, H, W)`` uint8 (see :func:`to_array`); a clear error naming ``name``
    for a file that cannot be decoded (e.g. truncated)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            _is_grey(image.mode, name)
            image.load()
            return to_array(image, channels, size, crop)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        if isinstance(err, ImageDecodeError):
            raise
        raise ImageDecodeError(f"{name} cannot be decoded ({type(err).__name__}: {err}); remove or replace "
                               f"it.") from None


def array_to_image(array: np.ndarray):
    """``(C, H, W)`` uint8 with C in (1, 3) -> a PIL image (to resize or convert an array's example)."""
    from PIL import Image

    return Image.fromarray(array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0))
