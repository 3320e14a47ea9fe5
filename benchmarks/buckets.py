"""Cold evaluation of a folder of photos of mixed sizes against one of a single size.

    python benchmarks/buckets.py [--out /tmp/buckets] [--photos 37] [--settings 64/4,auto/auto]

Builds two held-out sets (half the classes of 2 x --photos photos) of the same photos (the scikit-image sample photographs, crops of
them as classes): one at mixed sizes (long side 320-640 px, aspect 0.6-1, either
orientation), one with every photo at a single size of about their mean area, and runs
`eval.py --dataset folder:...` (the default pipelines, CVNet rerank included, the bundled
demo model) on each, cold: a fresh descriptor cache and a fresh XLA compilation cache per
run. Prints seconds, compiled programs (entries written to the XLA cache) and the mixed /
uniform ratio per --bucket/--feature_bucket setting, and checks that every setting ranks
the same. Issue 35 DM4: the ratio with auto is the goal (<= 1.5).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("astronaut", "coffee", "chelsea", "rocket", "motorcycle_left", "motorcycle_right",
           "retina", "hubble_deep_field", "immunohistochemistry", "colorwheel")


def photos(n: int, seed: int = 0):
    """n (class, BGR crop, (h, w) mixed size) of the sample photographs, ~n/8 classes."""
    import skimage.data
    rng = np.random.default_rng(seed)
    srcs = []
    for name in SOURCES:
        try:
            im = getattr(skimage.data, name)()
        except Exception:       # a sample that needs a download: not here
            continue
        if im.ndim == 3 and im.shape[2] == 3 and min(im.shape[:2]) >= 300:
            srcs.append((name, im[..., ::-1]))
    out = []
    for i in range(n):
        name, im = srcs[i % len(srcs)]
        h, w = im.shape[:2]
        ch, cw = int(h * rng.uniform(0.7, 0.95)), int(w * rng.uniform(0.7, 0.95))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        long = int(rng.integers(320, 641))
        short = int(long * rng.uniform(0.6, 1.0))
        size = (long, short) if rng.random() < 0.5 else (short, long)
        out.append((name, im[y:y + ch, x:x + cw], size))
    return out


def build(root: Path, n: int, uniform: bool) -> str:
    import cv2
    kind = "uniform" if uniform else "mixed"
    folder, data = root / f"photos_{kind}", root / "tfds"
    items = photos(2 * n)     # half held out for evaluation
    side = int(np.sqrt(np.mean([h * w for _, _, (h, w) in items])))
    for i, (name, crop, (h, w)) in enumerate(items):
        if uniform:
            h, w = side * 3 // 4 // 8 * 8, side * 4 // 3 // 8 * 8
        (folder / name).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / name / f"{i:02d}.jpg"),
                    cv2.resize(crop, (w, h), interpolation=cv2.INTER_AREA))
    name = f"bench_{kind}_{n}"
    if not (data / name).exists():
        subprocess.run([sys.executable, "-m", "scvnet_jax.data.build", "folder", "--manual_dir",
                        str(folder), "--name", name, "--data_dir", str(data),
                        "--eval_fraction", "0.5"], check=True, cwd=REPO)
    return f"folder:{data}/{name}"


def evaluate(root: Path, dataset: str, bucket: str, feature_bucket: str, tag: str, topk: int):
    cache = root / f"cache_{tag}"
    if cache.exists():
        import shutil
        shutil.rmtree(cache)
    out = root / f"results_{tag}.json"
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache / "xla"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    import scvnet_jax as sj
    cmd = [sys.executable, "eval.py", "--dataset", dataset, "--weights",
           str(sj.demo_model_path()), "--cache_dir", str(cache), "--output", str(out),
           "--bucket", bucket, "--feature_bucket", feature_bucket, "--topk", str(topk)]
    import resource
    t, c = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(cmd, check=True, cwd=REPO, env=env, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - t
    c2 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (c2.ru_utime - c.ru_utime) + (c2.ru_stime - c.ru_stime)
    programs = sum(1 for p in (cache / "xla").rglob("*") if p.is_file()
                   and not p.name.endswith("-atime"))
    ranks = np.load(out.with_name(out.stem + "_ranks.npz"))
    return seconds, cpu, programs, {k: ranks[k] for k in ranks.files}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="/tmp/buckets")
    ap.add_argument("--photos", type=int, default=37)
    ap.add_argument("--topk", type=int, default=10, help="CVNet rerank depth")
    ap.add_argument("--settings", default="64/4,auto/auto",
                    help="comma list of bucket/feature_bucket")
    args = ap.parse_args()
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    sets = {k: build(root, args.photos, k == "uniform") for k in ("uniform", "mixed")}
    rows, ranks = [], {}
    for setting in args.settings.split(","):
        b, fb = setting.split("/")
        got = {}
        for kind, dataset in sets.items():
            tag = f"{kind}_{b}_{fb}"
            s, c, p, r = evaluate(root, dataset, b, fb, tag, args.topk)
            got[kind] = (s, c, p)
            ranks.setdefault(kind, []).append((setting, r))
            print(f"  {kind:8s} bucket {b:>4s} feature_bucket {fb:>4s}: {s:6.0f} s wall, "
                  f"{c:6.0f} s CPU, {p} programs", flush=True)
        rows.append((setting, got))
    same = all(all(np.array_equal(r[k], ranks[kind][0][1][k]) for k in r)
               for kind in ranks for _, r in ranks[kind])
    print(f"\n{args.photos} photos, demo model, pipelines: eval.py's defaults, CVNet rerank "
          f"top-{args.topk} (cold: fresh caches per run; CPU = user + system seconds of the "
          "eval.py process, the measure that holds on a shared machine)")
    print(f"{'bucket/feature_bucket':>22s} {'uniform s':>10s} {'CPU s':>7s} {'programs':>9s} "
          f"{'mixed s':>8s} {'CPU s':>7s} {'programs':>9s} {'ratio wall':>11s} {'ratio CPU':>10s}")
    for setting, got in rows:
        (us, uc, up), (ms, mc, mp) = got["uniform"], got["mixed"]
        print(f"{setting:>22s} {us:10.0f} {uc:7.0f} {up:9d} {ms:8.0f} {mc:7.0f} {mp:9d} "
              f"{ms / us:11.2f} {mc / uc:10.2f}")
    print("rankings identical across settings:", same)
    (root / "buckets.json").write_text(json.dumps(
        {s: {k: list(v) for k, v in g.items()} for s, g in rows}, indent=1))


if __name__ == "__main__":
    main()
