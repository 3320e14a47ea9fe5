"""A bounded soak of `scvnet-search serve` on loopback: mixed requests, 8 at a time.

    python benchmarks/soak.py --index my.index [--requests 2000] [--concurrency 8]

Starts the server (`python -m scvnet_jax.app serve`, its own process), warms it up (each
upload and each indexed image, up to 1,000, once of each kind, then --warmup requests of the
mix: the programs of every query size get compiled, its caches fill), reads its resident
memory, sends --requests requests from --concurrency threads (uploads searched plain and
reranked, searches by id, regions, why a hit matched, images, thumbnails, duplicates,
health), reading its memory after each eighth of them, and stops it. Prints per kind:
requests, errors (anything but the expected answer), p50 / p95 latency (queueing included:
searches share the one model); the memory after warm-up and after each eighth, with its
trend per request (a leak is a steady slope; the allocator's pools and the caches are steps
and noise around it); and one JSON line (--json FILE writes it
too). Exit status 1 if any request failed.
"""
from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# kind -> share of the requests
MIX = {"search": 0.2, "search_rerank": 0.1, "search_id": 0.15, "regions": 0.05,
       "explain": 0.05, "image": 0.15, "thumb": 0.15, "duplicates": 0.05, "health": 0.1}
SEGMENTS = 8        # the server's memory is read after each eighth of the requests


