"""Cold and warm starts: the same work in two fresh processes sharing one new cache folder.

    python benchmarks/warm_start.py                   # sj.search on 9 mixed-size photos
    python benchmarks/warm_start.py --photos DIR      # your photos instead
    python benchmarks/warm_start.py --json out.json

Each run is a new Python process (import, model load, indexing the photos with
`sj.search.index_folder` and one query, with the bundled demo model) with XDG_CACHE_HOME
set to a fresh folder, so the first run is cold (nothing compiled, nothing cached) and the
second finds the first's persistent XLA compilation cache. Prints, per run, the wall time
and the XLA programs it needed: how many were compiled and how many came from the cache
(counted with jax.monitoring inside the process), and the seconds spent on them.
The 9 photos are made from scikit-image's sample images at 9 different sizes (no download).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import jax
from jax._src import dispatch, monitoring
compiled, events = [], []
monitoring.register_event_duration_secs_listener(
    lambda event, secs, **kw: compiled.append(secs) if event == dispatch.BACKEND_COMPILE_EVENT
    else None)
monitoring.register_event_listener(lambda event, **kw: events.append(event))
import scvnet_jax as sj
sj.enable_compilation_cache()
folder, query = sys.argv[1], sys.argv[2]
model = sj.load(sj.demo_model_path())
index = sj.search.index_folder(model, folder)
hits = index.search(model, [query], k=5)
hit = events.count("/jax/compilation_cache/cache_hits")
print(json.dumps({"seconds": time.perf_counter() - t0, "programs": len(compiled),
                  "compiles": len(compiled) - hit, "cache_hits": hit,
                  "compile_seconds": sum(compiled), "top": hits[0][0].path}))
"""


def make_photos(folder: Path, n: int = 9) -> list[Path]:
    """n JPEGs of n different sizes cut from scikit-image's sample photographs."""
    import cv2
    import numpy as np
    from skimage import data

    sources = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket(),
               data.immunohistochemistry()]
    sizes = [(480, 640), (640, 480), (512, 512), (300, 420), (600, 800), (360, 360),
             (450, 700), (700, 450), (256, 384)]
    paths = []
    for i, (h, w) in enumerate(sizes[:n]):
        im = np.ascontiguousarray(sources[i % len(sources)][..., ::-1])
        im = cv2.resize(im, (w, h), interpolation=cv2.INTER_AREA)
        paths.append(folder / f"photo_{i}_{h}x{w}.jpg")
        cv2.imwrite(str(paths[-1]), im)
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", default=None, help="a folder of photos (default: 9 made here)")
    p.add_argument("--runs", type=int, default=2, help="processes, one after another")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.photos:
            folder = Path(args.photos)
            query = next(q for q in sorted(folder.iterdir())
                         if q.suffix.lower() in (".jpg", ".jpeg", ".png"))
        else:
            folder = tmp / "photos"
            folder.mkdir()
            query = make_photos(folder)[0]
        env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
        env["XDG_CACHE_HOME"] = str(tmp / "cache")
        results = []
        for run in range(args.runs):
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(query)],
                                 env=env, capture_output=True, text=True)
            if out.returncode:
                sys.stderr.write(out.stderr)
                return out.returncode
            r = json.loads(out.stdout.strip().splitlines()[-1])
            r.update(run="cold" if run == 0 else "warm", process_seconds=time.perf_counter() - t0)
            results.append(r)
            print(f"{r['run']:5s} {r['process_seconds']:6.1f} s in all ({r['seconds']:.1f} s "
                  f"after start-up): {r['programs']} programs, {r['compiles']} compiled, "
                  f"{r['cache_hits']} from the cache; {r['compile_seconds']:.1f} s compiling or "
                  "loading them", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
