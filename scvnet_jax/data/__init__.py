"""Image input conventions of the official CVNet/SuperGlobal code.

Images are BGR (as `cv2.imread` returns them), scaled to [0, 1] and normalised per
channel with the BGR-ordered ImageNet statistics below.
"""
from __future__ import annotations

import numpy as np

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
