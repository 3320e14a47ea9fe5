"""Result grids: one PNG per query, a row per pipeline: the query crop, then its top-n
with a border per label: green easy, orange hard, red negative, grey junk."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from scvnet_jax.files import atomic_write_bytes
from scvnet_jax.images import ImageRef, read_image
from scvnet_jax.evaluation.pipelines import PipelineResult

COLORS_BGR = {"easy": (60, 180, 60), "hard": (0, 150, 255), "negative": (40, 40, 220),
              "junk": (150, 150, 150), "query": (200, 120, 0)}
THUMB = 128
BORDER = 6
LABEL_W = 190


def label_of(db_index: int, gnd_q: dict) -> str:
    for name in ("easy", "hard", "junk"):
        if db_index in set(np.asarray(gnd_q[name]).tolist()):
            return name
    return "negative"


def _thumb(im: np.ndarray, color) -> np.ndarray:
    h, w = im.shape[:2]
    s = THUMB / max(h, w)
    small = cv2.resize(im, (max(1, round(w * s)), max(1, round(h * s))),
                       interpolation=cv2.INTER_AREA)
    tile = np.full((THUMB + 2 * BORDER, THUMB + 2 * BORDER, 3), 255, np.uint8)
    tile[:] = color
    inner = np.full((THUMB, THUMB, 3), 255, np.uint8)
    y, x = (THUMB - small.shape[0]) // 2, (THUMB - small.shape[1]) // 2
    inner[y:y + small.shape[0], x:x + small.shape[1]] = small
    tile[BORDER:-BORDER, BORDER:-BORDER] = inner
    return tile


def _text_tile(lines: Sequence[str], height: int, width: int = LABEL_W) -> np.ndarray:
    tile = np.full((height, width, 3), 255, np.uint8)
    for i, line in enumerate(lines):
        cv2.putText(tile, line, (6, 24 + 22 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1,
                    cv2.LINE_AA)
    return tile


def query_grid(query_ref: ImageRef, db_refs: Sequence[ImageRef], gnd_q: dict,
               rows: Sequence[tuple[str, np.ndarray]], topn: int = 10, cache=None,
               title: str = "") -> np.ndarray:
    """BGR image: per row (title, ranking of this query) the query and its top-n."""
    cache = {} if cache is None else cache
    side = THUMB + 2 * BORDER
    q = _thumb(read_image(query_ref), COLORS_BGR["query"])
    out_rows = []
    for row_title, ranking in rows:
        tiles = [_text_tile([row_title], side), q, np.full((side, BORDER * 2, 3), 255, np.uint8)]
        for d in ranking[:topn]:
            d = int(d)
            if d not in cache:
                cache[d] = read_image(db_refs[d])
            tiles.append(_thumb(cache[d], COLORS_BGR[label_of(d, gnd_q)]))
        out_rows.append(np.concatenate(tiles, axis=1))
    width = max(r.shape[1] for r in out_rows)
    out_rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255)
                for r in out_rows]
    legend = _text_tile([f"{title}   query: blue; results: green easy, orange hard, "
                         "red negative, grey junk"], 36, width)
    return np.concatenate(out_rows + [legend], axis=0)


def hits_row(query: np.ndarray, hits: Sequence[tuple[np.ndarray, str]],
             title: str = "") -> np.ndarray:
    """BGR image for unlabelled search results: the query (blue border), then each hit
    (grey border) with its caption (e.g. the score) underneath."""
    side = THUMB + 2 * BORDER
    tiles = [_thumb(query, COLORS_BGR["query"])] + [_thumb(im, COLORS_BGR["junk"])
                                                    for im, _ in hits]
    captions = [title or "query"] + [c for _, c in hits]
    cols = [np.concatenate([t, _text_tile([c], 36, side)], axis=0)
            for t, c in zip(tiles, captions)]
    gap = np.full((side + 36, BORDER * 2, 3), 255, np.uint8)
    return np.concatenate([cols[0], gap] + cols[1:], axis=1)


def save_all(out_dir, results: Sequence[PipelineResult], query_refs, db_refs, gnd, names,
             topn: int = 10) -> list[Path]:
    """Writes <out_dir>/<index>_<query name>.png for every query; official-protocol CVNet rerank
    rows show its Medium ranking."""
    out_dir = Path(out_dir)
    written, cache = [], {}
    for qi, (qref, name) in enumerate(zip(query_refs, names)):
        rows = []
        for r in results:
            title = r.name + (" (M)" if "M" in r.ranks else "")
            rows.append((title, r.ranking("M")[:, qi]))
        grid = query_grid(qref, db_refs, gnd[qi], rows, topn, cache, title=f"query {name}")
        ok, png = cv2.imencode(".png", grid)
        # (a folder set's query names are relative paths: one flat file name per query)
        path = out_dir / f"{qi:03d}_{re.sub(r'[^A-Za-z0-9._-]+', '_', name)}.png"
        atomic_write_bytes(path, png.tobytes())
        written.append(path)
    return written