def rss_mb(pid: int) -> float:
    """Resident memory of a process, MB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def start(index: str, port: int, extra=()) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "scvnet_jax.app", "serve", "--index", index,
                             "--port", str(port), *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    deadline = time.time() + 600
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError("the server stopped:\n" + "".join(lines[-30:]))
        lines.append(line)
        if line.startswith("serving "):
            threading.Thread(target=proc.stdout.read, daemon=True).start()   # drain
            import httpx
            while time.time() < deadline:        # answering (serve listens before it says so)
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=60).is_success:
                        return proc
                except httpx.TransportError:
                    pass
                if proc.poll() is not None:
                    raise RuntimeError("the server stopped:\n" + "".join(lines[-30:]))
                time.sleep(0.2)
            break
    raise RuntimeError("the server did not start in 10 minutes")


def request(client, kind: str, n_images: int, uploads: list, rng: random.Random,
            i: int | None = None):
    """One request of `kind` (about image `i`: an id, or an upload's position; default
    random): (ok, seconds)."""
    t = time.perf_counter()
    if kind in ("search", "search_rerank", "regions"):
        path = uploads[i] if i is not None else rng.choice(uploads)
        params = {"k": 10}
        if kind == "search_rerank":
            params["rerank"] = "superglobal"
        if kind == "regions":
            params["regions"] = 5
        r = client.post("/api/search", params=params,
                        files={"image": (path.name, path.read_bytes(), "image/jpeg")})
        ok = r.status_code == 200 and len(r.json()["hits"]) == min(10, n_images)
        return ok, time.perf_counter() - t
    i = rng.randrange(n_images) if i is None else i
    if kind == "explain":          # why indexed image i matched an upload
        path = uploads[i % len(uploads)] if i is not None else rng.choice(uploads)
        r = client.post("/api/explain", params={"hit": i},
                        files={"image": (path.name, path.read_bytes(), "image/jpeg")})
        ok = r.status_code == 200 and r.json()["inliers"] >= 0
    elif kind == "search_id":
        r = client.post("/api/search", params={"id": i, "k": 10})
        ok = r.status_code == 200 and len(r.json()["hits"]) == min(10, n_images)
    elif kind == "image":
        r = client.get(f"/api/image/{i}")
        ok = r.status_code == 200 and len(r.content) > 0
    elif kind == "thumb":
        r = client.get(f"/api/thumb/{i}")
        ok = r.status_code == 200 and r.content[:2] == b"\xff\xd8"
    elif kind == "duplicates":
        r = client.get("/api/duplicates", params={"threshold": rng.choice([0.99, 0.995])})
        ok = r.status_code == 200 and "groups" in r.json()
    else:
        r = client.get("/api/health")
        ok = r.status_code == 200 and r.json()["images"] == n_images
    return ok, time.perf_counter() - t


def soak(index: str, requests: int = 2000, concurrency: int = 8, port: int = 8765,
         seed: int = 0, uploads: int = 6, warmup: int = 200) -> dict:
    import httpx
    import numpy as np

    import scvnet_jax as sj
    ix = sj.search.Index.load(index)
    n = len(ix)
    files = [Path(p) for p in ix.paths[:uploads]]
    proc = start(index, port)
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=300) as c:
            rng = random.Random(seed)
            for kind in MIX:     # every upload, and every indexed image, once of each kind
                every = len(files) if kind in ("search", "search_rerank", "regions") else (
                    n if kind in ("search_id", "explain", "image", "thumb") else 1)
                for i in range(min(every, 1000)):
                    request(c, kind, n, files, rng, i)
        mix = random.Random(seed + 1).choices(list(MIX), weights=list(MIX.values()),
                                              k=warmup + requests)
        results: dict = {k: [] for k in MIX}
        local = threading.local()

        def one(job):
            j, kind = job
            if not hasattr(local, "client"):
                local.client = httpx.Client(base_url=base, timeout=300)
            try:
                ok, s = request(local.client, kind, n, files, random.Random(seed * 7919 + j))
            except Exception:                        # noqa: BLE001  (a failed request)
                ok, s = False, float("nan")
            return kind, ok, s

        with ThreadPoolExecutor(concurrency) as pool:
            warm = list(pool.map(one, enumerate(mix[:warmup])))
            before = rss_mb(proc.pid)
            t0 = time.perf_counter()
            rss = []
            cuts = [warmup + requests * j // SEGMENTS for j in range(SEGMENTS + 1)]
            for a, b in zip(cuts, cuts[1:]):
                for kind, ok, s in pool.map(one, zip(range(a, b), mix[a:b])):
                    results[kind].append((ok, s))
                rss.append(rss_mb(proc.pid))
            seconds = time.perf_counter() - t0
        warm_errors = sum(not ok for _, ok, _ in warm)
        alive = proc.poll() is None
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    table = {}
    for kind, rs in results.items():
        lat = np.array([s for ok, s in rs if ok]) * 1000
        table[kind] = {"requests": len(rs), "errors": sum(not ok for ok, _ in rs),
                       "p50_ms": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
                       "p95_ms": round(float(np.percentile(lat, 95)), 1) if len(lat) else None}
    return {"requests": requests, "concurrency": concurrency, "images": n, "warmup": warmup,
            "seconds": round(seconds, 1),
            "errors": sum(t["errors"] for t in table.values()) + warm_errors,
            "rss_mb_before": round(before, 1), "rss_mb_trace": [round(v, 1) for v in rss],
            "rss_mb_after": round(rss[-1], 1), "rss_growth_mb": round(rss[-1] - before, 1),
            "rss_growth_second_half_mb": round(rss[-1] - rss[SEGMENTS // 2 - 1], 1),
            # the trend, least squares over the readings: a leak is a slope, the allocator's
            # pools and the caches are noise and steps around it
            "rss_slope_kb_per_request": round(float(np.polyfit(
                np.array(cuts) - warmup, np.array([before] + rss), 1)[0]) * 1024, 2),
            "server_alive": alive,
            "kinds": table}


def report(r: dict) -> str:
    lines = [f"{r['requests']} requests, {r['concurrency']} at a time, in {r['seconds']} s "
             f"({r['requests'] / r['seconds']:.1f} requests/s) against an index of "
             f"{r['images']} images; errors: {r['errors']}",
             f"{'kind':>14}  {'requests':>8}  {'errors':>6}  {'p50 ms':>8}  {'p95 ms':>8}"]
    for kind, t in r["kinds"].items():
        lines.append(f"{kind:>14}  {t['requests']:8d}  {t['errors']:6d}  "
                     f"{t['p50_ms'] or float('nan'):8.1f}  {t['p95_ms'] or float('nan'):8.1f}")
    lines.append(f"server memory (RSS): after {r['warmup']} warm-up requests "
                 f"{r['rss_mb_before']} MB, then after each {SEGMENTS}th of the requests "
                 f"{', '.join(map(str, r['rss_mb_trace']))} MB: {r['rss_growth_mb']:+.1f} "
                 f"MB in all, {r['rss_growth_second_half_mb']:+.1f} MB in the second half; "
                 f"trend {r['rss_slope_kb_per_request']:+.2f} KB per request (least squares "
                 "over the readings: a leak is a steady slope, the allocator's pools and the "
                 "caches are steps and noise around it)")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--index", required=True)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--json", default=None, help="also write the result to this file")
    args = ap.parse_args()
    r = soak(args.index, args.requests, args.concurrency, args.port,
             warmup=args.warmup)
    print(report(r))
    print(json.dumps(r))
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))
    return 0 if r["errors"] == 0 and r["server_alive"] else 1


if __name__ == "__main__":
    sys.exit(main())
