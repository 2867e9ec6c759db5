"""Reading images and masks from disk, strictly and in one place.

Every reader fully decodes the file here (`Image.load()`), so a corrupt or truncated file fails at
the line that names it instead of deep inside a DataLoader worker. Images come back as 8-bit RGB
whatever their mode on disk (grayscale, palette, alpha, 16-bit); masks come back as 8-bit "L"
holding only 0 and 255, because every downstream consumer wants "defect or not".
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from patchcore.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_MAX_16 = 65535


def is_image_file(path: Path) -> bool:
    """True for a visible file whose extension (any case) is one of IMAGE_EXTENSIONS."""
    return (path.is_file() and not path.name.startswith(".")
            and path.suffix.lower() in IMAGE_EXTENSIONS)


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside `folder`, sorted by name (deterministic across machines)."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if is_image_file(p)), key=lambda p: p.name)


def _open_loaded(path: Path, what: str) -> Image.Image:
    """Open and fully decode `path`; any failure becomes one DataError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} file not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()  # decode now: truncated data raises here, not in a worker later
        return img  # leaving `with` closes the file only; the decoded pixels stay
    except Image.DecompressionBombError as exc:
        raise DataError(f"{what} {path} is too large to decode safely ({exc})") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{what} {path} is corrupt or truncated ({exc}): re-export or remove "
                        f"this file") from exc


def _sixteen_to_eight(values: np.ndarray, path: Path, what: str) -> np.ndarray:
    """Scale 0..65535 to 0..255 with rounding (v*255/65535), so 16-bit copies of 8-bit images
    keep their pixel values; clipping (what PIL's convert does) would saturate almost all."""
    values = values.astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > _MAX_16):
        raise DataError(f"{what} {path} has pixel values outside 0..65535 "
                        f"({values.min()}..{values.max()}): save it as 8- or 16-bit")
    return ((values * 255 + _MAX_16 // 2) // _MAX_16).astype(np.uint8)


def _to_rgb_array(img: Image.Image, path: Path) -> np.ndarray:
    """Any PIL mode -> (H, W, 3) uint8. Alpha is dropped, not composited."""
    mode = img.mode
    if mode in _SIXTEEN_BIT_MODES:
        gray = _sixteen_to_eight(np.asarray(img), path, "image")  # (H, W)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "F":
        raise DataError(f"image {path} holds 32-bit float pixels, which have no fixed scale: "
                        f"save it as an 8- or 16-bit PNG")
    if mode in ("LA", "La"):
        gray = np.asarray(img)[:, :, 0]  # (H, W)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "PA":
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "RGBa", "RGBX"):
        return np.ascontiguousarray(np.asarray(img)[:, :, :3])
    array = np.asarray(img if mode == "RGB" else img.convert("RGB"))
    if array.dtype == np.uint16:  # a 48-bit RGB a future PIL may hand over as is
        return _sixteen_to_eight(array, path, "image")
    return array


def read_image(path: Path) -> Image.Image:
    """Read an image as 8-bit RGB.

    Grayscale (L, 1, P) is replicated to three channels; RGBA/LA lose their alpha (dropped, not
    composited on black, so an opaque RGBA equals its RGB); 16-bit grayscale is scaled by
    255/65535 with rounding. PIL itself reduces 48-bit RGB PNGs to their high byte, which is
    within 1 of that scaling.
    """
    path = Path(path)
    img = _open_loaded(path, "image")
    if img.mode == "RGB":
        return img
    return Image.fromarray(_to_rgb_array(img, path), "RGB")


def decode_image(data: bytes, name: str, formats: Sequence[str] | None = None,
                 max_pixels: int | None = None) -> Image.Image:
    """Decode an image held in memory (an upload) exactly as `read_image` reads a file.

    `name` is what error messages call it (the upload's file name); `formats` limits the PIL
    decoders tried (e.g. ("PNG", "JPEG")), so bytes in an exotic format are refused rather than
    handed to a rarely used parser; `max_pixels` refuses an image larger than W*H from its header,
    before its pixels are decoded (a small compressed file can expand to gigabytes).
    """
    try:
        with Image.open(io.BytesIO(data), formats=None if formats is None else list(formats)) as img:
            width, height = img.size
            if max_pixels is not None and width * height > max_pixels:
                raise DataError(f"image {name} is {width}x{height} pixels, more than the "
                                f"{max_pixels} allowed: downscale it first")
            img.load()
    except Image.DecompressionBombError as exc:
        raise DataError(f"image {name} is too large to decode safely ({exc})") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"image {name} is not a readable image or is truncated ({exc})") from exc
    if img.mode == "RGB":
        return img
    return Image.fromarray(_to_rgb_array(img, Path(name)), "RGB")


def _nonzero(img: Image.Image) -> np.ndarray:
    """(H, W) bool: where any colour channel of `img` is nonzero (alpha ignored)."""
    mode = img.mode
    if mode in ("P", "PA"):
        img, mode = img.convert("RGB"), "RGB"
    array = np.asarray(img)
    if array.ndim == 2:
        return array != 0
    channels = 1 if mode in ("LA", "La") else 3
    return np.any(array[:, :, :channels] != 0, axis=2)


def _check_size(mask: Image.Image, path: Path, expected_size: tuple[int, int] | None,
                image: Path | None) -> None:
    if expected_size is None or tuple(mask.size) == tuple(expected_size):
        return
    owner = f"its image {image}" if image is not None else "its image"
    raise DataError(f"mask {path} is {mask.size[0]}x{mask.size[1]} (WxH) but {owner} is "
                    f"{expected_size[0]}x{expected_size[1]}: masks must have their image's size")


def read_mask(path: Path, expected_size: tuple[int, int] | None = None,
              image: Path | None = None) -> Image.Image:
    """Read a ground-truth mask as mode "L" with values 0/255 (any nonzero pixel is defect).

    `expected_size` is the image's (W, H); a mask of another size raises DataError naming the
    mask (and `image`, when given) and both sizes, since resizing would silently misplace it.
    Works for 1-bit, 8-bit, palette, RGB(A) and 16-bit masks (AutoVI's region masks are RGB).
    """
    path = Path(path)
    img = _open_loaded(path, "mask")
    _check_size(img, path, expected_size, image)
    return Image.fromarray(_nonzero(img).astype(np.uint8) * 255, "L")


def read_array(path: Path, what: str = "mask") -> np.ndarray:
    """The decoded pixel values as stored, (H, W) or (H, W, C), for readers that need the values
    themselves (AutoVI region masks encode their defect type as a pixel value)."""
    return np.asarray(_open_loaded(Path(path), what))


def union_mask(paths: Sequence[Path], size: tuple[int, int],
               image: Path | None = None) -> Image.Image:
    """Union (logical OR) of several region masks, as one "L" 0/255 mask of `size` = (W, H).

    AutoVI stores one PNG per defect region; MVTec AD one per image. No paths: all zeros.
    """
    width, height = size
    union = np.zeros((height, width), dtype=bool)  # (H, W)
    for path in paths:
        union |= np.asarray(read_mask(path, expected_size=size, image=image)) > 0
    return Image.fromarray(union.astype(np.uint8) * 255, "L")


def image_size(path: Path) -> tuple[int, int]:
    """(W, H) from the file header only; cheap, for layout checks that need no pixels."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            return img.size
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"image {path} cannot be opened ({exc})") from exc
