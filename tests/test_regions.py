"""Query regions from the network's activations: the proposal rule on energy maps made by
hand, and on a real photo through sj.search."""
from __future__ import annotations

import numpy as np

from scvnet_jax import regions


def test_components_ranked_by_energy_in_pixels():
    e = np.zeros((10, 12))
    e[1:3, 1:4] = 1.0           # 6 cells, energy 6
    e[5:9, 6:10] = 2.0          # 16 cells, energy 32: first
    e[0, 11] = 5.0              # one cell: not a region
    boxes = regions.propose_from_energy(e, (160, 192), 2)
    assert boxes == [(96, 80, 160, 144), (16, 16, 64, 48)]
    boxes = regions.propose_from_energy(e, (150, 180), 3)   # clipped to the image;
    assert boxes[:2] == [(96, 80, 160, 144), (16, 16, 64, 48)]   # the third from the grid
    x1, y1, x2, y2 = boxes[2]
    assert 0 <= x1 < x2 <= 180 and 0 <= y1 < y2 <= 150


def test_grid_fills_in_without_overlap_and_never_the_whole_image():
    e = np.ones((9, 9))
    e[:, 6:] = 3.0              # the above-mean mask is one component covering 1/3
    boxes = regions.propose_from_energy(e, (144, 144), 4)
    assert boxes[0] == (96, 0, 144, 144) and len(boxes) == 4
    cells = [tuple(v // 16 for v in b) for b in boxes]
    assert all(regions._iou(a, b) <= 0.5 for i, a in enumerate(cells) for b in cells[:i])
    assert all((b[2] - b[0]) * (b[3] - b[1]) <= 0.9 * 144 * 144 for b in boxes)
    flat = np.ones((9, 9))      # nothing above the mean: grid windows only
    assert len(regions.propose_from_energy(flat, (144, 144), 3)) == 3
    assert regions.propose_from_energy(e, (144, 144), 0) == []
