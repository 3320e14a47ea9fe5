"""Precision and recall of `scvnet-search duplicates` on a collection with planted duplicates.

    python benchmarks/duplicates.py [--out /tmp/dupes] [--classes 12] [--planted 15]
                                    [--weights demo] [--thresholds 0.99,0.995,0.998]

The collection: one photo of each of --classes classes of the demo photos (`data.build
demo_folder`; the classes are different tiles of the sample photographs, so these are
different photos, some of neighbouring parts of one scene, which must NOT be grouped; with
--per_class N, N views of each tile: they overlap, so whether they are duplicates is moot),
plus, for --planted photos per kind chosen at random, one planted duplicate each: `copy` (the same bytes),
`reencode` (JPEG quality 40), `resize` (to --resize of each side, INTER_AREA; default 0.75:
the demo photos are 160 px, so half size would be 80 px) and `crop` (the central 90% of each
side). The folder is indexed (`scvnet-search index`) and `duplicates` run at each
threshold. Per kind, recall: the planted pairs (photo, its duplicate) found in one group;
precision: of the pairs of photos that the groups put together and that involve a duplicate
of this kind, those that are a photo and its own duplicate. `photos`: the pairs of two
different original photos grouped together (false groupings among the originals).
"""
from __future__ import annotations

import argparse
import itertools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

KINDS = ("copy", "reencode", "resize", "crop")


def plant(folder: Path, n: int, resize: float = 0.75, seed: int = 0) -> dict:
    """Writes the planted duplicates beside their originals: {duplicate path: (original
    path, kind)}."""
    import cv2
    originals = sorted(p for p in folder.rglob("*.jpg"))
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(originals), size=n * len(KINDS), replace=False)
    truth = {}
    for t, i in enumerate(chosen):
        src, kind = originals[i], KINDS[t % len(KINDS)]
        dst = src.with_name(f"{src.stem}_dup_{kind}.jpg")
        if kind == "copy":
            shutil.copyfile(src, dst)
        else:
            im = cv2.imread(str(src))
            h, w = im.shape[:2]
            if kind == "reencode":
                out = im
            elif kind == "resize":
                out = cv2.resize(im, (round(w * resize), round(h * resize)),
                                 interpolation=cv2.INTER_AREA)
            else:
                dy, dx = h // 20, w // 20
                out = im[dy:h - dy, dx:w - dx]
            cv2.imwrite(str(dst), out, [cv2.IMWRITE_JPEG_QUALITY, 40 if kind == "reencode"
                                        else 90])
        truth[str(dst.resolve())] = (str(src.resolve()), kind)
    return truth


def score(groups: list, truth: dict) -> dict:
    """Per kind: (found, planted, true grouped pairs, grouped pairs) and the false pairs
    of two originals."""
    together = set()
    for g in groups:
        paths = [im["path"] for im in g["images"]]
        together.update(frozenset(p) for p in itertools.combinations(paths, 2))
    out = {k: [0, 0, 0, 0] for k in KINDS}
    for dup, (orig, kind) in truth.items():
        out[kind][1] += 1
        out[kind][0] += frozenset((dup, orig)) in together
    photos = 0
    for pair in together:
        a, b = sorted(pair)
        kinds = [truth[p][1] for p in (a, b) if p in truth]
        if not kinds:
            photos += 1
            continue
        true = (a in truth and truth[a][0] == b) or (b in truth and truth[b][0] == a)
        for kind in set(kinds):
            out[kind][3] += 1
            out[kind][2] += true
    return {"kinds": out, "photo_pairs": photos}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="/tmp/dupes")
    ap.add_argument("--classes", type=int, default=72)
    ap.add_argument("--per_class", type=int, default=1)
    ap.add_argument("--planted", type=int, default=15, help="duplicates per kind")
    ap.add_argument("--weights", default="demo")
    ap.add_argument("--resize", type=float, default=0.75, help="the resized copies' scale")
    ap.add_argument("--thresholds", default="0.99,0.993,0.995,0.997,0.998")
    ap.add_argument("-k", type=int, default=10)
    args = ap.parse_args()
    root = Path(args.out)
    mark = root / ".duplicates_benchmark"         # a folder this script wrote: redone
    if root.exists() and any(root.iterdir()) and not mark.is_file():
        print(f"error: --out {root}: exists and was not written by this benchmark (give a "
              "new or empty folder)", file=sys.stderr)
        sys.exit(2)
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    mark.touch()
    photos = root / "photos"
    run = lambda *a: subprocess.run([sys.executable, "-m", *a], check=True,  # noqa: E731
                                    capture_output=True, text=True).stdout
    run("scvnet_jax.data.build", "demo_folder", "--out", str(photos), "--classes",
        str(args.classes))
    for d in photos.iterdir():
        for extra in sorted(d.glob("*.jpg"))[args.per_class:]:
            extra.unlink()
    n_orig = sum(1 for _ in photos.rglob("*.jpg"))
    truth = plant(photos, args.planted, args.resize)
    index = root / "photos.index"
    print(run("scvnet_jax.app", "index", str(photos), "--index", str(index), "--weights",
              args.weights).strip().splitlines()[-2])
    print(f"{n_orig} original photos ({args.per_class} of each of {args.classes} tiles of the "
          f"sample photographs), {len(truth)} planted duplicates ({args.planted} per kind; "
          f"resized to {args.resize:g}); weights "
          f"{args.weights}; k {args.k}")
    print(f"{'threshold':>9}  " + "  ".join(f"{k:>17}" for k in KINDS)
          + "  grouped originals")
    print(f"{'':>9}  " + "  ".join(f"{'recall  precision':>17}" for _ in KINDS))
    rows = {}
    for t in args.thresholds.split(","):
        res = json.loads(run("scvnet_jax.app", "duplicates", "--index", str(index),
                             "--threshold", t, "-k", str(args.k), "--json"))
        s = score(res["groups"], truth)
        rows[t] = s
        cells = []
        for k in KINDS:
            found, planted, true, grouped = s["kinds"][k]
            prec = f"{true / grouped:.2f}" if grouped else "  - "
            cells.append(f"{found / planted:6.2f}  {prec:>9}")
        print(f"{t:>9}  " + "  ".join(f"{c:>17}" for c in cells)
              + f"  {s['photo_pairs']:>17} pairs")
    (root / "duplicates.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
