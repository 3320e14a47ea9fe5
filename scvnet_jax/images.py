"""Reading images and the official input conventions.

Images are BGR uint8 (as `cv2.imread` returns them, 3 channels even for greyscale files),
scaled to [0, 1] and normalised per channel with the BGR-ordered ImageNet statistics below.
Queries of the revisited benchmarks are cropped `im[int(y1):int(y2), int(x1):int(x2)]`
with `bbx = (x1, y1, x2, y2)`, as the official test code does.
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
        raise ValueError(f"expected BGR images with 3 channels last, got shape {im.shape}")
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
    """One image to read: its file and, for queries, the crop box (x1, y1, x2, y2)."""
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


def set_max_pixels(n: int) -> None:
    """The pixel limit of every later decode (eval.py's --config.max_image_pixels)."""
    global _max_pixels
    if int(n) < 1:
        raise InputError(f"max_image_pixels must be >= 1, got {n}")
    _max_pixels = int(n)


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
    """(width, height) from the image header, without decoding the pixels."""
    from PIL import Image, UnidentifiedImageError
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                return im.size
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


def decode_image(data: bytes, what: str) -> np.ndarray:
    """BGR uint8 image (3 channels, as `cv2.imread`) from encoded bytes; `what` names the
    file in errors. Checked first: the header's size against the pixel limit, and that the
    file is complete."""
    w, h = header_size(data, what)
    if w * h > _max_pixels:
        raise InputError(f"{what}: the image is {w}x{h} ({w * h / 1e6:.0f} megapixels), "
                         f"above the limit of {_max_pixels / 1e6:g} megapixels{_RAISE_IT}")
    if is_truncated(data):
        raise InputError(f"{what}: cannot read the image: the file is truncated (it ends "
                         "before the image data does); re-copy or re-download it")
    im = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if im is None or im.shape[:2] != (h, w):
        raise InputError(f"{what}: cannot read the image: corrupt file (expected a JPEG/PNG "
                         "file OpenCV can decode)")
    return im


def crop(im: np.ndarray, bbx, what: str) -> np.ndarray:
    """im[int(y1):int(y2), int(x1):int(x2)] as the official code, refusing boxes that are not
    finite, start outside the image or crop nothing (a box ending past the image is clipped,
    as the official slicing does)."""
    if len(bbx) != 4 or not all(np.isfinite(v) for v in bbx):
        raise InputError(f"{what}: query box {tuple(bbx)} is not four finite numbers "
                         "(x1, y1, x2, y2)")
    x1, y1, x2, y2 = (int(v) for v in bbx)
    h, w = im.shape[:2]
    if not (0 <= x1 < min(x2, w) and 0 <= y1 < min(y2, h)):
        raise InputError(f"{what}: query box {tuple(bbx)} crops nothing from this {w}x{h} "
                         "image (expected 0 <= x1 < x2, 0 <= y1 < y2, starting inside it)")
    return im[y1:y2, x1:x2]


def read_image(ref: ImageRef | str) -> np.ndarray:
    """BGR uint8 image as `cv2.imread`, cropped to `ref.bbx` for queries; an InputError
    naming the file for a missing, unreadable, oversized, truncated or corrupt one."""
    ref = ref if isinstance(ref, ImageRef) else ImageRef(str(ref))
    im = decode_image(read_bytes(ref.path), ref.path)
    return crop(im, ref.bbx, ref.path) if ref.bbx is not None else im


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
