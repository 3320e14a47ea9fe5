"""Reading images and the official input conventions.

Images are BGR uint8 (as `cv2.imread` returns them, 3 channels even for greyscale files),
scaled to [0, 1] and normalised per channel with the BGR-ordered ImageNet statistics below.
Queries of the revisited benchmarks are cropped `im[int(y1):int(y2), int(x1):int(x2)]`
with `bbx = (x1, y1, x2, y2)`, as the official test code does.

Every image is read upright, as a browser shows it: the EXIF orientation (1-8, e.g. every
portrait phone photo) is applied, so sizes and boxes are those of the upright image. And
at a working size: an image whose long side exceeds `max_side()` (DEFAULT_MAX_SIDE, 1024
px; 0 = full size) is reduced to it (JPEGs decoded reduced by libjpeg where that still
leaves at least the working size, then OpenCV INTER_AREA), so memory per image is bounded
whatever the file's size. The revisited Oxford and Paris images (and R1M's) are at most
1024 px on the long side, so they are read unchanged.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import os
import re
import threading
import warnings

import cv2
import numpy as np

from scvnet_jax.errors import InputError

MEAN_BGR = np.array([0.406, 0.456, 0.485], np.float32)
STD_BGR = np.array([0.225, 0.224, 0.229], np.float32)


def normalize(image_bgr: np.ndarray) -> np.ndarray:
    """uint8 (or 0-255 float) BGR image(s) (..., H, W, 3) -> normalised float32, as the
    official `_prepare_im`: float32(im) / 255, minus mean, divided by std."""
    im = np.asarray(image_bgr)
    if im.shape[-1:] != (3,):
        raise InputError(f"expected BGR images with 3 channels last, got shape {im.shape}")
    if im.dtype == np.uint8 and im.ndim == 3 and im.size:
        # a table of the 256 x 3 values this arithmetic gives, looked up by OpenCV: the
        # same float32 numbers bit for bit, ~20x faster than the three array passes
        return cv2.LUT(np.ascontiguousarray(im), _normalized_values())
    im = im.astype(np.float32) / np.float32(255.0)
    return (im - MEAN_BGR) / STD_BGR


@functools.lru_cache(maxsize=None)
def _normalized_values() -> np.ndarray:
    """(1, 256, 3) float32: `normalize` of every uint8 value in every BGR channel."""
    v = np.arange(256, dtype=np.float32)[None, :, None].repeat(3, axis=2)
    return (v / np.float32(255.0) - MEAN_BGR) / STD_BGR


@dataclasses.dataclass(frozen=True)
class ImageRef:
    """One image to read: its file and, for queries, the crop box (x1, y1, x2, y2), in pixels
    of the upright image at full size (mapped onto it at the working size)."""
    path: str
    bbx: tuple[float, float, float, float] | None = None


# What a folder of images is taken to hold (by extension, case-insensitive).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

# Decoding refuses images with more pixels than this, from the header alone (before any
# memory is allocated): 100 megapixels (e.g. 10000 x 10000, ~300 MB decoded) is far above
# any retrieval benchmark's images and far below what would exhaust a machine.
# SCVNET_MAX_IMAGE_PIXELS or set_max_pixels() change it.
DEFAULT_MAX_PIXELS = 100_000_000
_max_pixels = int(os.environ.get("SCVNET_MAX_IMAGE_PIXELS") or DEFAULT_MAX_PIXELS)
_RAISE_IT = " (SCVNET_MAX_IMAGE_PIXELS or --config.max_image_pixels raise it)"


# The working size: the long side, in pixels, images are described at (0 = full size).
# SCVNET_MAX_IMAGE_SIDE or set_max_side() change it (the app's --max_side, eval.py's
# --config.max_side).
DEFAULT_MAX_SIDE = 1024
_max_side = int(os.environ.get("SCVNET_MAX_IMAGE_SIDE") or DEFAULT_MAX_SIDE)


def set_max_side(n: int) -> None:
    """The working size of every later decode: images whose long side is larger are
    reduced to `n` px on it; 0 reads them at full size."""
    global _max_side
    if (not isinstance(n, (int, float, np.integer)) or isinstance(n, bool)
            or not np.isfinite(n) or int(n) != n or n < 0):
        raise InputError(f"max_side must be an integer >= 0 (pixels; 0 = full size), got {n!r}")
    _max_side = int(n)


def max_side() -> int:
    """The current working size (`set_max_side`)."""
    return _max_side


def working_size(w: int, h: int, side: int | None = None) -> tuple[int, int]:
    """(width, height) a w x h (upright) image is read at with working size `side`
    (None: `max_side()`): unchanged if its long side is at most `side` (or side is 0),
    else scaled to `side` on its long side."""
    side = _max_side if side is None else side
    if not side or max(w, h) <= side:
        return w, h
    s = side / max(w, h)
    return max(1, round(w * s)), max(1, round(h * s))


def set_max_pixels(n: int) -> None:
    """The pixel limit of every later decode (eval.py's --config.max_image_pixels)."""
    global _max_pixels
    if int(n) < 1:
        raise InputError(f"max_image_pixels must be >= 1, got {n}")
    _max_pixels = int(n)


def max_pixels() -> int:
    """The current pixel limit (`set_max_pixels`)."""
    return _max_pixels


def read_bytes(path: str) -> bytes:
    """A file's bytes, or one InputError naming it."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise InputError(f"{path}: image file not found") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, expected an image file") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read the image file ({e.strerror or e})") from None


def header_size(data: bytes, what: str) -> tuple[int, int]:
    """(width, height) of the upright image (as a browser shows it) from the header,
    without decoding the pixels."""
    w, h, orientation = _header(data, what)
    return (h, w) if orientation >= 5 else (w, h)


def _orientation(im) -> int:
    """The EXIF orientation (1-8; 1 for none or a bad value) of an opened Pillow image,
    without decoding it (a PNG's eXIf chunk only if it comes before the pixels, as the
    PNG specification places it: Pillow would decode the image to look further)."""
    if im.format == "PNG" and "exif" not in im.info:
        return 1
    try:
        o = im.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001  (damaged EXIF: shown unrotated, as browsers do)
        return 1
    return o if isinstance(o, int) and 1 <= o <= 8 else 1


def _header(data: bytes, what: str) -> tuple[int, int, int]:
    """(width, height, EXIF orientation) as stored, from the header alone."""
    from PIL import Image, UnidentifiedImageError
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                if im.format == "TIFF":    # (Pillow >= 11 gives a TIFF's size upright)
                    w, h = im.tag_v2.get(256, w), im.tag_v2.get(257, h)
                return w, h, _orientation(im)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        detail = "" if isinstance(e, UnidentifiedImageError) else f"; {e}"   # (names a BytesIO)
        raise InputError(f"{what}: cannot read the image: not an image file this tool reads "
                         f"(expected JPEG, PNG, BMP, TIFF, WebP, ...{detail})") from None
    except Image.DecompressionBombError as e:   # PIL's own limit, far above ours
        m = re.search(r"\((\d+) pixels\)", str(e))
        n = f"{int(m[1]) / 1e6:.0f} megapixels" if m else "more than 179 megapixels"
        raise InputError(f"{what}: the image is {n}, above the limit of "
                         f"{_max_pixels / 1e6:g} megapixels{_RAISE_IT}") from None


def is_truncated(data: bytes) -> bool:
    """A JPEG without its end-of-image marker after the last scan, or a PNG without its
    IEND chunk: the file was cut short (OpenCV would decode it grey-filled, with only a
    warning that names no file)."""
    if data[:3] == b"\xff\xd8\xff":
        sos = data.rfind(b"\xff\xda")
        return sos < 0 or data.find(b"\xff\xd9", sos) < 0
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return b"IEND" not in data[-64:]
    return False


# OpenCV's orientation handling is switched off (IMREAD_IGNORE_ORIENTATION): the EXIF
# orientation read by Pillow is applied by `upright`, for JPEG, PNG, WebP, ... alike. Except
# TIFF, which OpenCV's decoder turns upright whatever the flag says (tests/test_images.py
# checks both for all 8 orientations).
_NO_ROTATION = cv2.IMREAD_IGNORE_ORIENTATION
_TIFF = (b"II*\x00", b"MM\x00*")
_REDUCED = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
            8: cv2.IMREAD_REDUCED_COLOR_8}


def upright(im: np.ndarray, orientation: int) -> np.ndarray:
    """The image as stored -> as shown (EXIF orientation 1-8, as PIL.ImageOps.exif_transpose)."""
    if orientation == 2:
        return cv2.flip(im, 1)
    if orientation == 3:
        return cv2.rotate(im, cv2.ROTATE_180)
    if orientation == 4:
        return cv2.flip(im, 0)
    if orientation == 5:
        return cv2.transpose(im)
    if orientation == 6:
        return cv2.rotate(im, cv2.ROTATE_90_CLOCKWISE)
    if orientation == 7:
        return cv2.flip(cv2.transpose(im), -1)
    if orientation == 8:
        return cv2.rotate(im, cv2.ROTATE_90_COUNTERCLOCKWISE)
    return im


def jpeg_reduction(w: int, h: int, side: int) -> int:
    """The largest libjpeg reduction (1, 2, 4, 8) that leaves a w x h JPEG's long side at
    least `side` (0: full size)."""
    r = 1
    while side and r < 8 and -(-max(w, h) // (2 * r)) >= side:
        r *= 2
    return r


def decode_image(data: bytes, what: str, max_side: int | None = None) -> np.ndarray:
    """BGR uint8 image (3 channels, as `cv2.imread`), upright and at the working size
    (`max_side`; None: the module's, `set_max_side`), from encoded bytes; `what` names the
    file in errors. Checked first: the header's size against the pixel limit, and that the
    file is complete."""
    return _decode(data, what, max_side)[0]


def _decode(data: bytes, what: str, side: int | None) -> tuple[np.ndarray, tuple[int, int]]:
    """(the image as `decode_image`, the upright image's full (width, height))."""
    w, h, orientation = _header(data, what)
    if w * h > _max_pixels:
        raise InputError(f"{what}: the image is {w}x{h} ({w * h / 1e6:.0f} megapixels), "
                         f"above the limit of {_max_pixels / 1e6:g} megapixels{_RAISE_IT}")
    if is_truncated(data):
        raise InputError(f"{what}: cannot read the image: the file is truncated (it ends "
                         "before the image data does); re-copy or re-download it")
    side = _max_side if side is None else side
    r = jpeg_reduction(w, h, side) if data[:3] == b"\xff\xd8\xff" else 1
    im = cv2.imdecode(np.frombuffer(data, np.uint8), _REDUCED[r] | _NO_ROTATION)
    size = (h, w) if orientation >= 5 else (w, h)      # upright
    tiff = data[:4] in _TIFF                           # turned upright by OpenCV
    sw, sh = size if tiff else (w, h)
    if im is None or im.shape[:2] != (-(-sh // r), -(-sw // r)):
        raise InputError(f"{what}: cannot read the image: corrupt file (expected a JPEG/PNG "
                         "file OpenCV can decode)")
    if not tiff:
        im = upright(im, orientation)
    target = working_size(*size, side)
    if (im.shape[1], im.shape[0]) != target:
        im = cv2.resize(im, target, interpolation=cv2.INTER_AREA)
    return im, size


def crop(im: np.ndarray, bbx, what: str, size: tuple[int, int] | None = None) -> np.ndarray:
    """im[int(y1):int(y2), int(x1):int(x2)] as the official code, refusing boxes that are not
    finite, start outside the image or crop nothing (a box ending past the image is clipped,
    as the official slicing does). size: the (width, height) of the image the box is in,
    when `im` is that image at a smaller working size: the box is checked against it and
    mapped onto `im` (at least one pixel)."""
    if len(bbx) != 4 or not all(np.isfinite(v) for v in bbx):
        raise InputError(f"{what}: query box {tuple(bbx)} is not four finite numbers "
                         "(x1, y1, x2, y2)")
    x1, y1, x2, y2 = (int(v) for v in bbx)
    h, w = im.shape[:2]
    W, H = size or (w, h)
    if not (0 <= x1 < min(x2, W) and 0 <= y1 < min(y2, H)):
        raise InputError(f"{what}: query box {tuple(bbx)} crops nothing from this {W}x{H} "
                         "image (expected 0 <= x1 < x2, 0 <= y1 < y2, starting inside it)")
    if (W, H) != (w, h):      # the box in the full image's pixels, the crop at working size
        x1, y1, x2, y2 = box_at(bbx, (W, H), (w, h))
    return im[y1:y2, x1:x2]


def box_at(bbx, size: tuple[int, int], working: tuple[int, int]) -> tuple[int, ...]:
    """A box (x1, y1, x2, y2) inside an image of `size` (width, height) -> the pixels it
    covers in that image at `working` size (truncated, as int() does; at least one)."""
    (W, H), (w, h) = size, working
    sx, sy = w / W, h / H
    x1, y1 = min(int(int(bbx[0]) * sx), w - 1), min(int(int(bbx[1]) * sy), h - 1)
    x2 = max(x1 + 1, int(min(bbx[2], W) * sx))
    y2 = max(y1 + 1, int(min(bbx[3], H) * sy))
    return x1, y1, x2, y2


def read_image(ref: ImageRef | str, max_side: int | None = None) -> np.ndarray:
    """BGR uint8 image as `cv2.imread`, upright and at the working size (`decode_image`),
    cropped to `ref.bbx` for queries (a box in the pixels of the full upright image, as a
    browser shows it); an InputError naming the file for a missing, unreadable, oversized,
    truncated or corrupt one."""
    ref = ref if isinstance(ref, ImageRef) else ImageRef(str(ref))
    im, size = _decode(read_bytes(ref.path), ref.path, max_side)
    return crop(im, ref.bbx, ref.path, size) if ref.bbx is not None else im


def image_size(path: str) -> tuple[int, int]:
    """(width, height) of the upright image in a file, from its header: the pixels query
    boxes are given in."""
    return header_size(read_bytes(path), path)


_digests: dict = {}
_digests_lock = threading.Lock()


def content_digest(path: str) -> str:
    """blake2b-128 of a file's bytes: what cached values computed from the file are keyed by
    (the whole content, not size + mtime: copies and checkouts reset mtimes, and a wrong
    number is worse than the read). Remembered for this process by (size, mtime, inode)."""
    try:
        st = os.stat(path)
        memo = (path, st.st_size, st.st_mtime_ns, st.st_ino)
        with _digests_lock:
            if memo in _digests:
                return _digests[memo]
        h = hashlib.blake2b(digest_size=16)
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except FileNotFoundError:
        raise InputError(f"{path}: image file not found") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read the image file ({e.strerror or e})") from None
    with _digests_lock:
        _digests[memo] = h.hexdigest()
    return _digests[memo]
