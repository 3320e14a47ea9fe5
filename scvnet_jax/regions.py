"""Regions of a query image worth searching on their own, proposed by the retrieval network
itself: no detector, nothing downloaded.

SCDA-style (Wei et al., "Selective Convolutional Descriptor Aggregation", TIP 2017): the
energy of each cell of the stride-16 feature map (`model.local_features`, the last
stage-3 block, after a ReLU) is the sum of its activations; cells above the image's mean
energy form a mask, whose 8-connected components are the candidate objects, ranked by
their total energy. Each component's bounding box (in pixels, the cells' extent) is a
region, unless it is a single cell or covers nearly the whole image (the whole image is
always searched anyway). When there are fewer components than asked for, the rest come
from an R-MAC grid (square windows at 2 and 3 per side, 40% overlap) ranked by their mean
energy, skipping any that overlaps a chosen region by IoU > 0.5.
"""
from __future__ import annotations

import numpy as np

STRIDE = 16
WHOLE = 0.9          # a component box covering more than this fraction is the whole image


def _iou(a, b) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])      # noqa: E731
    return inter / float(area(a) + area(b) - inter)


def _grid(h: int, w: int, levels=(2, 3)):
    """R-MAC windows (in cells): squares of side 2 * min(h, w) / (l + 1) per level l."""
    out = []
    for level in levels:
        side = max(1, int(round(2 * min(h, w) / (level + 1))))
        ys = np.linspace(0, h - side, level + (h > w)).round().astype(int)
        xs = np.linspace(0, w - side, level + (w > h)).round().astype(int)
        out += [(int(x), int(y), int(x) + side, int(y) + side) for y in ys for x in xs]
    return out


def propose_from_energy(energy: np.ndarray, image_hw: tuple[int, int], n: int) -> list:
    """Up to `n` boxes (x1, y1, x2, y2) in pixels of an image of size `image_hw` from its
    (h, w) cell energy map, best first (see the module's docstring)."""
    from scipy import ndimage

    h, w = energy.shape
    H, W = image_hw
    to_px = lambda r: (min(W, r[0] * STRIDE), min(H, r[1] * STRIDE),       # noqa: E731
                       min(W, r[2] * STRIDE), min(H, r[3] * STRIDE))
    labels, count = ndimage.label(energy > energy.mean(), structure=np.ones((3, 3)))
    comps = []
    for i, sl in enumerate(ndimage.find_objects(labels), 1):
        cells = labels[sl] == i
        if cells.sum() < 2:
            continue
        box = (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop)
        if (box[2] - box[0]) * (box[3] - box[1]) > WHOLE * h * w:
            continue
        comps.append((float(energy[sl][cells].sum()), box))
    chosen = [box for _, box in sorted(comps, key=lambda c: -c[0])][:n]
    if len(chosen) < n:
        grid = sorted(_grid(h, w), key=lambda r: -float(energy[r[1]:r[3], r[0]:r[2]].mean()))
        for r in grid:
            if len(chosen) == n:
                break
            if all(_iou(r, c) <= 0.5 for c in chosen) and \
                    (r[2] - r[0]) * (r[3] - r[1]) <= WHOLE * h * w:
                chosen.append(r)
    return [to_px(r) for r in chosen]


def propose(model, image: np.ndarray, n: int, bucket: int = 64) -> list:
    """Up to `n` regions (x1, y1, x2, y2), pixels, of a BGR uint8 image, best first."""
    from scvnet_jax.engine import extract

    if n < 1:
        return []
    (feats,) = extract.local_features(model, [image], 1, bucket)
    energy = np.maximum(feats, 0).sum(-1)
    return propose_from_energy(energy, image.shape[:2], n)
