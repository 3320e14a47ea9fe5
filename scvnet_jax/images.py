"""Reading images and the official input conventions.

Images are BGR uint8 (as `cv2.imread` returns them, 3 channels even for greyscale files),
scaled to [0, 1] and normalised per channel with the BGR-ordered ImageNet statistics below.
Queries of the revisited benchmarks are cropped `im[int(y1):int(y2), int(x1):int(x2)]`
with `bbx = (x1, y1, x2, y2)`, as the official test code does.
"""
from __future__ import annotations

import dataclasses

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
    im = im.astype(np.float32) / np.float32(255.0)
    return (im - MEAN_BGR) / STD_BGR


@dataclasses.dataclass(frozen=True)
class ImageRef:
    """One image to read: its file and, for queries, the crop box (x1, y1, x2, y2)."""
    path: str
    bbx: tuple[float, float, float, float] | None = None


def read_image(ref: ImageRef | str) -> np.ndarray:
    """BGR uint8 image as `cv2.imread`, cropped to `ref.bbx` for queries."""
    ref = ref if isinstance(ref, ImageRef) else ImageRef(str(ref))
    im = cv2.imread(ref.path, cv2.IMREAD_COLOR)
    if im is None:
        raise InputError(f"{ref.path}: cannot read the image (missing, not an image, or "
                         "corrupt); expected a JPEG/PNG file OpenCV can decode")
    if ref.bbx is not None:
        x1, y1, x2, y2 = ref.bbx
        im = im[int(y1):int(y2), int(x1):int(x2)]
        if im.shape[0] == 0 or im.shape[1] == 0:
            raise InputError(f"{ref.path}: the query box {ref.bbx} crops nothing from this "
                             f"image ({im.shape[1]}x{im.shape[0]} left)")
    return im


def decode_image(data: bytes, what: str) -> np.ndarray:
    """BGR uint8 image from encoded bytes (a stored JPEG); `what` names it in errors."""
    im = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if im is None:
        raise InputError(f"{what}: cannot decode the stored image (corrupt JPEG?)")
    return im
