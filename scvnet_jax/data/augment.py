"""Training augmentation, host-side (NumPy/OpenCV): random-resized crops, flips, colour
jitter; BGR uint8 in and out."""
from __future__ import annotations

import dataclasses
import math

import cv2
import numpy as np

from scvnet_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Augment:
    """Training augmentation (all of it host-side NumPy/OpenCV)."""
    size: int = 512                    # output crops are size x size
    area: tuple[float, float] = (0.25, 1.0)    # random-resized-crop area fraction
    aspect: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5                 # probability
    brightness: float = 0.3            # relative, each applied with probability `color_p`
    contrast: float = 0.3
    saturation: float = 0.3
    color_p: float = 0.8
    grayscale: float = 0.0             # probability

    @classmethod
    def from_config(cls, c) -> "Augment":
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in dict(c).items()
              if k in fields}
        unknown = set(dict(c)) - fields
        if unknown:
            raise ConfigError(f"unknown data.augment option(s) {sorted(unknown)}; known: "
                             f"{sorted(fields)}")
        return cls(**kw)


def augment(im: np.ndarray, a: Augment, rng: np.random.Generator) -> np.ndarray:
    """Random-resized crop to a.size x a.size, flip, colour jitter; BGR uint8 in and out."""
    h, w = im.shape[:2]
    for _ in range(10):
        area = rng.uniform(*a.area) * h * w
        ar = math.exp(rng.uniform(math.log(a.aspect[0]), math.log(a.aspect[1])))
        cw, ch = int(round(math.sqrt(area * ar))), int(round(math.sqrt(area / ar)))
        if 0 < cw <= w and 0 < ch <= h:
            break
    else:  # fall back to the largest square
        cw = ch = min(h, w)
    y = int(rng.integers(0, h - ch + 1))
    x = int(rng.integers(0, w - cw + 1))
    crop = im[y:y + ch, x:x + cw]
    interp = cv2.INTER_AREA if max(ch, cw) > a.size else cv2.INTER_LINEAR
    out = cv2.resize(crop, (a.size, a.size), interpolation=interp)
    if rng.random() < a.hflip:
        out = out[:, ::-1]
    if rng.random() < a.color_p:
        x = out.astype(np.float32)
        gray = x @ np.array([0.114, 0.587, 0.299], np.float32)
        x = x * (1 + rng.uniform(-a.brightness, a.brightness))
        c = 1 + rng.uniform(-a.contrast, a.contrast)
        x = (x - gray.mean()) * c + gray.mean()
        s = 1 + rng.uniform(-a.saturation, a.saturation)
        g = x @ np.array([0.114, 0.587, 0.299], np.float32)
        x = g[..., None] + s * (x - g[..., None])
        out = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    if rng.random() < a.grayscale:
        g = cv2.cvtColor(np.ascontiguousarray(out), cv2.COLOR_BGR2GRAY)
        out = np.repeat(g[..., None], 3, -1)
    return np.ascontiguousarray(out)
