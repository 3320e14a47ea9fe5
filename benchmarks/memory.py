"""Peak memory (ru_maxrss) and time of one query of the visual-search app with a large image,
each in a fresh process, as `scvnet-search serve` answers POST /api/search (the upload
checked from its header, decoded at the working size, described, searched).

    python benchmarks/memory.py                    # the bundled demo model
    python benchmarks/memory.py --weights r50      # a random-init R50 of the official size
    python benchmarks/memory.py --max_side 0       # full size (what every query did before)
    python benchmarks/memory.py --index_photos 8   # also: indexing 8 24 MP photos

Cases: a 512 px JPEG (the process's floor: Python, JAX, the model, the compiled programs),
a 24 MP JPEG (6000x4000, a phone photo), a 4000x4000 PNG (of one colour: ~60 kB), and a
100 MP PNG (10000x10000, the default pixel limit). The collection: 6 demo photographs.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CASES = {"jpeg_512": (512, 384, "jpg"), "jpeg_24mp": (6000, 4000, "jpg"),
         "png_4000": (4000, 4000, "png"), "png_100mp": (10000, 10000, "png")}


def _photo(w: int, h: int) -> np.ndarray:
    """A demo photograph resized to w x h with a little noise (a JPEG of realistic size)."""
    import cv2

    from scvnet_jax.data import demo
    im = next(iter(demo.read_photos(demo.BENCHMARK_PHOTOS).values()))
    im = cv2.resize(im, (w, h), interpolation=cv2.INTER_LINEAR)
    noise = np.random.default_rng(0).integers(-6, 7, im.shape, dtype=np.int16)
    return np.clip(im.astype(np.int16) + noise, 0, 255).astype(np.uint8)


def write_case(name: str, out: Path) -> Path:
    import cv2
    w, h, ext = CASES[name]
    path = out / f"{name}.{ext}"
    if ext == "png":       # one colour: a tiny file that decodes to w x h x 3 bytes
        cv2.imwrite(str(path), np.full((h, w, 3), 128, np.uint8))
    else:
        cv2.imwrite(str(path), _photo(w, h), [cv2.IMWRITE_JPEG_QUALITY, 90])
    return path


def _model(weights: str):
    import scvnet_jax as sj
    if weights == "demo":
        return sj.load(sj.demo_model_path())
    if weights == "r50":
        return sj.create(50, seed=0)      # the official R50's shapes, random weights
    return sj.load(weights)


def child(args) -> dict:
    """One query (or one indexing run) in this process; its peak memory and time."""
    from scvnet_jax import images, search
    from scvnet_jax.app import server

    images.set_max_side(args.max_side)
    t0 = time.perf_counter()
    model = _model(args.weights)
    if args.case == "index":
        _, stats = search.update_index(model, args.photos, Path(args.tmp) / "big.index",
                                       workers=args.workers, backend="exact")
        out = {"images": stats["extracted"], "seconds": round(time.perf_counter() - t0, 1)}
    else:
        index = search.Index.load(args.index)
        searcher = server.Searcher(index, model, max_upload_bytes=1 << 30)
        path = Path(args.query)
        t1 = time.perf_counter()
        answer = searcher.search(data=path.read_bytes(), filename=path.name, k=5)
        out = {"file_mb": round(path.stat().st_size / 2**20, 2),
               "query_s": round(time.perf_counter() - t1, 1), "hits": len(answer["hits"])}
    return {"case": args.case, "peak_mb": round(peak_kb() / 1024), **out}


def peak_kb() -> int:
    """This process's peak resident memory, kB: VmHWM (Linux; ru_maxrss would include the
    parent's peak, which Linux carries over fork and exec), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _run_child(argv: list[str]) -> dict:
    p = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True)
    if p.returncode != 0:
        return {"case": argv[argv.index("--case") + 1], "error": p.stderr.strip()[-300:]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", default="demo", help="demo, r50 (random init) or a model")
    ap.add_argument("--max_side", type=int, default=1024, help="working size (0: full)")
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated")
    ap.add_argument("--index_photos", type=int, default=0,
                    help="also index this many 24 MP JPEGs (--workers threads)")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    for hidden in ("--index", "--query", "--photos", "--tmp"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        print(json.dumps(child(args)))
        return 0
    import cv2

    from scvnet_jax import images, search
    print(f"{platform.node()}: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}"
          f"; weights {args.weights}, max_side {args.max_side}", flush=True)
    common = ["--weights", args.weights, "--max_side", str(args.max_side)]
    with tempfile.TemporaryDirectory(prefix="scvnet-memory-") as tmp:
        tmp = Path(tmp)
        collection = tmp / "photos"
        collection.mkdir()
        from scvnet_jax.data import demo
        for name, im in list(demo.read_photos(demo.BENCHMARK_PHOTOS).items())[:6]:
            cv2.imwrite(str(collection / f"{Path(name).stem}.jpg"), im)
        images.set_max_side(args.max_side)
        search.update_index(_model(args.weights), collection, tmp / "photos.index",
                            backend="exact")
        for name in args.cases.split(","):
            q = write_case(name, tmp)
            r = _run_child(common + ["--case", name, "--index", str(tmp / "photos.index"),
                                     "--query", str(q)])
            print(json.dumps(r), flush=True)
            q.unlink()
        if args.index_photos:
            big = tmp / "big"
            big.mkdir()
            photo = _photo(6000, 4000)
            for i in range(args.index_photos):      # each its own content (no duplicates)
                photo[0, 0] = i
                cv2.imwrite(str(big / f"photo_{i}.jpg"), photo, [cv2.IMWRITE_JPEG_QUALITY, 90])
            r = _run_child(common + ["--case", "index", "--photos", str(big), "--tmp", str(tmp),
                                     "--workers", str(args.workers)])
            print(json.dumps(r), flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
